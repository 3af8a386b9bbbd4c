"""The sweep launcher's logic: a grid of model sizes x token budgets (or IsoFLOP budgets) becomes training runs,
each a separate `scripts.train` process in its own run directory, N at a time, resumable, collected into a table.

A run's learning-rate schedule is tied to its own length: `train.steps` = its tokens / tokens per step, and the
cosine decays over exactly those steps (Hoffmann et al.: a schedule longer than the run overstates the loss).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from model.checks import check_ints
from model.config import ModelConfig
from model.presets import get_preset
from scaling.accounting import flops_per_token, param_count

STATUS_FILE = "sweep_status.json"


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """A sweep: `sizes` are (d_model, n_layers) shapes built on `base_preset` (head_dim 32, d_ff ~ 8/3 d_model);
    each runs for every entry of `tokens` (tokens per run) or, when `flop_budgets` is given instead, for the
    tokens that spend each budget (IsoFLOP)."""

    sizes: tuple[tuple[int, int], ...]
    tokens: tuple[int, ...] = ()
    flop_budgets: tuple[float, ...] = ()
    base_preset: str = "small"
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 5e-3
    head_dim: int = 32
    extra: tuple[str, ...] = ()  # further `--set` overrides for every run
    data: str | None = None

    def __post_init__(self) -> None:
        check_ints("sweep.", self, ("batch_size", "seq_len", "head_dim"))
        if not self.sizes:
            raise ValueError("sweep.sizes is empty: give at least one d_model x n_layers shape")
        for d, layers in self.sizes:
            if d < 1 or layers < 1 or d % self.head_dim:
                raise ValueError(f"sweep size {d}x{layers}: d_model must be a positive multiple of head_dim "
                                 f"({self.head_dim}) and n_layers positive")
        if bool(self.tokens) == bool(self.flop_budgets):
            raise ValueError("give exactly one of sweep.tokens (token budgets) or sweep.flop_budgets (IsoFLOP)")
        if any(t < 1 for t in self.tokens) or any(not c > 0 for c in self.flop_budgets):
            raise ValueError(f"budgets must be positive: tokens {self.tokens}, FLOPs {self.flop_budgets}")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run of a sweep."""

    name: str
    model: ModelConfig
    steps: int
    tokens: int
    params: int
    flops: float
    overrides: tuple[str, ...]


def model_for(cfg: SweepConfig, d_model: int, n_layers: int) -> ModelConfig:
    """The sweep's model of width `d_model` and depth `n_layers`: heads of `head_dim`, SwiGLU d_ff = 8/3 d
    rounded up to a multiple of 32."""
    base = get_preset(cfg.base_preset)
    d_ff = 32 * math.ceil(8 * d_model / 3 / 32)
    heads = d_model // cfg.head_dim
    return base.replace(d_model=d_model, n_layers=n_layers, n_heads=heads, n_kv_heads=heads,
                        head_dim=cfg.head_dim, d_ff=d_ff, max_seq_len=max(base.max_seq_len, cfg.seq_len))


