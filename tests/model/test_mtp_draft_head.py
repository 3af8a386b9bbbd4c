"""A draft head of style "mtp" (model/draft_head.py `mtp_draft_head`) is the target's own depth-1 multi-token
prediction module (model/mtp.py): its logits over the pairs [h_i, e(t_(i+1))] equal the model's depth-1 MTP logits
on the same tokens (float32: the same operations on the same arrays, so to rounding, 1e-5), for a dense and an MoE
target; its first cache-free draft is the argmax of those logits; a model without MTP is refused by name."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.config import MoEConfig
from model.draft_head import DraftHead, DraftHeadConfig, draft_tokens, mtp_draft_head
from model.presets import get_preset
from model.transformer import create_model, for_inference

CFG = get_preset("tiny").replace(dtype="float32", mtp_depth=1, max_seq_len=32, init_std=0.1)
MOE = CFG.replace(mtp_depth=2, moe=MoEConfig(n_experts=4, top_k=2, router="sigmoid", bias_update_rate=0.01))
T = 12


@jax.jit
def model_mtp_logits(model, tokens_BxT):
    """The model's own depth-1 MTP logits [B, T - 1, V] (pair i predicts t_(i+2))."""
    return model.mtp_logits(model.hidden(tokens_BxT), tokens_BxT)[0][0]


@jax.jit
def head_logits(head, model, tokens_BxT):
    """The head over pairs (h_i, e(t_(i+1))), i < T - 1, at positions 0..T-2, through `DraftHead.logits`."""
    n = tokens_BxT.shape[1] - 1
    positions_BxN = jnp.broadcast_to(jnp.arange(n), (tokens_BxT.shape[0], n))
    g = head(model.hidden(tokens_BxT)[:, :n], model.embed_tokens(tokens_BxT[:, 1:]), positions_BxN)
    return head.logits(model, g)


@pytest.mark.parametrize("cfg", [CFG, MOE], ids=["dense", "moe"])
def test_the_mtp_head_reproduces_the_models_depth_1_mtp_logits(cfg):
    model = create_model(cfg, seed=1)
    head = mtp_draft_head(model)
    assert head.cfg.style == "mtp" and not head.cfg.fc_bias
    assert isinstance(head.mtp.block.mlp, type(model.mtp[0].block.mlp))  # an MoE block for an MoE target
    assert head.mtp.proj.get_value() is model.mtp[0].proj.get_value()  # the module's own arrays, not copies
    tokens = jax.random.randint(jax.random.key(0), (2, T), 0, cfg.vocab_size)
    want = model_mtp_logits(model, tokens)
    got = head_logits(head, model, tokens)
    assert got.shape == want.shape == (2, T - 1, cfg.vocab_size)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_served_moe_model_keeps_its_mtp_head_dropless():
    """The engine builds the head from `for_inference(model)`: its MoE block then dispatches dropless too."""
    head = mtp_draft_head(for_inference(create_model(MOE, seed=1)))
    assert head.cfg.block_config.moe.dispatch == "dropless"


def test_the_first_cache_free_draft_is_the_argmax_of_the_mtp_logits():
    model = create_model(CFG, seed=2)
    head = mtp_draft_head(model)
    tokens_1xT = jax.random.randint(jax.random.key(1), (1, T), 0, CFG.vocab_size)
    features_TxD = model.hidden(tokens_1xT[:, :-1])[0]  # h_0 .. h_(T-2); pair T-2 predicts t_T
    drafts, _ = jax.jit(draft_tokens, static_argnums=4)(head, model, features_TxD, tokens_1xT[0], 3)
    assert int(drafts[0]) == int(jnp.argmax(model_mtp_logits(model, tokens_1xT)[0, -1]))


def test_a_model_without_mtp_is_refused_by_name():
    with pytest.raises(ValueError, match="mtp_depth"):
        mtp_draft_head(create_model(CFG.replace(mtp_depth=0), seed=0))


def test_the_mtp_style_has_no_bias_and_round_trips():
    with pytest.raises(ValueError, match="fc_bias"):
        DraftHeadConfig(CFG, style="mtp")
    with pytest.raises(ValueError, match="style"):
        DraftHeadConfig(CFG, style="medusa")
    cfg = DraftHeadConfig(CFG, fc_bias=False, style="mtp")
    assert DraftHeadConfig.from_dict(cfg.to_dict()) == cfg
    assert DraftHeadConfig.from_dict({"target": CFG.to_dict()}).style == "eagle"  # heads saved before styles
    assert dataclasses.replace(cfg.block_config, moe=MoEConfig()) == cfg.block_config  # dense target: dense block
    head = DraftHead(cfg, rngs=nnx.Rngs(params=0))
    assert hasattr(head, "mtp") and not hasattr(head, "fc")
