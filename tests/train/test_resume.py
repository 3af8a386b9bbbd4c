"""Exact resume: a run killed with SIGKILL mid-training and restarted logs, step for step, the same losses as an
uninterrupted run (bitwise on CPU), because batches are a pure function of (seed, step) and checkpoints hold
the full train state."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.subprocesses import HANG_LIMIT_S, ROOT, child_env, tail, wait

STEPS = 300
ARGS = ["--preset", "tiny", "--steps", str(STEPS), "--log-level", "WARNING",
        "--set", "train.batch_size=4", "--set", "train.seq_len=32", "--set", "train.log_every=1",
        "--set", "train.ckpt_every=40", "--set", "train.eval_every=1000", "--set", "train.eval_batches=2",
        "--set", "train.warmup_steps=10"]


def run_train(out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "scripts.train", *ARGS, "--out", str(out)], cwd=ROOT,
                            env=child_env(XLA_FLAGS="", JAX_PLATFORMS="cpu"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def last_logged_step(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    try:
        return json.loads(lines[-1])["step"] if lines else 0
    except json.JSONDecodeError:
        return 0


@pytest.mark.slow  # a whole run in child processes: make test-slow (CI runs it)
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    straight = run_train(tmp_path / "straight")  # runs one at a time: two XLA thread pools on 2 cores crawl
    assert wait(straight) == 0, tail(straight.stderr.read())
    killed_dir = tmp_path / "killed"
    victim = run_train(killed_dir)
    deadline = time.monotonic() + HANG_LIMIT_S
    while last_logged_step(killed_dir) < 100 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert victim.poll() is None, f"the run ended before it could be killed: {tail(victim.stderr.read())}"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = last_logged_step(killed_dir)
    assert 100 <= killed_at < STEPS, killed_at

    resumed = run_train(killed_dir)
    assert wait(resumed) == 0, tail(resumed.stderr.read())

    expected, got = losses(tmp_path / "straight"), losses(killed_dir)
    assert sorted(got) == list(range(1, STEPS + 1))  # the log reads as one run: no gaps, no repeats
    assert got == expected  # bitwise: floats compared exactly
