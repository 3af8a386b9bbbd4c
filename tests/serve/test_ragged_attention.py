"""The ragged step's attention (decode tokens, then prefill tiles, every row through its own block table) against
an independent reference: `model.attention.reference_attention` over each row's dense, causal sequence. Rows mix
decodes and chunks that start mid-sequence (a prefix already cached), chunk lengths that do not fill their last
tile, shuffled pages, and NaN everywhere no live token is (null page, free pages, page tails, pad slots).
Tolerance float32 1e-5 (both accumulate in float32, only the summation order differs)."""

import jax.numpy as jnp
import numpy as np
import pytest

from model.attention import reference_attention
from serve.ragged_attention import ragged_paged_attention, resolve_decode_impl
from serve.step_batch import Row, StepLayout, build_step

P, K, G, D = 4, 2, 3, 16
# (tokens already cached before this step, tokens computed this step): decodes compute 1
DECODES = [(9, 1), (0, 1), (22, 1)]
PREFILLS = [(0, 13), (8, 3), (5, 1), (0, 32)]


@pytest.mark.parametrize("decode_impl", ["reference", "pallas"])
@pytest.mark.parametrize("with_decodes, with_prefills", [(True, True), (True, False), (False, True)])
def test_each_token_sees_exactly_its_rows_causal_prefix(decode_impl, with_decodes, with_prefills):
    rng = np.random.default_rng(0)
    rows = (DECODES if with_decodes else []) + (PREFILLS if with_prefills else [])
    totals = [cached + new for cached, new in rows]
    n_pages = 1 + sum(-(-n // P) for n in totals) + 2
    k_pool = np.full((K, n_pages, P, D), np.nan, np.float32)
    v_pool = np.full_like(k_pool, np.nan)
    free = list(rng.permutation(np.arange(1, n_pages)))
    dense_k, dense_v, specs = [], [], []
    for cached, new in rows:
        n = cached + new
        table = [int(free.pop()) for _ in range(-(-n // P))]
        keys, values = rng.normal(size=(2, n, K, D)).astype(np.float32)
        for t in range(n):
            k_pool[:, table[t // P], t % P], v_pool[:, table[t // P], t % P] = keys[t], values[t]
        dense_k.append(keys)
        dense_v.append(values)
        specs.append(Row(list(range(new)), cached, table))
    n_dec = len(DECODES) if with_decodes else 0
    layout = StepLayout(page_size=P, max_decode_rows=4, tile=8, min_pages=1, max_pages=16)
    inputs, _, slots = build_step(specs[:n_dec], specs[n_dec:], layout)
    q = rng.normal(size=(len(inputs.tokens_T), K * G, D)).astype(np.float32)
    out = np.asarray(ragged_paged_attention(
        jnp.asarray(q), jnp.asarray(k_pool), jnp.asarray(v_pool), jnp.asarray(inputs.positions_T),
        jnp.asarray(inputs.decode_tables_BxW), jnp.asarray(inputs.decode_lengths_B),
        jnp.asarray(inputs.tile_tables_NtxW), jnp.asarray(inputs.tile_lengths_Nt), decode_impl=decode_impl))
    assert np.isfinite(out).all()
    covered = np.zeros(len(q), bool)
    for spec, slot, keys, values in zip(specs, slots, dense_k, dense_v, strict=True):
        new = len(spec.token_ids)
        at = inputs.last_Rs[slot] - new + 1  # the row's tokens sit contiguously, ending at its slot's last index
        n = spec.start + new
        q_row = np.zeros((1, n, K * G, D), np.float32)
        q_row[0, spec.start:] = q[at:at + new]
        expected = reference_attention(jnp.asarray(q_row), jnp.asarray(keys)[None], jnp.asarray(values)[None])
        np.testing.assert_allclose(out[at:at + new], np.asarray(expected)[0, spec.start:], rtol=1e-5, atol=1e-5)
        covered[at:at + new] = True
    assert not out[~covered].any()  # pad tokens and pad rows: zeros


def test_auto_is_pallas_on_gpu_only():
    assert resolve_decode_impl("auto", "gpu") == "pallas"
    assert resolve_decode_impl("auto", "cpu") == resolve_decode_impl("reference") == "reference"
    with pytest.raises(ValueError, match="decode_impl must be one of .* got 'flash'"):
        resolve_decode_impl("flash")
