"""Multi-token prediction (DeepSeek-V3): D sequential modules on top of the main model, the k-th predicting the
token k + 1 positions after each position, sharing the model's embedding and LM head.

Module k takes the previous depth's hidden state h^(k-1)_i (the main model's last block output for k = 1) and the
embedding of token t_(i+k), and computes h^k_i = Block(W_proj [RMSNorm(Emb(t_(i+k))); RMSNorm(h^(k-1)_i)]) over
the positions that still have a target (the sequence shortens by one per depth), causally, as the main model does;
its own RMSNorm and the shared head give logits for t_(i+k+1). The embedding comes first in the concatenation, as
in DeepSeek's checkpoints (`eh_proj`). Training adds the weight x the mean of the D modules' cross-entropies to the
objective; at inference they are unused (or draft tokens: each depth proposes one more).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from model import axes
from model.config import ModelConfig
from model.layers import RMSNorm, normal, param


class MTPModule(nnx.Module):
    """One depth: the two input norms, the projection from [embedding; hidden] to d_model, a transformer block
    (given: the main model's kind of block), and the output norm."""

    def __init__(self, cfg: ModelConfig, block: nnx.Module, rngs: nnx.Rngs):
        d, pd = cfg.d_model, cfg.weight_dtype
        self.embed_norm = RMSNorm(d, cfg.norm_eps, pd, rngs)
        self.hidden_norm = RMSNorm(d, cfg.norm_eps, pd, rngs)
        self.proj = param(rngs, normal(cfg.init_std), (2 * d, d), (None, axes.EMBED), pd)
        self.block = block
        self.norm = RMSNorm(d, cfg.norm_eps, pd, rngs)
        self.dtype = cfg.compute_dtype

    def __call__(self, h_BxTxD: jax.Array, e_BxTxD: jax.Array, cos: jax.Array, sin: jax.Array,
                 attend: Callable | None) -> tuple[jax.Array, jax.Array]:
        """(this depth's hidden states [B, T, D] before its output norm, its block's MoE router loss)."""
        x_BxTx2D = jnp.concatenate([self.embed_norm(e_BxTxD), self.hidden_norm(h_BxTxD)], axis=-1)
        x_BxTxD = jnp.einsum("btk,kd->btd", x_BxTx2D.astype(self.dtype), self.proj[...].astype(self.dtype))
        x_BxTxD = axes.constrain(x_BxTxD, (axes.BATCH, axes.LENGTH, axes.EMBED))
        x_BxTxD, (router_loss, _) = self.block(x_BxTxD, cos, sin, attend)
        return x_BxTxD, router_loss


def mtp_targets(tokens_BxT: jax.Array, targets_BxT: jax.Array, depth: int) -> tuple[jax.Array, jax.Array]:
    """What depth k (1-based) reads and predicts over the first T - k positions: (the tokens t_(i+k) it embeds,
    the targets t_(i+k+1)), given the main model's inputs t_i and targets t_(i+1)."""
    return tokens_BxT[:, depth:], targets_BxT[:, depth:]
