"""The metrics records as TensorBoard scalars (`tensorboardX`, no TensorFlow): one event file set in a folder
beside `metrics.jsonl`, every numeric field of every record under its own name, x = the record's step."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tensorboardX import FileWriter
from tensorboardX.proto.summary_pb2 import Summary

NOT_SCALARS = frozenset({"step"})  # the x axis, not a curve


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The fields of `record` TensorBoard draws: finite numbers other than the step (None, NaN, strings skipped)."""
    return {k: float(v) for k, v in record.items()
            if k not in NOT_SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


class TensorBoardLog:
    """Scalars into `directory`. `replace(records)` first empties the folder's event files and writes `records`
    again, so a resume that drops records past its step leaves no stale points behind (the rule `MetricsLog`
    follows for metrics.jsonl); otherwise a resume appends a new event file that TensorBoard reads after the old."""

    def __init__(self, directory: str | os.PathLike, replace: Iterable[dict[str, Any]] | None = None):
        self.directory = Path(directory)
        if replace is not None:
            for old in self.directory.glob("events.out.tfevents.*"):
                old.unlink()
        self.directory.mkdir(parents=True, exist_ok=True)
        # tensorboardX names files by the second and opens them "wb": the suffix keeps a quick resume's file apart
        self._writer = FileWriter(str(self.directory), flush_secs=5, filename_suffix=f".{time.time_ns()}")
        if replace is not None:
            records = list(replace)
            latest = max((r.get("elapsed_s") or 0.0 for r in records), default=0.0)
            began = time.time() - latest  # replayed points keep their spacing on TensorBoard's time axes
            for record in records:
                self.write(record, walltime=began + record["elapsed_s"] if "elapsed_s" in record else None)
            self._writer.flush()

    def write(self, record: dict[str, Any], walltime: float | None = None) -> None:
        """One event holding all of `record`'s scalars (a background thread writes it; flushed every 5 s)."""
        values = [Summary.Value(tag=name, simple_value=value) for name, value in scalars(record).items()]
        self._writer.add_summary(Summary(value=values), global_step=int(record.get("step", 0)), walltime=walltime)

    def close(self) -> None:
        self._writer.close()
