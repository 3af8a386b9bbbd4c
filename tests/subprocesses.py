"""Running the project's command lines from tests as a user would: in a child process, with a time limit that only
guards against a hang (it is not a benchmark, so it is generous enough for a slow, busy machine), and a failure
message that carries the child's last output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HANG_LIMIT_S = 1200.0  # a hung child, not a slow one: the whole CI run has 90 minutes
TAIL_CHARS = 4000


def tail(text: str | bytes | None, chars: int = TAIL_CHARS) -> str:
    """The last `chars` characters of a child's output, decoded if needed."""
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return text[-chars:]


def child_env(**overrides: str) -> dict[str, str]:
    """This process's environment with the repository importable and the overrides applied."""
    return {**os.environ, "PYTHONPATH": str(ROOT), **overrides}


def run_module(module: str, *args: str, env: Mapping[str, str] | None = None,
               timeout: float = HANG_LIMIT_S) -> subprocess.CompletedProcess:
    """`python -m module args...` from the repository root, output captured; a hang fails the test with the
    child's last output instead of blocking the suite."""
    command = [sys.executable, "-m", module, *args]
    try:
        return subprocess.run(command, cwd=ROOT, env=dict(env) if env is not None else child_env(),
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as hung:
        pytest.fail(f"{' '.join(command)} did not finish in {timeout:.0f} s.\n--- stdout ---\n{tail(hung.stdout)}"
                    f"\n--- stderr ---\n{tail(hung.stderr)}")


def wait(process: subprocess.Popen, timeout: float = HANG_LIMIT_S) -> int:
    """The exit code of a started child; a hang kills it and fails the test with its last error output."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
        pytest.fail(f"{' '.join(map(str, process.args))} did not finish in {timeout:.0f} s.\n"
                    f"--- stderr ---\n{tail(err)}")


def start_train(out: Path, args: list[str], *extra: str, stdout: int | None = subprocess.DEVNULL) -> subprocess.Popen:
    """`python -m scripts.train args... extra... --out out` started in a child on the CPU (stderr captured)."""
    return subprocess.Popen([sys.executable, "-m", "scripts.train", *args, *extra, "--out", str(out)], cwd=ROOT,
                            env=child_env(XLA_FLAGS="", JAX_PLATFORMS="cpu"), stdout=stdout,
                            stderr=subprocess.PIPE, text=True)


def tiny_train_args(steps: int, **train: object) -> list[str]:
    """scripts.train's arguments for the tiny preset trained `steps` steps, warnings only, each `train` field set
    (`--set train.NAME=VALUE`, in order)."""
    sets = [arg for name, value in train.items() for arg in ("--set", f"train.{name}={value}")]
    return ["--preset", "tiny", "--steps", str(steps), "--log-level", "WARNING", *sets]


def wait_for_step(process: subprocess.Popen, out: Path, step: int, timeout: float = HANG_LIMIT_S) -> None:
    """Return once the run `process` writing into `out` has logged `step` (or a later one), or has ended, or after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while last_logged_step(out) < step and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)


def logged_losses(out: Path) -> dict[int, float]:
    """step -> training loss of a run directory's metrics.jsonl."""
    from train.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


def last_logged_step(out: Path) -> int:
    """The step of a (possibly still running) run's last complete metrics record; 0 before the first."""
    try:
        lines = [line for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        return json.loads(lines[-1])["step"] if lines else 0
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
