"""A DeepSeek-V3-shaped model (multi-head latent attention, a dense first layer, then sigmoid-routed MoE layers
with a shared expert and their own expert width) on a data x fsdp x tensor mesh computes what one device computes:
tensor parallelism splits MLA's heads, FSDP its d_model rows. float32 throughout, so the objective to 1e-5 and
the gradients to 1e-4 relative (the reductions run in other orders on the mesh)."""

import jax
import pytest

from model.config import MLAConfig, MoEConfig
from model.presets import get_preset
from parallel.mesh import parse_mesh
from tests.parallel.mesh_grads import assert_mesh_matches_one_device

DEEPSEEK = get_preset("tiny").replace(
    dtype="float32", n_layers=3, n_kv_heads=4, attention_impl="xla",
    mla=MLAConfig(kv_lora_rank=16, q_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8),
    moe=MoEConfig(n_experts=4, top_k=2, d_ff=16, first_dense_layers=1, n_shared_experts=1, router="sigmoid",
                  n_group=2, topk_group=1, routed_scaling_factor=2.0, capacity_factor=2.0))


@pytest.mark.slow  # ~50 s on 2 cores: two compiles of forward and backward, one of them on 8 devices
def test_mla_deepseek_model_on_a_mesh_matches_one_device():
    tokens = jax.random.randint(jax.random.key(5), (8, 13), 0, DEEPSEEK.vocab_size)
    hlo = assert_mesh_matches_one_device(DEEPSEEK, tokens, "data=2,fsdp=2,tensor=2", terms=("router_loss",),
                                         with_hlo=True).hlo
    assert "all-reduce" in hlo or "reduce-scatter" in hlo  # the heads' partial outputs meet


def test_mesh_checks_for_deepseek_shapes():
    parse_mesh("tensor=4").validate_for(DEEPSEEK.replace(n_kv_heads=2), micro_batch=4)  # MLA: n_kv_heads unused
    with pytest.raises(ValueError, match=r"model.moe.first_dense_layers \(1\) with mesh.stage \(3\)"):
        parse_mesh("stage=3").validate_for(DEEPSEEK, micro_batch=3)


@pytest.mark.slow  # ~60 s on 2 cores
def test_mla_model_in_a_pipeline_matches_one_device():
    """MLA blocks (no dense first layers: a pipeline takes one stack) over data x stage x tensor, against one device
    averaging the pipeline's micro-batches."""
    cfg = DEEPSEEK.replace(n_layers=2, moe=MoEConfig())
    tokens = jax.random.randint(jax.random.key(5), (4, 13), 0, cfg.vocab_size)
    assert_mesh_matches_one_device(cfg, tokens, "data=2,stage=2,tensor=2", micro_batches=2, grads_atol=1e-6)
