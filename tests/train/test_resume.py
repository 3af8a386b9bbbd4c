"""Exact resume: a run killed with SIGKILL mid-training and restarted logs, step for step, the same losses as an
uninterrupted run (bitwise on CPU), because batches are a pure function of (seed, step) and checkpoints hold
the full train state."""

import signal
import time

import pytest

from tests.subprocesses import HANG_LIMIT_S, last_logged_step, logged_losses, start_train, tail, wait

STEPS = 300
ARGS = ["--preset", "tiny", "--steps", str(STEPS), "--log-level", "WARNING",
        "--set", "train.batch_size=4", "--set", "train.seq_len=32", "--set", "train.log_every=1",
        "--set", "train.ckpt_every=40", "--set", "train.eval_every=1000", "--set", "train.eval_batches=2",
        "--set", "train.warmup_steps=10"]


@pytest.mark.slow  # a whole run in child processes: make test-slow (CI runs it)
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    straight = start_train(tmp_path / "straight", ARGS)  # runs one at a time: two XLA thread pools on 2 cores crawl
    assert wait(straight) == 0, tail(straight.stderr.read())
    killed_dir = tmp_path / "killed"
    victim = start_train(killed_dir, ARGS)
    deadline = time.monotonic() + HANG_LIMIT_S
    while last_logged_step(killed_dir) < 100 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert victim.poll() is None, f"the run ended before it could be killed: {tail(victim.stderr.read())}"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = last_logged_step(killed_dir)
    assert 100 <= killed_at < STEPS, killed_at

    resumed = start_train(killed_dir, ARGS)
    assert wait(resumed) == 0, tail(resumed.stderr.read())

    expected, got = logged_losses(tmp_path / "straight"), logged_losses(killed_dir)
    assert sorted(got) == list(range(1, STEPS + 1))  # the log reads as one run: no gaps, no repeats
    assert got == expected  # bitwise: floats compared exactly
