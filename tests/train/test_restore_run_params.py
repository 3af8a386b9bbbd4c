"""train/checkpoint.py's restore_run_params (the one restore of a run's parameters behind `load_params` and
`--init run:DIR[@STEP]`), on a run folder of tiny hand-made states: the arrays must come back as saved, the
newest acceptable step must be chosen, and a bad step or an empty run must be refused by name."""

import jax.numpy as jnp
import numpy as np
import pytest

from train.checkpoint import Checkpointer, restore_run_params
from train.pretrained import _restore_run_params


def _state(step: int) -> dict:
    return {"params": {"w": jnp.arange(6.0).reshape(2, 3) * step, "b": jnp.full((3,), float(step))},
            "opt_state": {"mu": jnp.zeros((2, 3))}}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    ckpt = Checkpointer(run / "checkpoints", async_save=False)
    for step in (1, 2):
        ckpt.save(step, _state(step), {"step": step})
    ckpt.close()
    return run


def _expect(params: dict, step: int) -> None:
    np.testing.assert_array_equal(params["w"], np.arange(6.0).reshape(2, 3) * step)
    np.testing.assert_array_equal(params["b"], np.full((3,), float(step)))


def test_a_named_step_and_the_newest_restore_as_saved(run):
    like = _state(0)["params"]
    step, params = restore_run_params(run, 1, like)
    assert step == 1
    _expect(params, 1)
    step, params = restore_run_params(run, None, like)
    assert step == 2
    _expect(params, 2)


def test_the_newest_step_the_problem_refuses_is_passed_over_and_left_in_place(run):
    step, params = restore_run_params(run, None, _state(0)["params"],
                                      lambda p: "step 2's values" if float(p["b"][0]) == 2.0 else None)
    assert step == 1
    _expect(params, 1)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1", "2"]


def test_a_missing_step_and_an_empty_run_are_named(run, tmp_path):
    like = _state(0)["params"]
    with pytest.raises(FileNotFoundError, match=r"has no checkpoint at step 3 \(it has steps \[1, 2\]\)"):
        restore_run_params(run, 3, like)
    with pytest.raises(FileNotFoundError, match=f"^--init run:{run}@3: {run} has no checkpoint at step 3"):
        _restore_run_params(run, 3, like)
    with pytest.raises(FileNotFoundError, match=f"^--init run:{tmp_path}: {tmp_path} has no checkpoints yet$"):
        _restore_run_params(tmp_path, None, like)
    assert list(tmp_path.iterdir()) == []
