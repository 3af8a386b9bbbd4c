"""Sequence-parallel attention (`parallel/ring_attention.py`, `parallel/ulysses.py`) on fake CPU devices
against plain attention over the whole, unsharded sequence: outputs and dQ/dK/dV (float32 to 1e-5 relative:
only the order of the softmax sums changes), then whole models on a mesh with a sequence axis against the same
model on one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from model.attention import reference_attention
from model.presets import get_preset
from parallel.mesh import parse_mesh
from parallel.ring_attention import ring_attention
from parallel.ulysses import ulysses_attention
from tests.parallel.mesh_grads import on_mesh, one_device

N = 4  # devices on the sequence axis
SEQ = P(None, "sequence", None, None)


def sequence_mesh():
    return jax.make_mesh((N,), ("sequence",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:N])


def qkv(H: int, K: int, T: int = 32, B: int = 2, D: int = 16, dtype=jnp.float32, seed: int = 0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q, k, v, do = (jax.random.normal(key, (B, T, h, D)) for key, h in zip(ks, (H, K, K, H), strict=True))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), do.astype(dtype)


def out_and_grads(attend, q, k, v, do):
    """attend's output and the gradients of <attend(q, k, v), do> in q, k, v."""
    out, vjp = jax.vjp(attend, q, k, v)
    return (out, *vjp(do))


def sharded(local, **kwargs):
    fn = lambda q, k, v: local(q, k, v, axis_name="sequence", axis_size=N, **kwargs)  # noqa: E731
    return jax.jit(jax.shard_map(fn, mesh=sequence_mesh(), in_specs=(SEQ,) * 3, out_specs=SEQ, check_vma=False))


def assert_matches_whole_sequence(attend, q, k, v, do, causal: bool, rtol: float = 1e-5):
    whole = jax.jit(lambda q, k, v: reference_attention(q, k, v, causal=causal))
    for got, ref in zip(out_and_grads(attend, q, k, v, do), out_and_grads(whole, q, k, v, do), strict=True):
        got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
        np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * np.abs(ref).max())


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("H,K", [(4, 4), (4, 1)])
def test_ring(causal, H, K):
    q, k, v, do = qkv(H, K)
    attend = sharded(ring_attention, causal=causal, interpret=True)
    assert_matches_whole_sequence(attend, q, k, v, do, causal)


def test_ring_bfloat16_gqa8_ragged_chunks():
    """bf16 inputs, float32 merges and gradient accumulators: within bf16 rounding of float32 attention over the
    rounded inputs. Chunks of 5 tokens leave every flash tile ragged."""
    q, k, v, do = qkv(8, 1, T=20, dtype=jnp.bfloat16, seed=1)
    attend = sharded(ring_attention, causal=True, interpret=True)
    assert_matches_whole_sequence(attend, q, k, v, do, causal=True, rtol=2e-2)


def test_ring_passes_kv_around_and_gathers_nothing():
    q, k, v, _ = qkv(4, 2)
    hlo = sharded(ring_attention, causal=True, interpret=True).lower(q, k, v).compile().as_text()
    assert "collective-permute" in hlo
    assert "all-gather" not in hlo and "all-to-all" not in hlo


@pytest.mark.parametrize("H,K", [(4, 2), (8, 4)])  # K < N repeats K/V per query head; K = N splits them
def test_ulysses(H, K):
    q, k, v, do = qkv(H, K)
    attend = sharded(ulysses_attention, causal=True, interpret=True)
    assert_matches_whole_sequence(attend, q, k, v, do, causal=True)
    assert "all-to-all" in attend.lower(q, k, v).compile().as_text()


def test_ulysses_needs_heads_divisible_by_the_sequence_axis():
    q, k, v, _ = qkv(H=6, K=2)
    with pytest.raises(ValueError, match="6 query heads on this device 4 ways"):
        sharded(ulysses_attention, causal=True, interpret=True)(q, k, v)
    cfg = get_preset("tiny").replace(n_heads=6, n_kv_heads=2, attention_impl="ulysses")
    with pytest.raises(ValueError, match=r"heads \(model.n_heads / mesh.tensor = 6\) over mesh.sequence \(4\)"):
        parse_mesh("data=2,sequence=4").validate_for(cfg, micro_batch=2, seq_len=16)


@pytest.mark.parametrize("impl", [pytest.param("ring", marks=pytest.mark.slow), "ulysses"])
def test_model_on_a_sequence_mesh_matches_one_device(impl):
    """The loss and every gradient of a 2-layer model with its sequence split 4 ways (and the batch 2 ways)."""
    cfg = get_preset("tiny").replace(dtype="float32")
    tokens = jax.random.randint(jax.random.key(7), (2, 17), 0, cfg.vocab_size)
    loss_ref, _, grads_ref = one_device(cfg, tokens)
    loss, _, grads = on_mesh(cfg.replace(attention_impl=impl), tokens, parse_mesh("data=2,sequence=4"))
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads, grads_ref)
