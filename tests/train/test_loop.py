"""The training loop on the real corpus: the loss goes down, metrics are written, and a non-finite loss stops the
run naming the step while the last good checkpoint stays intact."""

import math

import jax
import numpy as np
import pytest

from model.presets import get_preset
from train.checkpoint import Checkpointer
from train.config import RunConfig, TrainConfig
from train.loop import NonFiniteError, load_params, train
from train.metrics import read_metrics


def tiny_run(**train_fields) -> RunConfig:
    fields = dict(steps=60, batch_size=8, seq_len=64, warmup_steps=10, log_every=10, eval_every=60,
                  ckpt_every=30, eval_batches=4)
    fields.update(train_fields)
    return RunConfig(model=get_preset("tiny"), train=TrainConfig(**fields))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One 60-step run on the standard library corpus, shared by the tests that only read it: (config, directory,
    last record)."""
    cfg, out = tiny_run(log_every=1), tmp_path_factory.mktemp("run")
    return cfg, out, train(cfg, out)


@pytest.mark.slow
def test_loss_goes_down_on_the_standard_library_corpus(finished_run):
    _, out, last = finished_run
    records = read_metrics(out / "metrics.jsonl")
    train_losses = [r["loss"] for r in records if "loss" in r]
    # A uniform guess over 259 ids costs ln(259) = 5.56 nats; 60 steps of a tiny model learn byte statistics.
    assert train_losses[0] > 5.0
    assert train_losses[-1] < train_losses[0] - 1.5
    assert last["val_bpb"] < 4.6  # below uniform (8.0 bits) and near the corpus's unigram entropy (~4.5)
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(records[-2])
    assert [r["step"] for r in records if "val_loss" in r] == [60]


@pytest.mark.slow
def test_restored_model_reproduces_the_final_evaluation(finished_run):
    cfg, out, last = finished_run
    loaded_cfg, model = load_params(out)
    assert loaded_cfg == cfg
    from model.loss import cross_entropy
    from train.data import batch_at, load_corpus
    from train.loop import EVAL_SEED

    corpus = load_corpus(None)
    losses = []
    for i in range(cfg.train.eval_batches):
        batch = batch_at(corpus.val, seed=EVAL_SEED, step=i, batch_size=8, seq_len=64)
        losses.append(float(cross_entropy(model(batch[:, :-1]), batch[:, 1:])))
    np.testing.assert_allclose(np.mean(losses), last["val_loss"], rtol=1e-6)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    # An absurd learning rate drives the weights to overflow within a few steps.
    cfg = tiny_run(steps=50, lr=1e30, warmup_steps=0, ckpt_every=1, log_every=1)
    with pytest.raises(NonFiniteError, match=r"at step (\d+)") as info:
        train(cfg, tmp_path)
    bad_step = int(info.value.args[0].split("at step ")[1].split(";")[0])
    ckpt = Checkpointer(tmp_path / "checkpoints")
    good = ckpt.latest_step()
    ckpt.close()
    assert good == bad_step - 1
    _, model = load_params(tmp_path, good)
    from flax import nnx

    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in leaves)
    assert math.isfinite(float(np.abs(np.asarray(leaves[0])).max()))


@pytest.mark.slow
def test_resuming_with_a_different_config_is_refused(finished_run):
    _, out, _ = finished_run
    with pytest.raises(ValueError, match=r"train.lr: 0.003 -> 0.001"):
        train(tiny_run(log_every=1, lr=1e-3), out)
