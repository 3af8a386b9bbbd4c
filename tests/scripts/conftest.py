"""Commands run by these tests keep JAX's persistent compilation cache in a temporary folder, never in the real
home (scripts.generate and scripts.bench_serving turn the cache on by default; $MESHLM_COMPILATION_CACHE moves it,
for the commands run in this process and for the child processes they start). `trained_tiny_run` is the run that
the generate and export tests read (trained once per session: nothing writes to it)."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def compilation_cache_in_a_temporary_folder(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MESHLM_COMPILATION_CACHE", str(tmp_path_factory.mktemp("jax-compilation-cache")))
        yield


@pytest.fixture(scope="session")
def trained_tiny_run(tmp_path_factory):
    """A freshly trained tiny run: 2 steps, float32, one device."""
    import dataclasses

    import jax

    from model.presets import get_preset
    from parallel.mesh import MeshConfig
    from train.config import RunConfig, TrainConfig
    from train.loop import train

    out = tmp_path_factory.mktemp("run")
    cfg = RunConfig(model=dataclasses.replace(get_preset("tiny"), dtype="float32"),
                    train=TrainConfig(steps=2, batch_size=2, seq_len=32, eval_every=2, eval_batches=1, ckpt_every=2),
                    mesh=MeshConfig(data=1))
    train(cfg, out, devices=jax.devices()[:1])
    return out