def plan(cfg: SweepConfig) -> list[RunSpec]:
    """Every run of the sweep, with its steps, tokens, total parameters and training FLOPs."""
    tokens_per_step = cfg.batch_size * cfg.seq_len
    runs = []
    for d, layers in cfg.sizes:
        model = model_for(cfg, d, layers)
        fpt = flops_per_token(model, cfg.seq_len)
        budgets = cfg.tokens or [c / fpt for c in cfg.flop_budgets]
        for budget in budgets:
            steps = max(1, round(budget / tokens_per_step))
            tokens = steps * tokens_per_step
            tag = f"t{tokens}" if cfg.tokens else f"c{budget * fpt:.2e}".replace("+", "")
            warmup = max(1, min(50, steps // 10))
            overrides = (
                f"model.d_model={d}", f"model.n_layers={layers}", f"model.n_heads={model.n_heads}",
                f"model.n_kv_heads={model.n_kv_heads}", f"model.head_dim={model.head_dim}",
                f"model.d_ff={model.d_ff}", f"model.max_seq_len={model.max_seq_len}",
                f"train.steps={steps}", f"train.batch_size={cfg.batch_size}", f"train.seq_len={cfg.seq_len}",
                f"train.lr={cfg.lr}", f"train.warmup_steps={warmup}", f"train.eval_every={steps}",
                f"train.ckpt_every={max(1, steps // 4)}", f"train.log_every={max(1, steps // 20)}",
                "train.eval_batches=16", *cfg.extra)
            runs.append(RunSpec(name=f"d{d}_l{layers}_{tag}", model=model, steps=steps, tokens=tokens,
                                params=param_count(model)["total"], flops=fpt * tokens, overrides=overrides))
    return runs


def train_command(cfg: SweepConfig, run: RunSpec, out: Path) -> list[str]:
    """The `scripts.train` command line of `run`, writing into `out/runs/<name>`."""
    cmd = [sys.executable, "-m", "scripts.train", "--preset", cfg.base_preset, "--out", str(out / "runs" / run.name),
           "--log-level", "WARNING"]
    if cfg.data:
        cmd += ["--data", cfg.data]
    for item in run.overrides:
        cmd += ["--set", item]
    return cmd


def read_status(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STATUS_FILE
    return json.loads(path.read_text()) if path.exists() else {"state": "pending"}


def write_status(run_dir: Path, status: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / (STATUS_FILE + ".tmp")
    tmp.write_text(json.dumps(status))
    os.replace(tmp, run_dir / STATUS_FILE)


def final_val_loss(run_dir: Path) -> float | None:
    """The last validation loss in a run's metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    losses = [json.loads(line).get("val_loss") for line in path.read_text().splitlines() if line.strip()]
    losses = [v for v in losses if v is not None]
    return losses[-1] if losses else None


def cpu_slots(workers: int) -> list[set[int]]:
    """Split this process's CPU cores into `workers` disjoint sets (one per concurrent run)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    workers = max(1, min(workers, len(cores)))
    return [set(cores[i::workers]) for i in range(workers)]


def device_env(slot: int, workers: int, devices_per_run: int) -> dict[str, str]:
    """Environment pinning run slot `slot` to its GPUs (CUDA_VISIBLE_DEVICES); empty on CPU-only machines."""
    if not os.environ.get("CUDA_VISIBLE_DEVICES") and not Path("/proc/driver/nvidia").exists():
        return {}
    first = slot * devices_per_run
    return {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(first, first + devices_per_run))}


def execute(cfg: SweepConfig, runs: Sequence[RunSpec], out: Path, *, workers: int = 1, devices_per_run: int = 1,
            retry_failed: bool = False, on_event: Callable[[str, RunSpec, dict], None] | None = None,
            command: Callable[[SweepConfig, RunSpec, Path], list[str]] = train_command) -> list[dict[str, Any]]:
    """Run every run not yet done, `workers` at a time, each pinned to its share of cores (and GPUs). Finished
    runs are skipped; failed ones are recorded with their exit code and the tail of their stderr, and re-run only
    with `retry_failed`. A run interrupted with the launcher resumes from its own checkpoint next time."""
    out.mkdir(parents=True, exist_ok=True)
    pending = []
    for run in runs:
        state = read_status(out / "runs" / run.name)["state"]
        if state == "done" or (state == "failed" and not retry_failed):
            if on_event:
                on_event("skip", run, read_status(out / "runs" / run.name))
            continue
        pending.append(run)
    slots = cpu_slots(workers)
    free = list(range(len(slots)))
    active: dict[int, tuple[RunSpec, subprocess.Popen, float, Any]] = {}
    while pending or active:
        while pending and free:
            run, slot = pending.pop(0), free.pop(0)
            run_dir = out / "runs" / run.name
            write_status(run_dir, {"state": "running"})
            env = {**os.environ, **device_env(slot, len(slots), devices_per_run)}
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                              env.get("PYTHONPATH")]))
            cmd = command(cfg, run, out)
            if len(slots) > 1 and shutil.which("taskset"):  # pin to this slot's cores (no fork hooks under JAX)
                cmd = ["taskset", "-c", ",".join(map(str, sorted(slots[slot]))), *cmd]
            err = open(run_dir / "stderr.log", "w")
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
            active[slot] = (run, proc, time.time(), err)
            if on_event:
                on_event("start", run, {"slot": slot})
        time.sleep(0.2)
        for slot, (run, proc, started, err) in list(active.items()):
            if proc.poll() is None:
                continue
            err.close()
            run_dir = out / "runs" / run.name
            wall = time.time() - started
            if proc.returncode == 0:
                status = {"state": "done", "wall_s": wall, "val_loss": final_val_loss(run_dir)}
            else:
                tail = (run_dir / "stderr.log").read_text(errors="replace").strip().splitlines()[-5:]
                status = {"state": "failed", "returncode": proc.returncode, "wall_s": wall, "error": "\n".join(tail)}
            write_status(run_dir, status)
            del active[slot]
            free.append(slot)
            if on_event:
                on_event(status["state"], run, status)
    return [read_status(out / "runs" / run.name) for run in runs]


RESULT_FIELDS = ["name", "d_model", "n_layers", "params", "tokens", "flops", "val_loss", "wall_s", "state"]


def collect(runs: Sequence[RunSpec], out: Path) -> list[dict[str, Any]]:
    """One row per run (params, tokens, FLOPs, final validation loss, wall time, state), also written to
    `out/results.csv`."""
    rows = []
    for run in runs:
        status = read_status(out / "runs" / run.name)
        rows.append({"name": run.name, "d_model": run.model.d_model, "n_layers": run.model.n_layers,
                     "params": run.params, "tokens": run.tokens, "flops": run.flops,
                     "val_loss": status.get("val_loss"), "wall_s": status.get("wall_s"), "state": status["state"]})
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=RESULT_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def slurm_script(cfg: SweepConfig, runs: Sequence[RunSpec], out: Path, *, gpus_per_run: int = 1,
                 time_limit: str = "24:00:00", partition: str | None = None) -> Path:
    """Write `out/runs.txt` (one train command per line) and `out/sweep.sbatch`, a job array with one run per
    task; submit with `sbatch out/sweep.sbatch`, then collect with `scripts.sweep ... --collect`."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [shlex.join(train_command(cfg, run, out)) for run in runs]
    (out / "runs.txt").write_text("\n".join(lines) + "\n")
    header = [
        "#!/bin/bash",
        "#SBATCH --job-name=meshlm-sweep",
        f"#SBATCH --array=0-{len(runs) - 1}",
        f"#SBATCH --gpus-per-task={gpus_per_run}",
        f"#SBATCH --time={time_limit}",
        f"#SBATCH --output={out}/slurm-%A_%a.out",
    ]
    if partition:
        header.append(f"#SBATCH --partition={partition}")
    body = [
        "set -euo pipefail",
        f"cd {shlex.quote(str(Path(__file__).resolve().parents[1]))}",
        f'eval "$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(str(out / "runs.txt"))})"',
    ]
    path = out / "sweep.sbatch"
    path.write_text("\n".join(header + body) + "\n")
    return path
