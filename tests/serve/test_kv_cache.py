"""The KV cache's sizes against scaling.accounting's independent KV formula, the budget arithmetic and its errors,
and the slot mapping plus page writes against a hand-placed reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config import MLAConfig
from model.presets import get_preset
from scaling.accounting import kv_cache_bytes
from serve.kv_cache import CacheShape, init_cache, pages_for_budget, slots, write_pages

CFG = get_preset("tiny")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_page_bytes_match_the_accounting(dtype):
    shape = CacheShape.for_model(CFG, page_size=16, num_pages=10, dtype=dtype)
    assert shape.bytes_per_page == kv_cache_bytes(CFG, 16, dtype)
    cache = init_cache(shape)
    assert sum(x.nbytes for x in jax.tree.leaves(cache)) == shape.total_bytes == 10 * shape.bytes_per_page


def test_budget_buys_whole_pages_and_errors_name_the_budget():
    per_page = kv_cache_bytes(CFG, 8, "float32")
    assert pages_for_budget(CFG, 8, memory_bytes=7 * per_page + per_page // 2, dtype="float32") == 7
    with pytest.raises(ValueError, match=f"budget of {per_page:,} bytes holds 1 pages"):
        pages_for_budget(CFG, 8, memory_bytes=per_page, dtype="float32")
    with pytest.raises(ValueError, match="exactly one of memory_bytes and memory_fraction"):
        pages_for_budget(CFG, 8)
    with pytest.raises(ValueError, match=r"memory_fraction must be in \(0, 1\], got 1.5"):
        pages_for_budget(CFG, 8, memory_fraction=1.5)
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="does not report its memory"):
            pages_for_budget(CFG, 8, memory_fraction=0.5)


def test_slots_and_writes_land_where_the_block_table_says():
    table = [5, 2, 7]
    pages, offsets = slots(table, np.array([0, 3, 4, 9]), page_size=4)
    assert pages.tolist() == [5, 5, 2, 7] and offsets.tolist() == [0, 3, 0, 1]
    pool = jnp.zeros((2, 8, 4, 3))  # [kv_heads, pages, page_size, head_dim]
    new = jnp.arange(1 * 4 * 2 * 3, dtype=jnp.float32).reshape(1, 4, 2, 3) + 1  # [B, T, K, D]
    out = np.asarray(write_pages(pool, new, jnp.asarray(pages)[None], jnp.asarray(offsets)[None]))
    expected = np.zeros((2, 8, 4, 3), np.float32)
    for t, (page, offset) in enumerate(zip(pages, offsets, strict=True)):
        expected[:, page, offset] = np.asarray(new[0, t])
    np.testing.assert_array_equal(out, expected)


def test_an_mla_model_caches_its_latent_and_rotary_key_per_token():
    """DeepSeek-V3 (transformers' default config is its published one) in bfloat16: 61 x (512 + 64) x 2 bytes a
    token, as the issue states and scaling.accounting counts; a small MLA cache allocates what it says."""
    import transformers  # noqa: PLC0415 (the hf extra)

    from model.hf import config_from_hf  # noqa: PLC0415

    v3 = config_from_hf(transformers.DeepseekV3Config().to_dict())
    shape = CacheShape.for_model(v3, page_size=64, num_pages=2, dtype="bfloat16")
    assert shape.bytes_per_page == 64 * 61 * (512 + 64) * 2 == kv_cache_bytes(v3, 64, "bfloat16")
    small = CFG.replace(mla=MLAConfig(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8))
    shape = CacheShape.for_model(small, page_size=8, num_pages=5)
    cache = init_cache(shape)
    assert cache.k.shape == (1, small.n_layers * 5, 8, 16) and cache.v.shape == (1, small.n_layers * 5, 8, 4)
    assert sum(x.nbytes for x in jax.tree.leaves(cache)) == shape.total_bytes == kv_cache_bytes(small, 8 * 5, "float32")
