"""Two local processes x 4 CPU devices (gloo collectives), started by scripts.launch_local, train three steps on
data=2,fsdp=2,tensor=2 and log the losses of the same run in one process over 8 devices; the checkpoint the two
processes wrote restores in this single process and equals the single-process run's.

Tolerance: the same global computation partitioned the same way, so losses agree to rtol 1e-5 (they are equal
bit for bit on this machine). Gloo sums in another order than the in-process all-reduce, and three AdamW steps
(lr 3e-3 after one warm-up step) turn last-bit gradient differences into parameter differences of up to ~1e-5
relative; the parameters are compared to rtol 1e-4, atol 1e-6."""

import dataclasses
import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from model.presets import get_preset
from parallel.mesh import parse_mesh
from tests.subprocesses import HANG_LIMIT_S, child_env, run_module, tail
from train.config import RunConfig, TrainConfig
from train.loop import load_params, train

SETTINGS = {"train.steps": 3, "train.batch_size": 8, "train.seq_len": 32, "train.grad_accum": 2,
            "train.warmup_steps": 1, "train.log_every": 1, "train.eval_every": 3, "train.eval_batches": 2,
            "train.ckpt_every": 3, "model.dtype": "float32"}


def losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.mark.slow  # a whole run in child processes: make test-slow (CI runs it)
def test_two_processes_match_one_process(tmp_path):
    sets = [arg for key, value in SETTINGS.items() for arg in ("--set", f"{key}={value}")]
    command = [sys.executable, "-m", "scripts.train", "--preset", "tiny", "--mesh", "data=2,fsdp=2,tensor=2",
               "--log-level", "WARNING", "--out", str(tmp_path / "two"), *sets]
    # The launcher's own limit comes first, so a hung collective still ends with both processes' output.
    result = run_module("scripts.launch_local", "-n", "2", "--cpu-devices", "4", "--timeout", str(HANG_LIMIT_S - 60),
                        "--", *command, env=child_env())
    assert result.returncode == 0, tail(result.stdout)
    assert "[0] mesh: data=2,fsdp=2,tensor=2 over 8 devices in 2 process(es)" in result.stdout, tail(result.stdout)
    assert "done: step 3" in result.stdout

    train_fields = {k.split(".")[1]: v for k, v in SETTINGS.items() if k.startswith("train.")}
    cfg = RunConfig(model=dataclasses.replace(get_preset("tiny"), dtype="float32"),
                    train=TrainConfig(**train_fields), mesh=parse_mesh("data=2,fsdp=2,tensor=2"))
    train(cfg, tmp_path / "one")
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5)

    two_cfg, two_model = load_params(tmp_path / "two")
    _, one_model = load_params(tmp_path / "one")
    assert two_cfg == cfg
    two, one = (nnx.to_pure_dict(nnx.state(m, nnx.Param)) for m in (two_model, one_model))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6), two, one)
    assert jax.tree.leaves(two)[0].sharding.device_set == {jax.local_devices()[0]}
