"""`scripts.train --init run:DIR@STEP`: the model config and tokenizer come from the source run, the first
parameters are its checkpoint's (compared with `load_params`, the serving path), and an interrupted --init run
resumes from its own checkpoint even after the source is gone."""

from __future__ import annotations

import shutil

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from parallel.mesh import MeshConfig
from scripts.train import build_config, parse_args
from train.loop import TrainingInterrupted, load_params, train
from train.run_data import initial_state
from train.sharded import plan_mesh


def test_init_from_a_run_starts_from_its_checkpoint_and_resumes_without_it(trained_tiny_run, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(trained_tiny_run, source, ignore=shutil.ignore_patterns("train.lock"))
    argv = ["--init", f"run:{source}@2", "--steps", "2", "--out", str(tmp_path / "tuned"),
            "--set", "train.batch_size=2", "--set", "train.seq_len=32", "--set", "train.eval_batches=1",
            "--set", "train.warmup_steps=0"]
    cfg = build_config(parse_args(argv))
    source_cfg, source_model = load_params(source, 2)
    assert cfg.model == source_cfg.model and cfg.train.tokenizer == f"run:{source}@2"

    optimizer = optax.adamw(1e-3)
    plan = plan_mesh(cfg.model, MeshConfig(data=1), optimizer, micro_batch=2, seq_len=32, devices=jax.devices()[:1])
    params = initial_state(plan, optimizer, cfg)["params"]
    expected = nnx.to_pure_dict(nnx.state(source_model, nnx.Param))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    polls = iter(range(1, 10))
    with pytest.raises(TrainingInterrupted):
        train(cfg, tmp_path / "tuned", devices=jax.devices()[:1], should_stop=lambda: next(polls) >= 1)
    shutil.rmtree(source)  # resuming reads the run's own checkpoint, never the source again
    last = train(cfg, tmp_path / "tuned", devices=jax.devices()[:1])
    assert last["step"] == 2
