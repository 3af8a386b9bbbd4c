"""Checkpoints under faults (issue 16): the four newest checkpoints of a finished tiny run each damaged another way
(a truncated array data file, an empty metadata file, a missing state folder, a NaN in an Adam moment), the
resumed run reports each step in one warning line with its reason, renames it `<step>.broken`, falls back to the
newest intact one and logs, bit for bit, the losses of the run that was never damaged (batches are a pure
function of (seed, step); CPU steps are deterministic). One resume for the four faults: each compile costs
~10 s on a 2-core machine.

A flipped sign in an Adam second moment (finite on disk, NaN after the next update) stops the run at that step
without saving, naming the last finite checkpoint. Serving reads the parameters only: damaged optimizer state
does not stop it, and reading a run without checkpoints creates nothing."""

import dataclasses
import json
import logging
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from model.presets import get_preset
from parallel.mesh import MeshConfig
from tests.subprocesses import child_env, logged_losses, run_module, tail
from train.checkpoint import Checkpointer
from train.config import RunConfig, TrainConfig
from train.loop import NonFiniteError, load_params, train
from train.optimizer import make_optimizer
from train.sharded import plan_mesh

STEPS = 6  # a checkpoint at every step; the newest five (2 to 6) are kept
CFG = RunConfig(model=dataclasses.replace(get_preset("tiny"), dtype="float32"),
                train=TrainConfig(steps=STEPS, batch_size=2, seq_len=32, warmup_steps=1, log_every=1, eval_every=100,
                                  eval_batches=1, ckpt_every=1, keep_checkpoints=5),
                mesh=MeshConfig(data=1))


def run(out):
    return train(CFG, out, devices=jax.devices()[:1])


def abstract_state():
    optimizer = make_optimizer(CFG.train)
    plan = plan_mesh(CFG.model, CFG.mesh, optimizer, micro_batch=2, seq_len=32, devices=jax.devices()[:1])
    return plan.abstract_state(optimizer)


def rewrite_moment(out, step: int, moment: str, change) -> None:
    """Checkpoint `step` saved again with `change(array)` applied to the first leaf of Adam's `moment` (mu/nu)."""
    ckpt = Checkpointer(out / "checkpoints", keep=10, async_save=False)
    state, record = ckpt.restore(step, abstract_state())
    done = []

    def edit(path, leaf):
        if not done and any(getattr(key, "name", None) == moment for key in path):
            done.append(path)
            return change(np.asarray(leaf))
        return leaf

    state = jax.tree_util.tree_map_with_path(edit, state)
    assert done, f"no {moment} leaf in the optimizer state"
    shutil.rmtree(out / "checkpoints" / str(step))
    ckpt.close()
    ckpt = Checkpointer(out / "checkpoints", keep=10, async_save=False)
    ckpt.save(step, state, record)
    ckpt.close()


def with_nan(array: np.ndarray) -> np.ndarray:
    array = array.copy()
    array.flat[0] = np.nan
    return array


def sign_flipped(array: np.ndarray) -> np.ndarray:
    """One sign bit flipped: a second moment below zero, finite, that makes the next update sqrt(< 0) = NaN."""
    array = array.copy()
    array.flat[0] = -(array.flat[0] + 1.0)
    return array


def truncate_array_data(step_dir):
    data = max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])


def empty_metadata(step_dir):
    (step_dir / "state" / "_METADATA").write_text("")


