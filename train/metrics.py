"""Metrics as JSON lines in the run directory (`metrics.jsonl`), one record per logged step or evaluation, and
optionally the same records as TensorBoard scalars (train/tensorboard.py)."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class MetricsLog:
    """Append-only JSONL log. On resume from step `s`, records after `s` (written by a run that died before its
    next checkpoint, or after a checkpoint that was later set aside as damaged) are dropped so the file reads as
    one uninterrupted run: the kept lines are written to a new file that replaces the old one in one rename. When
    nothing is to be dropped the file is only appended to. (One writer at a time: train/run_dir.py's lock.)
    With `tensorboard` (a folder) every record also goes there; when records were dropped, the folder is
    rewritten from the kept ones, so both views hold the same records. Without `tensorboardX` installed (a
    core dependency, but a machine set up by hand may lack it) the log says so once and writes JSONL only."""

    def __init__(self, path: str | os.PathLike, resume_step: int = 0,
                 tensorboard: str | os.PathLike | None = None):
        self.path = Path(path)
        kept, dropped = [], False
        if self.path.exists():
            lines = self.path.read_text().splitlines(keepends=True)
            kept = [line for line in lines if _step(line) is not None and _step(line) <= resume_step]
            dropped = kept != lines
            if dropped or (lines and not lines[-1].endswith("\n")):
                partial = self.path.with_name(self.path.name + ".partial")
                partial.write_text("".join(line.rstrip("\n") + "\n" for line in kept))
                os.replace(partial, self.path)
        self._tensorboard = None
        if tensorboard is not None and importlib.util.find_spec("tensorboardX") is None:
            log.warning("tensorboardX is not installed: no TensorBoard events in %s (pip install tensorboardX)",
                        tensorboard)
        elif tensorboard is not None:
            from train.tensorboard import TensorBoardLog

            rewrite = dropped or not any(Path(tensorboard).glob("events.out.tfevents.*"))
            self._tensorboard = TensorBoardLog(tensorboard, replace=[json.loads(line) for line in kept]
                                               if rewrite else None)
        self._fh = open(self.path, "a")

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._fh.write(json.dumps(clean) + "\n")
        self._fh.flush()
        if self._tensorboard:
            self._tensorboard.write(clean)

    def close(self) -> None:
        self._fh.close()
        if self._tensorboard:
            self._tensorboard.close()


def moe_record(metrics: dict[str, Any]) -> dict[str, Any]:
    """An MoE train step's fields for its record: the router loss, the worst layer's max/mean expert load, and
    every layer's expert load (a list per layer, rounded to 5 digits); and a model with MTP modules' `mtp_loss`;
    empty for a plain dense model's metrics."""
    record = {"mtp_loss": float(metrics["mtp_loss"])} if "mtp_loss" in metrics else {}
    if "router_loss" not in metrics:
        return record
    record["router_loss"] = float(metrics["router_loss"])
    if "expert_load" in metrics:
        record["load_max_over_mean"] = float(metrics["load_max_over_mean"])
        record["expert_load"] = [[round(float(f), 5) for f in layer] for layer in metrics["expert_load"]]
    return record


def _step(line: str) -> int | None:
    """The step of one JSONL record, or None for a line cut short by a kill (or otherwise unreadable)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record.get("step", 0) if isinstance(record, dict) else None


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a `metrics.jsonl` file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
