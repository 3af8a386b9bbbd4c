"""Multi-head latent attention (model/mla.py) and DeepSeek-V3's layer shapes in the transformer.

References: the absorbed form (`absorbed_attention`: W_UK folded into the query, W_UV into the output, attention
over the latent, no padding) against the module's expanded form (per-head keys and values through the house
attention, v or q/k zero-padded to one head dim): the same function computed two ways, float32, so 1e-5
relative (the house fp32 tolerance; the sums run in different orders). transformers' DeepseekV3 is the external
reference (tests/model/test_hf_deepseek.py). Dense first layers: the scanned stack against the unrolled one
(1e-6: the same ops, in a loop or a scan). The dropless MoE models run eagerly: XLA's CPU compile of their
grouped matmuls takes minutes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.config import MLAConfig, ModelConfig, MoEConfig
from model.layers import rope_tables
from model.mla import MLA, absorbed_attention
from model.transformer import Transformer, create_model, layers_in_turn

BASE = ModelConfig(vocab_size=97, d_model=32, n_layers=3, n_heads=4, d_ff=48, max_seq_len=32, dtype="float32")


def _mla(q_lora_rank: int, v_head_dim: int) -> tuple[MLA, jax.Array, jax.Array, jax.Array]:
    """An MLA module with its norm scales perturbed, inputs [2, 12, 32], and RoPE tables for positions 0..11."""
    mla = MLAConfig(kv_lora_rank=16, q_lora_rank=q_lora_rank, qk_nope_head_dim=8, qk_rope_head_dim=6,
                    v_head_dim=v_head_dim)
    cfg = BASE.replace(mla=mla, init_std=0.2)
    module = MLA(cfg, nnx.Rngs(params=0))
    rng = np.random.default_rng(0)
    for norm in [module.kv_norm] + ([module.q_norm] if q_lora_rank else []):
        norm.scale[...] = norm.scale[...] + jnp.asarray(rng.normal(0, 0.3, norm.scale.shape), jnp.float32)
    x_BxTxD = jnp.asarray(rng.normal(size=(2, 12, cfg.d_model)), jnp.float32)
    cos, sin = rope_tables(jnp.broadcast_to(jnp.arange(12), (2, 12)), mla.qk_rope_head_dim, cfg.rope_theta)
    return module, x_BxTxD, cos, sin


@pytest.mark.parametrize("q_lora_rank,v_head_dim", [(8, 8), (0, 8), (8, 4), (0, 20)],
                         ids=["q-lora", "full-rank-q", "v-narrower-than-qk", "v-wider-than-qk"])
def test_absorbed_attention_equals_expanded(q_lora_rank, v_head_dim):
    module, x_BxTxD, cos, sin = _mla(q_lora_rank, v_head_dim)
    expected_BxTxD, (q_nope, q_pe), (c_BxSxDc, k_pe_BxSxDp) = nnx.jit(
        lambda m: (m(x_BxTxD, cos, sin), m.queries(x_BxTxD, cos, sin), m.latent(x_BxTxD, cos, sin)))(module)
    out_BxTxHxDv = absorbed_attention(q_nope, q_pe, c_BxSxDc, k_pe_BxSxDp, module.wkv_b[...])
    actual_BxTxD = jnp.einsum("bthe,hed->btd", out_BxTxHxDv, module.wo[...])
    scale = float(jnp.abs(expected_BxTxD).max())
    np.testing.assert_allclose(actual_BxTxD, expected_BxTxD, rtol=1e-5, atol=1e-5 * scale)
    # The last 3 queries against all 12 cached latents (a decode-like call): the same rows.
    tail_BxTxHxDv = absorbed_attention(q_nope[:, -3:], q_pe[:, -3:], c_BxSxDc, k_pe_BxSxDp, module.wkv_b[...])
    np.testing.assert_allclose(tail_BxTxHxDv, out_BxTxHxDv[:, -3:], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_mla_model_params_and_gradients():
    cfg = BASE.replace(mla=MLAConfig(kv_lora_rank=16, q_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=6,
                                     v_head_dim=8), n_kv_heads=2, head_dim=14)  # unused by MLA
    model = create_model(cfg)
    shapes = {"/".join(map(str, p)): v.shape for p, v in nnx.to_flat_state(nnx.state(model.blocks.attn, nnx.Param))}
    assert shapes == {"wq_a": (3, 32, 8), "q_norm/scale": (3, 8), "wq_b": (3, 8, 4, 14), "wkv_a": (3, 32, 22),
                      "kv_norm/scale": (3, 16), "wkv_b": (3, 16, 4, 16), "wo": (3, 4, 8, 32)}
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 97, (2, 10)))
    grads = nnx.grad(lambda m: m.loss(tokens[:, :-1], tokens[:, 1:]))(model)
    for path, g in nnx.to_flat_state(grads):
        assert np.isfinite(g[...]).all() and np.abs(g[...]).max() > 0, path


DEEPSEEK_MOE = MoEConfig(n_experts=4, top_k=2, d_ff=16, first_dense_layers=1, n_shared_experts=1, router="sigmoid",
                         dispatch="dropless")


def test_first_dense_layers_and_expert_d_ff():
    model = create_model(BASE.replace(moe=DEEPSEEK_MOE))
    assert model.dense_blocks.mlp.w_gate.shape == (1, 32, 48)  # model.d_ff
    assert model.blocks.mlp.w_gate.shape == (2, 4, 32, 16)  # [L - 1, E, D, moe.d_ff]
    assert model.blocks.mlp.shared.w_gate.shape == (2, 32, 16)  # n_shared_experts * moe.d_ff
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 97, (2, 9)))
    _, router_loss, load_LxE = model.losses_and_load(tokens[:, :-1], tokens[:, 1:])
    assert load_LxE.shape == (2, 4) and router_loss > 0
    np.testing.assert_allclose(load_LxE.sum(axis=-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("mla", [MLAConfig(), MLAConfig(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=6)],
                         ids=["gqa", "mla"])
def test_scanned_stacks_equal_unrolled(mla):
    cfg = BASE.replace(moe=DEEPSEEK_MOE, mla=mla)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 97, (2, 9)))
    unrolled = create_model(cfg, seed=4)(tokens)
    scanned = create_model(cfg.replace(scan_layers=True), seed=4)(tokens)
    np.testing.assert_allclose(scanned, unrolled, rtol=1e-6, atol=1e-6)


def test_first_dense_layers_refuse_a_pipelined_stack():
    with pytest.raises(ValueError, match=r"model\.moe\.first_dense_layers \(1\) with a pipelined layer stack"):
        Transformer(BASE.replace(moe=DEEPSEEK_MOE), rngs=nnx.Rngs(0), layer_stack=layers_in_turn)
