"""Run directories (issue 16): one trainer at a time (a second one is refused at once, naming the holder; a lock left
by a dead process is taken over), nothing written to --out before the data and config are checked, metrics only
appended unless a resume must drop records, and non-finite hyper-parameters refused by the config."""

import dataclasses
import json
import os
import socket
import subprocess
import sys

import jax
import pytest

from model.presets import get_preset
from parallel.mesh import MeshConfig
from scripts.train import build_config, parse_args
from tests.subprocesses import child_env, run_module, tail
from train.config import RunConfig, TrainConfig
from train.loop import train
from train.metrics import MetricsLog, read_metrics
from train.run_dir import LOCK_NAME, RunDirInUse, RunLock


def tiny(**train_fields) -> RunConfig:
    fields = dict(steps=2, batch_size=2, seq_len=32, eval_every=2, eval_batches=1, ckpt_every=2)
    return RunConfig(model=dataclasses.replace(get_preset("tiny"), dtype="float32"),
                     train=TrainConfig(**{**fields, **train_fields}), mesh=MeshConfig(data=1))


@pytest.fixture
def no_compiling(monkeypatch):
    """Fail the test if the train step is built: the checks under test must come before any compiling."""
    def refuse(*args, **kwargs):
        raise AssertionError("the train step was built before the run directory's checks")

    monkeypatch.setattr("train.loop.sharded_train_step", refuse)


@pytest.fixture
def text_file(tmp_path):
    """A small text file to train on."""
    path = tmp_path / "text.txt"
    path.write_text("def f(x):\n    return x + 1\n" * 200)
    return path


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_held_lock_refuses_a_second_trainer_naming_the_holder(tmp_path, text_file, no_compiling):
    out = tmp_path / "run"
    with RunLock(out):
        with pytest.raises(RunDirInUse, match=rf"in use by another trainer \(pid {os.getpid()} on "
                                              rf"{socket.gethostname()}, since "):
            train(tiny(data=str(text_file)), out, devices=jax.devices()[:1])
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # no config.json, metrics or checkpoints
    assert not (out / LOCK_NAME).exists()  # released: removed


def test_second_trainer_process_exits_with_code_2_naming_the_holder(tmp_path, text_file):
    out = tmp_path / "run"
    with RunLock(out):
        result = run_module("scripts.train", "--preset", "tiny", "--steps", "2", "--data", str(text_file),
                            "--out", str(out), "--set", "train.seq_len=32", "--set", "train.batch_size=2",
                            env=child_env(JAX_PLATFORMS="cpu", XLA_FLAGS=""))
    assert result.returncode == 2, tail(result.stderr)
    assert f"is in use by another trainer (pid {os.getpid()} on {socket.gethostname()}" in result.stderr
    assert "Traceback" not in result.stderr, tail(result.stderr)
    assert not (out / "config.json").exists()


def test_two_locks_on_one_directory_exclude_each_other_and_a_dead_holder_is_taken_over(tmp_path, caplog):
    first = RunLock(tmp_path).acquire()
    holder = json.loads((tmp_path / LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(RunDirInUse):
        RunLock(tmp_path).acquire()
    first.release()

    pid = dead_pid()  # a trainer killed with SIGKILL leaves its lock file behind, with no process holding it
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "since": "earlier"}))
    with caplog.at_level("WARNING", logger="train.run_dir"), RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"taking over the stale lock of pid {pid} on {socket.gethostname()}" in caplog.text


@pytest.mark.parametrize("data, message", [
    ("missing", r"no text files found for --data '.*typo\.txt'"),
    ("empty", r"the training split has \d+ tokens, fewer than one window of train.seq_len \+ 1 = 33"),
    ("short", r"the validation split has \d tokens, fewer than one window of train.seq_len \+ 1 = 33"),
])
def test_bad_data_is_reported_before_anything_is_written_or_compiled(tmp_path, no_compiling, data, message):
    path = tmp_path / ("typo.txt" if data == "missing" else "text.txt")
    if data != "missing":
        path.write_text("" if data == "empty" else "x = 1\n" * 50)  # 300 bytes: 3 validation tokens
    out = tmp_path / "run"
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        train(tiny(data=str(path)), out, devices=jax.devices()[:1])
    assert not out.exists()  # so the corrected command is not refused as "a different config"


@pytest.mark.parametrize("override", ["train.lr=inf", "train.lr=nan", "train.lr=-inf", "train.lr=1e39",
                                      "train.eps=inf", "train.clip_norm=nan", "train.weight_decay=inf",
                                      "train.beta2=nan"])
def test_non_finite_hyper_parameters_are_refused_naming_the_field(override, capsys):
    with pytest.raises(SystemExit) as info:
        build_config(parse_args(["--preset", "tiny", "--out", "unused", "--set", override]))
    assert info.value.code == 2
    field = override.split("=")[0]
    assert f"error: {field} must be a finite number" in capsys.readouterr().err


def test_metrics_are_appended_not_rewritten_when_nothing_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0}\n')
    os.utime(path, ns=(10**18, 10**18))  # an old stamp: any rewrite would change it
    log = MetricsLog(path, resume_step=2)
    log.close()
    assert path.stat().st_mtime_ns == 10**18
    log = MetricsLog(path, resume_step=2)
    log.write({"step": 3, "loss": 3.0})
    log.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]


def test_metrics_after_the_resumed_step_and_cut_lines_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0}\n{"step": 3, "loss": 3.0}\n{"step": 4, "lo')
    log = MetricsLog(path, resume_step=2)
    log.write({"step": 3, "loss": 2.5})
    log.close()
    assert read_metrics(path) == [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}, {"step": 3, "loss": 2.5}]
    assert not (tmp_path / "metrics.jsonl.partial").exists()


def test_a_changed_schedule_length_is_refused_naming_both_values_and_extend_is_allowed(tmp_path):
    from train.run_dir import check_run_dir

    (tmp_path / "config.json").write_text(tiny(steps=100).to_json())
    with pytest.raises(ValueError, match=r"train.steps: 100 -> 150.*keep --steps 100 and add --extend N"):
        check_run_dir(tmp_path, tiny(steps=150))
    check_run_dir(tmp_path, tiny(steps=100, extend_steps=50))  # same schedule, 50 steps past its end: accepted
    (tmp_path / "config.json").write_text(tiny(steps=100, extend_steps=50).to_json())
    check_run_dir(tmp_path, tiny(steps=100, extend_steps=80))  # an extended run extended further
    with pytest.raises(ValueError, match=r"train.lr: 0.003 -> 0.001") as info:
        check_run_dir(tmp_path, tiny(steps=100, lr=1e-3))
    assert "--extend" not in str(info.value)  # only a changed length points there


def test_a_run_without_validation_files_says_how_it_split(tmp_path, caplog, no_compiling):
    import logging

    text = tmp_path / "one.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    cfg = tiny(steps=1, data=str(text), val_fraction=0.1, eval_batches=1)
    with caplog.at_level(logging.INFO, logger="train.loop"), pytest.raises(AssertionError, match="step was built"):
        train(cfg, tmp_path / "run", devices=jax.devices()[:1])  # the line comes first; no need to train
    lines = [r.getMessage() for r in caplog.records if "validation" in r.getMessage()]
    n_val = len(text.read_bytes()) + 1 - int((len(text.read_bytes()) + 1) * 0.9)  # bytes + EOS, last 10%
    assert lines == [f"no validation files: the last 10% of the training tokens (train.val_fraction=0.1), "
                     f"{n_val:,} tokens, are held out for validation"]
