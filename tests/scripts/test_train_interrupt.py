"""SIGINT and SIGTERM mid-run, as a user's Ctrl-C or SLURM's preemption notice: the trainer finishes its step, saves
it, exits 130 / 143 with one line naming the step, the checkpoint and the resume command, and that command finishes
the run with the losses of an uninterrupted one (bitwise, as tests/train/test_resume.py checks after SIGKILL).
The uninterrupted run also checks --profile, and the two runs feed scripts/plot_runs.py."""

import json
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.subprocesses import (
    HANG_LIMIT_S,
    ROOT,
    child_env,
    logged_losses,
    start_train,
    tail,
    tiny_train_args,
    wait,
    wait_for_step,
)

STEPS = 300
ARGS = tiny_train_args(STEPS, batch_size=8, seq_len=32, log_every=1, ckpt_every=1000, eval_every=100, eval_batches=1,
                       warmup_steps=10)


pytestmark = pytest.mark.slow  # runs in child processes: make test-slow (CI runs it)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    run = start_train(out, ARGS, "--profile", "2:3", stdout=subprocess.PIPE)
    assert wait(run) == 0, tail(run.stderr.read())
    return out


def test_profile_writes_a_trace_of_the_steps(straight):
    traces = list((straight / "profile").rglob("*.xplane.pb"))
    assert traces and all(t.stat().st_size > 0 for t in traces)
    assert list((straight / "profile").rglob("perfetto_trace.json.gz"))


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_the_step_and_the_printed_command_resumes_exactly(straight, tmp_path, sig, code):
    out = tmp_path / "run"
    run = start_train(out, ARGS, stdout=subprocess.PIPE)
    wait_for_step(run, out, 30)
    assert run.poll() is None, f"the run ended before the signal: {tail(run.stderr.read())}"
    run.send_signal(sig)
    assert wait(run) == code, tail(run.stderr.read())
    stdout = run.stdout.read()
    lines = [line for line in stdout.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1, tail(stdout)
    found = re.fullmatch(r"interrupted at step (\d+); checkpoint saved in (\S+); resume with: (.+)", lines[0])
    assert found, lines[0]
    step, checkpoint, command = int(found[1]), Path(found[2]), shlex.split(found[3])
    assert 30 <= step < STEPS and checkpoint == out / "checkpoints" / str(step) and checkpoint.is_dir()
    assert max(logged_losses(out)) == step  # the log ends at the saved step

    assert command[:3] == ["python", "-m", "scripts.train"] and command[-2:] == ["--out", str(out)]
    resumed = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, capture_output=True, text=True,
                             env=child_env(XLA_FLAGS="", JAX_PLATFORMS="cpu"), timeout=HANG_LIMIT_S)
    assert resumed.returncode == 0, tail(resumed.stderr)
    expected, got = logged_losses(straight), logged_losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == expected  # bitwise


def test_plot_runs_draws_two_real_runs(straight, tmp_path):
    from scripts.plot_runs import main, run_curves

    other = tmp_path / "other"
    run = start_train(other, ARGS, "--set", "train.lr=1e-3", stdout=subprocess.PIPE)
    assert wait(run) == 0, tail(run.stderr.read())
    png = tmp_path / "plot.png"
    assert main([str(straight), str(other), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    curves = run_curves(other)
    records = [json.loads(line) for line in (other / "metrics.jsonl").read_text().splitlines()]
    assert curves["loss"]["value"] == [r["loss"] for r in records if "loss" in r]
    assert curves["val_bpb"]["tokens"] == [r["tokens"] for r in records if "val_bpb" in r] == [
        step * 8 * 32 for step in (100, 200, 300)]
