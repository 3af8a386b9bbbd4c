"""The training loop on device meshes (8 fake CPU devices): batches assembled from per-device shards equal the
single-host batch; a run on data=2,fsdp=2,tensor=2 logs the losses of a one-device run; a checkpoint saved on
data=8 restores bit for bit onto fsdp=4,tensor=2, and the run resumed there logs the uninterrupted run's losses.

Tolerance: a mesh only reorders float32 sums (all-reduce, reduce-scatter), so losses agree to rtol 1e-5.
"""

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from model.presets import get_preset
from parallel.mesh import make_mesh, parse_mesh
from train.checkpoint import Checkpointer
from train.config import RunConfig, TrainConfig
from train.data import batch_at, windows_at
from train.loop import train
from train.optimizer import make_optimizer
from train.sharded import global_batch, plan_mesh


def run_cfg(mesh: str, **fields) -> RunConfig:
    train_fields = dict(steps=4, batch_size=8, seq_len=32, grad_accum=2, warmup_steps=1, log_every=1,
                        eval_every=4, eval_batches=2, ckpt_every=2, keep_checkpoints=5)
    train_fields.update(fields)
    return RunConfig(model=dataclasses.replace(get_preset("tiny"), dtype="float32"),
                     train=TrainConfig(**train_fields), mesh=parse_mesh(mesh))


def logged(run_dir, key="loss") -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


def test_windows_at_reads_the_rows_of_batch_at():
    tokens = np.arange(10_000, dtype=np.uint16)
    full = batch_at(tokens, seed=3, step=7, batch_size=8, seq_len=16)
    np.testing.assert_array_equal(windows_at(tokens, seed=3, step=7, batch_size=8, seq_len=16, rows=[5, 1]),
                                  full[[5, 1]])


def test_global_batch_equals_the_host_batch_on_every_layout():
    tokens = np.arange(50_000, dtype=np.uint16) % 259
    expected = batch_at(tokens, seed=1, step=3, batch_size=8, seq_len=16).reshape(2, 4, 17)
    for mesh_text, spec in (("data=2,fsdp=2,tensor=2", P(None, ("data", "fsdp"))), ("fsdp=4,tensor=2", P(None, "fsdp")),
                            ("data=8", P(None, None, None))):
        sharding = NamedSharding(make_mesh(parse_mesh(mesh_text)), spec)
        batch = global_batch(tokens, sharding, (2, 4, 17), seed=1, step=3)
        assert batch.sharding == sharding
        np.testing.assert_array_equal(np.asarray(batch), expected)


@pytest.mark.slow
def test_mesh_run_matches_one_device(tmp_path):
    one = train(run_cfg("data=1", steps=3), tmp_path / "one", devices=jax.devices()[:1])
    mesh = train(run_cfg("data=2,fsdp=2,tensor=2", steps=3), tmp_path / "mesh")
    ref, got = logged(tmp_path / "one"), logged(tmp_path / "mesh")
    assert sorted(got) == [1, 2, 3]
    np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)], rtol=1e-5)
    np.testing.assert_allclose(mesh["val_loss"], one["val_loss"], rtol=1e-5)


@pytest.mark.slow
def test_checkpoint_saved_on_data8_resumes_on_a_pipeline(tmp_path):
    """A data-parallel checkpoint restored onto fsdp=2,stage=2,tensor=2 (layers split over the 2 pipeline stages)
    continues with the losses of the run that never stopped."""
    straight = tmp_path / "straight"
    train(run_cfg("data=8", grad_accum=1), straight)

    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")  # as if the data=8 run had stopped after saving step 2

    # Restoring step 2 onto the new mesh gives the saved arrays exactly, in the new shardings.
    cfg = run_cfg("fsdp=2,stage=2,tensor=2", grad_accum=1)
    optimizer = make_optimizer(cfg.train)
    plans = {m: plan_mesh(cfg.model, parse_mesh(m), optimizer, micro_batch=8, seq_len=32)
             for m in ("data=8", "fsdp=2,stage=2,tensor=2")}
    ckpt = Checkpointer(resumed / "checkpoints", async_save=False)
    states = {m: ckpt.restore(2, plan.abstract_state(optimizer))[0] for m, plan in plans.items()}
    ckpt.close()
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), *states.values())
    wq = states["fsdp=2,stage=2,tensor=2"]["params"]["blocks"]["attn"]["wq"]
    assert wq.addressable_shards[0].data.size * 8 == wq.size  # [layers/stage, embed/fsdp, heads/tensor, head_dim]

    train(cfg, resumed)
    ref, got = logged(straight), logged(resumed)
    assert sorted(got) == [1, 2, 3, 4]  # steps 1-2 from the data=8 run, 3-4 from the resumed one
    np.testing.assert_allclose([got[s] for s in (3, 4)], [ref[s] for s in (3, 4)], rtol=1e-5)
    np.testing.assert_allclose(logged(resumed, "val_loss")[4], logged(straight, "val_loss")[4], rtol=1e-5)
