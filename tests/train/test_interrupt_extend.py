"""Stopping a run between steps (`should_stop`, what the train script wires to SIGINT/SIGTERM) and extending a
finished run past its schedule (`train.extend_steps`): the step reached is saved, and resuming reproduces, bitwise,
the losses of a run that was never stopped (batches are a pure function of (seed, step), checkpoints hold the whole
train state). The reference is one uninterrupted run, then extended."""

import dataclasses
import itertools
import re

import jax
import numpy as np
import pytest

from model.presets import get_preset
from tests.subprocesses import logged_losses
from tests.train.tensorboard_events import read_scalars
from train.config import RunConfig, TrainConfig
from train.loop import TrainingInterrupted, train
from train.metrics import read_metrics

STEPS, EXTEND = 8, 4
ONE = jax.devices()[:1]  # one device: the quickest compile on a small CPU


def config(extend_steps: int = 0) -> RunConfig:
    return RunConfig(model=get_preset("tiny"), train=TrainConfig(
        steps=STEPS, extend_steps=extend_steps, batch_size=4, seq_len=32, warmup_steps=2, log_every=1,
        eval_every=6, eval_batches=1, ckpt_every=5))


def stop_after(calls: int):
    """A should_stop that says yes on its `calls`-th poll (one poll per step)."""
    counter = itertools.count(1)
    return lambda: next(counter) >= calls


pytestmark = pytest.mark.slow  # six short runs in process (a compile each): make test-slow (CI runs it)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A run trained straight to STEPS, then extended by EXTEND steps: its directory."""
    out = tmp_path_factory.mktemp("straight")
    train(config(), out, devices=ONE)
    train(config(EXTEND), out, devices=ONE)
    return out


def test_stopping_saves_the_step_and_resuming_matches_the_uninterrupted_run(reference, tmp_path):
    with pytest.raises(TrainingInterrupted) as info:
        train(config(), tmp_path, should_stop=stop_after(3), devices=ONE)
    assert info.value.step == 3  # 3 is no checkpoint step (ckpt_every=5): the stop saved it
    assert info.value.checkpoint == tmp_path / "checkpoints" / "3"
    assert (info.value.checkpoint / "commit_success.txt").exists()  # the save was complete before the raise
    assert max(logged_losses(tmp_path)) == 3

    train(config(), tmp_path, devices=ONE)  # resume to the end of the schedule
    with pytest.raises(TrainingInterrupted) as info:  # extend, and stop inside the extension
        train(config(EXTEND), tmp_path, should_stop=stop_after(2), devices=ONE)
    assert info.value.step == STEPS + 2
    train(config(EXTEND), tmp_path, devices=ONE)

    expected, got = logged_losses(reference), logged_losses(tmp_path)
    assert sorted(got) == list(range(1, STEPS + EXTEND + 1))  # one run: no gaps, no repeats
    assert got == expected  # bitwise: floats compared exactly
    scalars = {s: v for s, k, v in read_scalars(tmp_path / "tensorboard") if k == "loss"}
    assert scalars == {s: float(np.float32(v)) for s, v in got.items()}  # TensorBoard holds the same curve


def test_the_extension_holds_the_final_learning_rate(reference):
    lrs = {r["step"]: r["lr"] for r in read_metrics(reference / "metrics.jsonl") if "lr" in r}
    final = float(np.float32(config().train.lr) * np.float32(config().train.min_lr_ratio))
    assert [lrs[s] for s in range(STEPS + 1, STEPS + EXTEND + 1)] == pytest.approx([final] * EXTEND, rel=1e-7)
    assert lrs[STEPS] > final  # the schedule itself was still decaying at its last step


def test_records_carry_tokens_and_wall_time(reference):
    records = read_metrics(reference / "metrics.jsonl")
    t = config().train
    assert all(r["tokens"] == r["step"] * t.batch_size * t.seq_len for r in records)
    times = [r["elapsed_s"] for r in records]
    assert times == sorted(times) and times[0] > 0


def test_raising_steps_is_refused_naming_the_field_and_pointing_to_extend(reference):
    longer = RunConfig(model=config().model, train=dataclasses.replace(config().train, steps=STEPS + 5))
    with pytest.raises(ValueError, match=re.escape(f"train.steps: {STEPS} -> {STEPS + 5}")) as info:
        train(longer, reference, devices=ONE)
    assert "--extend" in str(info.value)
