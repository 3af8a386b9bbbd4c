"""Multi-head latent attention (MLA; DeepSeek-V2, DeepSeek-V3): keys and values through a low-rank latent.

Per token, x [D] -> the latent c = RMSNorm(x W_DKV) [Dc] and one rotary key k_p = RoPE(x W_KR) [Dp] shared by
all heads. Each head h expands the latent to its plain key k_n = c W_UK[h] [Dn] and value v = c W_UV[h] [Dv].
Queries: q = RMSNorm(x W_DQ) W_UQ (`q_lora_rank > 0`) or x W_Q, per head [Dn plain | Dp rotary]. Head h scores
(q_n . k_n + RoPE(q_p) . k_p) / sqrt(Dn + Dp), times YaRN's mscale^2 under scaled RoPE (`softmax_scale`); its
output softmax . v goes through W_O.

The training and prefill path (`MLA`) expands k and v per head and runs the model's ordinary attention (the
house implementations take one head dim for q, k and v, so v is zero-padded to Dn + Dp, or q and k to Dv, and
the output cut back). `absorbed_attention` computes the same from the latent alone, folding W_UK into the query
and W_UV into the output: scores = (q_n W_UK^T) . c + q_p . k_p, out = (softmax . c) W_UV. A cache then holds
Dc + Dp numbers per token instead of H (Dn + Dp + Dv): the form a decode step uses.

RoPE is the house "rotate half" convention (model/layers.py); DeepSeek's checkpoints rotate interleaved pairs,
which model/hf_deepseek.py turns into this by permuting the rotary rows of W_Q / W_UQ and W_KR on import.

Shape letters beyond model/kernels/flash_attention.py's legend: Dq the query latent (q_lora_rank), Dc the
key/value latent (kv_lora_rank), Dn the plain (no-position) query/key dims, Dp the rotary ones, Dk = Dn + Dp,
Dv the value dims.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from model import axes
from model.attention import attention
from model.config import ModelConfig
from model.layers import RMSNorm, apply_rope, normal, param

if TYPE_CHECKING:
    from model.transformer import Attend


def softmax_scale(cfg: ModelConfig) -> float:
    """MLA's softmax scale 1/sqrt(Dn + Dp) (a query/key head's width before absorption), times YaRN's
    mscale^2 (`cfg.rope_scaling.softmax_factor`, DeepSeek-V3's long-context correction)."""
    return cfg.rope_scaling.softmax_factor / math.sqrt(cfg.mla.qk_nope_head_dim + cfg.mla.qk_rope_head_dim)


class LatentAttend(NamedTuple):
    """An `attend` hook for MLA's absorbed form (the serving engine's, whose cache holds the latent):
    `fn(q_c, q_p, c, k_pe) -> ctx` gets the queries folded into the latent (q_c [B, T, H, Dc] = q_n W_UK^T, in
    float32) and their rotated rotary dims q_p [B, T, H, Dp], this call's tokens' latent c [B, T, Dc] and rotary
    key k_pe [B, T, Dp], and returns each head's softmax-weighted sum of the visible tokens' latents
    [B, T, H, Dc], scores scaled by `softmax_scale`."""

    fn: Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


class MLA(nnx.Module):
    """DeepSeek's multi-head latent attention over `n_heads` heads (`cfg.mla`); called as `Attention` is."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        mla, d, h, pd = cfg.mla, cfg.d_model, cfg.n_heads, cfg.weight_dtype
        init = normal(cfg.init_std)
        if mla.q_lora_rank:
            self.wq_a = param(rngs, init, (d, mla.q_lora_rank), (axes.EMBED, None), pd)
            self.q_norm = RMSNorm(mla.q_lora_rank, cfg.norm_eps, pd, rngs, name=None)
            self.wq_b = param(rngs, init, (mla.q_lora_rank, h, mla.qk_head_dim), (None, axes.HEADS, axes.HEAD_DIM),
                              pd)
        else:
            self.wq = param(rngs, init, (d, h, mla.qk_head_dim), (axes.EMBED, axes.HEADS, axes.HEAD_DIM), pd)
        self.wkv_a = param(rngs, init, (d, mla.kv_lora_rank + mla.qk_rope_head_dim), (axes.EMBED, None), pd)
        self.kv_norm = RMSNorm(mla.kv_lora_rank, cfg.norm_eps, pd, rngs, name=None)
        self.wkv_b = param(rngs, init, (mla.kv_lora_rank, h, mla.qk_nope_head_dim + mla.v_head_dim),
                           (None, axes.HEADS, axes.HEAD_DIM), pd)
        self.wo = param(rngs, normal(cfg.init_std / math.sqrt(2 * cfg.n_layers)), (h, mla.v_head_dim, d),
                        (axes.HEADS, axes.HEAD_DIM, axes.EMBED), pd)
        self.q_lora = bool(mla.q_lora_rank)
        self.kv_lora_rank, self.nope, self.v_dim = mla.kv_lora_rank, mla.qk_nope_head_dim, mla.v_head_dim
        self.impl = cfg.attention_impl
        self.dtype = cfg.compute_dtype
        self.softmax_factor = cfg.rope_scaling.softmax_factor

    def queries(self, x_BxTxD: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(plain query dims [B, T, H, Dn], rotated rotary dims [B, T, H, Dp]) in the compute dtype."""
        dt = self.dtype
        if self.q_lora:
            q_BxTxDq = self.q_norm(jnp.einsum("btd,dr->btr", x_BxTxD, self.wq_a[...].astype(dt)))
            q_BxTxHxDk = jnp.einsum("btr,rhe->bthe", q_BxTxDq, self.wq_b[...].astype(dt))
        else:
            q_BxTxHxDk = jnp.einsum("btd,dhe->bthe", x_BxTxD, self.wq[...].astype(dt))
        q_BxTxHxDk = axes.constrain(q_BxTxHxDk, (axes.BATCH, axes.LENGTH, axes.HEADS, None))
        return q_BxTxHxDk[..., :self.nope], apply_rope(q_BxTxHxDk[..., self.nope:], cos, sin)

    def latent(self, x_BxTxD: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """What a cache would keep per token: (the normalised latent [B, T, Dc], the rotated shared key
        [B, T, Dp])."""
        kv_BxTxDcp = jnp.einsum("btd,dc->btc", x_BxTxD, self.wkv_a[...].astype(self.dtype))
        kv_BxTxDcp = axes.constrain(kv_BxTxDcp, (axes.BATCH, axes.LENGTH, None))
        c_BxTxDc = self.kv_norm(kv_BxTxDcp[..., :self.kv_lora_rank])
        k_pe_BxTx1xDp = apply_rope(kv_BxTxDcp[:, :, None, self.kv_lora_rank:], cos, sin)
        return c_BxTxDc, k_pe_BxTx1xDp[:, :, 0]

    def __call__(self, x_BxTxD: jax.Array, cos: jax.Array, sin: jax.Array,
                 attend: Attend | LatentAttend | None = None) -> jax.Array:
        """Causal self-attention over this call's tokens (`attend(q, k, v)` replaces it, as in `Attention`; a
        `LatentAttend` runs the absorbed form through it instead)."""
        q_nope_BxTxHxDn, q_pe_BxTxHxDp = self.queries(x_BxTxD, cos, sin)
        c_BxTxDc, k_pe_BxTxDp = self.latent(x_BxTxD, cos, sin)
        if isinstance(attend, LatentAttend):
            wkv_b_DcxHxDnv = self.wkv_b[...].astype(self.dtype)
            q_c_BxTxHxDc = fold_query(q_nope_BxTxHxDn, wkv_b_DcxHxDnv[..., :self.nope])
            ctx_BxTxHxDc = attend.fn(q_c_BxTxHxDc, q_pe_BxTxHxDp, c_BxTxDc, k_pe_BxTxDp)
            out_BxTxHxDv = unfold_context(ctx_BxTxHxDc, wkv_b_DcxHxDnv[..., self.nope:]).astype(self.dtype)
            return jnp.einsum("bthe,hed->btd", out_BxTxHxDv, self.wo[...].astype(self.dtype))
        kv_BxTxHxDnv = jnp.einsum("btc,che->bthe", c_BxTxDc, self.wkv_b[...].astype(self.dtype))
        kv_BxTxHxDnv = axes.constrain(kv_BxTxHxDnv, (axes.BATCH, axes.LENGTH, axes.HEADS, None))
        k_nope_BxTxHxDn, v_BxTxHxDv = kv_BxTxHxDnv[..., :self.nope], kv_BxTxHxDnv[..., self.nope:]
        k_pe_BxTxHxDp = jnp.broadcast_to(k_pe_BxTxDp[:, :, None], q_pe_BxTxHxDp.shape)
        q_BxTxHxDk = jnp.concatenate([q_nope_BxTxHxDn, q_pe_BxTxHxDp], axis=-1)
        k_BxTxHxDk = jnp.concatenate([k_nope_BxTxHxDn, k_pe_BxTxHxDp], axis=-1)
        out_BxTxHxDv = _attend_with_value_dim(q_BxTxHxDk, k_BxTxHxDk, v_BxTxHxDv, attend, self.impl,
                                              self.softmax_factor)
        return jnp.einsum("bthe,hed->btd", out_BxTxHxDv, self.wo[...].astype(self.dtype))


def _attend_with_value_dim(q_BxTxHxDk: jax.Array, k_BxTxHxDk: jax.Array, v_BxTxHxDv: jax.Array,
                           attend: Attend | None, impl: str, softmax_factor: float = 1.0) -> jax.Array:
    """Causal attention with v's head dim Dv possibly unlike q's and k's Dk, through an implementation that takes
    one head dim: the smaller side zero-padded (q scaled so the softmax scale stays `softmax_factor`/sqrt(Dk)),
    the output cut to Dv."""
    Dk, Dv = q_BxTxHxDk.shape[-1], v_BxTxHxDv.shape[-1]
    width = max(Dk, Dv)

    def pad(x: jax.Array) -> jax.Array:
        return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])

    q_scale = softmax_factor * math.sqrt(width / Dk)  # the implementation scales by 1/sqrt(width)
    if q_scale != 1.0:
        q_BxTxHxDk = q_BxTxHxDk * jnp.asarray(q_scale, q_BxTxHxDk.dtype)
    names = (axes.BATCH, axes.LENGTH, axes.HEADS, None)
    q, k, v = (axes.constrain(pad(a), names) for a in (q_BxTxHxDk, k_BxTxHxDk, v_BxTxHxDv))
    out = attention(q, k, v, impl=impl, causal=True) if attend is None else attend(q, k, v)
    return out[..., :Dv]