def missing_state(step_dir):
    shutil.rmtree(step_dir / "state")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The undamaged run: STEPS steps, a checkpoint after each."""
    out = tmp_path_factory.mktemp("straight")
    run(out)
    return out


@pytest.fixture
def copy(straight, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    return out


DAMAGES = {6: "truncated array data", 5: "empty metadata", 4: "missing state", 3: "NaN moment"}


@pytest.mark.slow
def test_damaged_checkpoints_are_set_aside_and_the_run_resumes_from_the_newest_intact_one(straight, copy, caplog):
    damaged = {}
    for step, damage in DAMAGES.items():
        step_dir = copy / "checkpoints" / str(step)
        if damage == "NaN moment":
            rewrite_moment(copy, step, "mu", with_nan)
        else:
            {"truncated array data": truncate_array_data, "empty metadata": empty_metadata,
             "missing state": missing_state}[damage](step_dir)
        damaged[step] = sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*"))

    with caplog.at_level(logging.WARNING, logger="train.checkpoint"):
        last = run(copy)

    reports = [r.getMessage() for r in caplog.records if r.name == "train.checkpoint"]
    assert len(reports) == len(DAMAGES), reports
    for report, step in zip(reports, DAMAGES, strict=True):  # newest first, one line each
        assert report.startswith(f"checkpoint {step} does not restore (") and "\n" not in report, report
        assert report.endswith(f"; moved to {step}.broken; using checkpoint 2"), report
        aside = copy / "checkpoints" / f"{step}.broken"  # kept as it was found, never deleted
        assert sorted(str(p.relative_to(aside)) for p in aside.rglob("*")) == damaged[step]
    assert "NaN or infinite" in reports[-1]
    assert "JSONDecodeError" in reports[1] or "Expecting value" in reports[1], reports[1]
    assert logged_losses(copy) == logged_losses(straight)  # 1-2 kept, 3-6 again from checkpoint 2: bitwise
    assert last["step"] == STEPS
    ckpt = Checkpointer(copy / "checkpoints", read_only=True)  # orbax still reads the folder, the aside ignored
    assert ckpt.all_steps() == [2, 3, 4, 5, 6]
    ckpt.close()


def test_update_that_makes_the_state_nan_stops_without_saving_and_names_the_last_finite_checkpoint(copy):
    """Checkpoint 3 with one Adam second moment's sign flipped: finite on disk, so it restores; the update of step 4
    takes its square root and makes parameters NaN while step 4's loss and gradient are finite. Before the fix that
    NaN state was saved as checkpoint 4 and the run went on (naming checkpoint 4 "the last good one" when step 5's
    loss came out NaN)."""
    for later in (4, 5, 6):
        shutil.rmtree(copy / "checkpoints" / str(later))  # as if the run had stopped after saving step 3
    rewrite_moment(copy, 3, "nu", sign_flipped)
    with pytest.raises(NonFiniteError) as info:
        run(copy)
    message = str(info.value)
    assert "updated parameters or optimizer state at step 4" in message, message
    assert "stopped without saving" in message and message.endswith("the last finite checkpoint is step 3"), message
    ckpt = Checkpointer(copy / "checkpoints", read_only=True)
    assert ckpt.all_steps() == [2, 3]  # nothing written after the poisoned update
    ckpt.close()
    assert max(logged_losses(copy)) == 3  # the log ends at the checkpoint: step 4 stopped before it was logged


def params_of(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_serving_reads_parameters_only(straight, copy):
    """The newest checkpoint's optimizer entries removed from its tree metadata: the full state no longer restores,
    the parameters still do, and equal the undamaged run's."""
    metadata = copy / "checkpoints" / str(STEPS) / "state" / "_METADATA"
    tree = json.loads(metadata.read_text())
    tree["tree_metadata"] = {k: v for k, v in tree["tree_metadata"].items() if not k.startswith("('opt_state'")}
    metadata.write_text(json.dumps(tree))
    ckpt = Checkpointer(copy / "checkpoints", async_save=False)
    with pytest.raises(ValueError, match="tree structures do not match"):
        ckpt.restore(STEPS, abstract_state())
    ckpt.close()

    cfg, damaged = load_params(copy)
    _, intact = load_params(straight, STEPS)
    assert cfg == CFG
    jax.tree.map(np.testing.assert_array_equal, params_of(damaged), params_of(intact))


def test_reading_a_run_without_checkpoints_creates_nothing(tmp_path):
    (tmp_path / "config.json").write_text(CFG.to_json())
    with pytest.raises(FileNotFoundError, match="has no checkpoints yet"):
        load_params(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_generate_on_a_run_without_checkpoints_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(CFG.to_json())
    result = run_module("scripts.generate", "--run", str(tmp_path), "--prompt", "x",
                        env=child_env(JAX_PLATFORMS="cpu", XLA_FLAGS=""))
    assert result.returncode == 2, tail(result.stderr)
    assert result.stderr.strip().splitlines()[-1] == f"error: {tmp_path} has no checkpoints yet", tail(result.stderr)
    assert "Traceback" not in result.stderr, tail(result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
