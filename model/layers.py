"""The small building blocks: parameter creation with logical axes, RMSNorm, rotary embeddings, SwiGLU MLP."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from model import axes
from model.config import ModelConfig, RopeScaling

UNSCALED = RopeScaling()  # plain RoPE: `rope_tables`' default


def param(rngs: nnx.Rngs, init: Callable, shape: tuple[int, ...], names: axes.AxisNames,
          dtype: jnp.dtype) -> nnx.Param:
    """A parameter initialised by `init` and tagged with its logical axis `names`."""
    # Sharding is applied by parallel/ (jit out_shardings), not eagerly at creation.
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names, eager_sharding=False)


def normal(std: float) -> Callable:
    return jax.nn.initializers.normal(stddev=std)


class RMSNorm(nnx.Module):
    """y = x / rms(x) * scale, computed in float32."""

    def __init__(self, dim: int, eps: float, dtype: jnp.dtype, rngs: nnx.Rngs, name: str | None = axes.EMBED):
        """`name`: the logical axis of the normalised (last) dimension (None: replicated)."""
        self.scale = param(rngs, jax.nn.initializers.ones, (dim,), (name,), dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope_tables(positions_BxT: jax.Array, head_dim: int, theta: float, scaling: RopeScaling = UNSCALED
                ) -> tuple[jax.Array, jax.Array]:
    """cos and sin of shape [B, T, head_dim/2] for integer positions (float32), both times `scaling`'s
    attention factor."""
    angles = positions_BxT.astype(jnp.float32)[..., None] * rope_inv_freq(head_dim, theta, scaling)
    factor = scaling.attention_factor
    if factor == 1.0:
        return jnp.cos(angles), jnp.sin(angles)
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling = UNSCALED) -> jax.Array:
    """Each rotary pair's angular frequency [head_dim/2] (float32): theta^(-2i/head_dim), under YaRN blended
    with itself / factor by the ramp between the dims that turn `beta_fast` and `beta_slow` times in the
    original context (transformers' `_compute_yarn_parameters`)."""
    powers = theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    if scaling.kind != "yarn":
        return 1.0 / powers

    def correction_dim(rotations: float) -> float:  # the dim whose wavelength fits `rotations` in the context
        return head_dim * math.log(scaling.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(theta))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: no zero-width ramp
    ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # 1: keep the frequency (fast dims), 0: divide it by factor (slow dims)
    return 1.0 / (scaling.factor * powers) * (1 - extrapolation) + 1.0 / powers * extrapolation


def apply_rope(x_BxTxNxDh: jax.Array, cos_BxTxDr: jax.Array, sin_BxTxDr: jax.Array) -> jax.Array:
    """Rotate pairs (i, i + Dh/2): the "rotate half" convention of HF Llama, so its weights load unpermuted."""
    x = x_BxTxNxDh.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    cos, sin = cos_BxTxDr[:, :, None, :], sin_BxTxDr[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxNxDh.dtype)


class MLP(nnx.Module):
    """SwiGLU: down(silu(x @ gate) * (x @ up))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f, pd = cfg.d_model, cfg.d_ff, cfg.weight_dtype
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.w_gate = param(rngs, normal(cfg.init_std), (d, f), (axes.EMBED, axes.MLP), pd)
        self.w_up = param(rngs, normal(cfg.init_std), (d, f), (axes.EMBED, axes.MLP), pd)
        self.w_down = param(rngs, normal(out_std), (f, d), (axes.MLP, axes.EMBED), pd)
        self.dtype = cfg.compute_dtype

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        dt = self.dtype
        gate_BxTxF = jnp.einsum("btd,df->btf", x_BxTxD, self.w_gate[...].astype(dt))
        up_BxTxF = jnp.einsum("btd,df->btf", x_BxTxD, self.w_up[...].astype(dt))
        h_BxTxF = axes.constrain(jax.nn.silu(gate_BxTxF) * up_BxTxF, (axes.BATCH, axes.LENGTH, axes.MLP))
        return jnp.einsum("btf,fd->btd", h_BxTxF, self.w_down[...].astype(dt))