def fold_query(q_nope_BxTxHxDn: jax.Array, w_uk_DcxHxDn: jax.Array) -> jax.Array:
    """The plain query dims through W_UK: q_c [B, T, H, Dc] in float32, whose dot with a token's latent c is the
    plain score q_n . (c W_UK)."""
    return jnp.einsum("bthn,chn->bthc", q_nope_BxTxHxDn, w_uk_DcxHxDn.astype(q_nope_BxTxHxDn.dtype),
                      preferred_element_type=jnp.float32)


def unfold_context(ctx_BxTxHxDc: jax.Array, w_uv_DcxHxDv: jax.Array) -> jax.Array:
    """Softmax-weighted sums of latents through W_UV: each head's attention output [B, T, H, Dv] in float32."""
    return jnp.einsum("bthc,chv->bthv", ctx_BxTxHxDc.astype(jnp.float32), w_uv_DcxHxDv.astype(jnp.float32))


def absorbed_attention(q_nope_BxTxHxDn: jax.Array, q_pe_BxTxHxDp: jax.Array, c_BxSxDc: jax.Array,
                       k_pe_BxSxDp: jax.Array, wkv_b_DcxHxDnv: jax.Array, *, causal: bool = True,
                       softmax_factor: float = 1.0) -> jax.Array:
    """MLA from the latent: W_UK (`wkv_b`'s first Dn of each head) folded into the query, W_UV (the rest) into the
    output. Takes `MLA.queries` and `MLA.latent` (rotary parts already rotated) and returns [B, T, H, Dv] before
    W_O, in q's dtype; scores (scaled by `softmax_factor`/sqrt(Dn + Dp)) and softmax in float32; causal masking
    aligns the last query with the last key."""
    Dn, Dp = q_nope_BxTxHxDn.shape[-1], q_pe_BxTxHxDp.shape[-1]
    T, S = q_nope_BxTxHxDn.shape[1], c_BxSxDc.shape[1]
    f32 = jnp.float32
    q_c_BxTxHxDc = fold_query(q_nope_BxTxHxDn, wkv_b_DcxHxDnv[..., :Dn])
    scores_BxHxTxS = (jnp.einsum("bthc,bsc->bhts", q_c_BxTxHxDc, c_BxSxDc.astype(f32))
                      + jnp.einsum("bthp,bsp->bhts", q_pe_BxTxHxDp, k_pe_BxSxDp, preferred_element_type=f32))
    scores_BxHxTxS = scores_BxHxTxS / jnp.sqrt(f32(Dn + Dp))
    if softmax_factor != 1.0:
        scores_BxHxTxS = scores_BxHxTxS * f32(softmax_factor)
    if causal:
        mask_TxS = jnp.arange(T)[:, None] + (S - T) >= jnp.arange(S)[None, :]
        scores_BxHxTxS = jnp.where(mask_TxS, scores_BxHxTxS, -jnp.inf)
    probs_BxHxTxS = jax.nn.softmax(scores_BxHxTxS, axis=-1)
    ctx_BxTxHxDc = jnp.einsum("bhts,bsc->bthc", probs_BxHxTxS, c_BxSxDc.astype(f32))
    return unfold_context(ctx_BxTxHxDc, wkv_b_DcxHxDnv[..., Dn:]).astype(q_nope_BxTxHxDn.dtype)
