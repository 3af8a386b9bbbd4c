"""Exact resume: a run killed with SIGKILL mid-training and restarted logs, step for step, the same losses as an
uninterrupted run (bitwise on CPU), because batches are a pure function of (seed, step) and checkpoints hold
the full train state."""

import signal

import pytest

from tests.subprocesses import last_logged_step, logged_losses, start_train, tail, tiny_train_args, wait, wait_for_step

STEPS = 300
ARGS = tiny_train_args(STEPS, batch_size=4, seq_len=32, log_every=1, ckpt_every=40, eval_every=1000, eval_batches=2,
                       warmup_steps=10)


@pytest.mark.slow  # a whole run in child processes: make test-slow (CI runs it)
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    straight = start_train(tmp_path / "straight", ARGS)  # runs one at a time: two XLA thread pools on 2 cores crawl
    assert wait(straight) == 0, tail(straight.stderr.read())
    killed_dir = tmp_path / "killed"
    victim = start_train(killed_dir, ARGS)
    wait_for_step(victim, killed_dir, 100)
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
