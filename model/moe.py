"""Mixture-of-Experts SwiGLU MLP: a router sends each token to `top_k` of `n_experts` experts.

Routing (float32, model/router.py). logits = x @ W_router, probs = softmax(logits) (or DeepSeekMoE's sigmoid
affinities, a per-expert selection bias and group-limited routing); each token takes its top_k experts. With
top_k > 1 their weights are renormalised to sum to 1 (Mixtral); with top_k = 1 the weight is the probability
itself (Switch), so the router still learns from the language-model loss. Shared experts (DeepSeekMoE), one
SwiGLU of n_shared_experts * d_ff hidden, take every token and add to the routed output. Experts' d_ff is
`moe.d_ff` (or the model's when 0).

Router losses, returned to the caller (the model averages them over layers and the trainer adds them):
load balance (Switch, over all top-k assignments) E * sum_e f_e * P_e, with f_e the fraction of assignments
that go to expert e and P_e its mean router probability: 1 when balanced, E when one expert takes everything;
z-loss (ST-MoE) mean(logsumexp(logits)^2), which keeps the logits small; DeepSeek-V3's sequence-wise balance
loss. With them comes each expert's load f_e, which the trainer logs and balances the selection bias by.

Capacity dispatch (GShard). Each sequence is a group; every expert has C = ceil(capacity_factor * T * top_k / E)
slots per group, filled in priority order: all first choices in sequence order, then all second choices, and so
on. Assignments past C are dropped (the expert adds nothing; the block's residual carries the token). Dispatch
and combine are one-hot einsums over [B, T, E, C], so every shape is fixed. The dispatched activations
[E, B, C, D] carry the logical axes (expert, expert_batch): on a mesh with an `expert` axis each device holds its
experts' slots of its data shard's sequences, and GSPMD turns the change of layout into expert parallelism's
all-to-alls.

Dropless dispatch. The B*T*top_k assignments are sorted by expert and each expert's contiguous rows go through
its weights with grouped matmuls (`jax.lax.ragged_dot`); nothing is dropped, and shapes are still fixed. Which
function runs the routed experts is handed in (`MoE(..., routed_experts=...)`, a `RoutedExperts`): by default
`dropless_experts` over all experts on this device; on a mesh with an `expert` axis, parallel/expert_dropless.py's
expert-parallel one (the model never looks at a mesh).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from model import axes
from model.config import ModelConfig, MoEConfig
from model.layers import MLP, normal, param
from model.router import ExpertBias, Routing, expert_load, load_balance_loss, route, router_loss, router_z_loss

__all__ = ["MoE", "RoutedExperts", "Routing", "capacity_slots", "dropless_experts", "load_balance_loss", "route",
           "router_z_loss"]  # routing: router.py


def capacity_slots(experts_BxTxJ: jax.Array, n_experts: int, capacity: int) -> jax.Array:
    """One-hot slot assignment [B, T, J, E, C] (float32): token t's k-th choice takes slot c of its expert iff
    it is among the first `capacity` assignments to that expert in its sequence, first choices before second."""
    B, T, J = experts_BxTxJ.shape
    chosen_BxJTxE = jax.nn.one_hot(experts_BxTxJ.transpose(0, 2, 1).reshape(B, J * T), n_experts,
                                   dtype=jnp.int32)
    position_BxJTxE = jnp.cumsum(chosen_BxJTxE, axis=1) - 1  # this assignment's rank at its expert
    kept_BxJTxE = chosen_BxJTxE * (position_BxJTxE < capacity)
    slots_BxJTxExC = jax.nn.one_hot(position_BxJTxE, capacity, dtype=jnp.float32) * kept_BxJTxE[..., None]
    return slots_BxJTxExC.reshape(B, J, T, n_experts, capacity).transpose(0, 2, 1, 3, 4)


def dropless_experts(x_BxTxD: jax.Array, routing: Routing, w_gate_ExDxF: jax.Array, w_up_ExDxF: jax.Array,
                     w_down_ExFxD: jax.Array, first_expert: jax.Array | int | None = None) -> jax.Array:
    """The routed experts' output [B, T, D], each token's chosen experts' SwiGLU outputs weighted by the routing
    weights and summed, by grouped matmuls over the assignments sorted by expert (in x's dtype).

    The weights hold E experts. `first_expert` None: they are all the router's experts. An int or a traced
    scalar: they are experts first_expert .. first_expert + E - 1 of more (one device's share under expert
    parallelism), and assignments to the others add nothing: their rows sort after the local experts' and fall
    outside every group; they are zeroed before and after the matmuls, so whatever `ragged_dot` leaves in rows
    past the groups' sum (zeros on CPU; unspecified in general) reaches neither the output nor a gradient."""
    (B, T, D), J, E = x_BxTxD.shape, routing.experts_BxTxJ.shape[-1], w_gate_ExDxF.shape[0]
    experts_R = routing.experts_BxTxJ.reshape(B * T * J)  # R = B*T*J routed rows, token-major
    if first_expert is not None:
        experts_R = experts_R - first_expert
        experts_R = jnp.where((experts_R >= 0) & (experts_R < E), experts_R, E)  # others' rows: group E, last
    order_R = jnp.argsort(experts_R, stable=True)
    sizes_E = jnp.bincount(experts_R, length=E + 1)[:E].astype(jnp.int32)
    x_RxD = x_BxTxD.reshape(B * T, D)[order_R // J]
    if first_expert is not None:
        kept_Rx1 = (jnp.arange(B * T * J) < jnp.sum(sizes_E))[:, None]
        x_RxD = jnp.where(kept_Rx1, x_RxD, 0)
    gate_RxF = jax.lax.ragged_dot(x_RxD, w_gate_ExDxF, sizes_E)
    up_RxF = jax.lax.ragged_dot(x_RxD, w_up_ExDxF, sizes_E)
    out_RxD = jax.lax.ragged_dot(jax.nn.silu(gate_RxF) * up_RxF, w_down_ExFxD, sizes_E)
    if first_expert is not None:
        out_RxD = jnp.where(kept_Rx1, out_RxD, 0)
    out_RxD = out_RxD[jnp.argsort(order_R)]  # back to token-major order
    weights_BxTxJ = routing.weights_BxTxJ.astype(x_BxTxD.dtype)
    return jnp.einsum("btjd,btj->btd", out_RxD.reshape(B, T, J, D), weights_BxTxJ)


RoutedExperts = Callable[[jax.Array, Routing, jax.Array, jax.Array, jax.Array], jax.Array]
# (x_BxTxD, routing, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD) -> y_BxTxD, all but routing in the compute dtype:
# dropless dispatch's routed experts, each token's chosen experts' outputs weighted and summed (`dropless_experts`)


class MoE(nnx.Module):
    """Top-k routed SwiGLU experts (plus shared ones); returns (output [B, T, D], weighted router loss)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, routed_experts: RoutedExperts | None = None):
        """`routed_experts`: what runs the routed experts under dropless dispatch (None: `dropless_experts` on
        this device); static, so a hashable value (a function or a frozen dataclass)."""
        e, d, f, pd = cfg.moe.n_experts, cfg.d_model, cfg.moe.expert_d_ff(cfg.d_ff), cfg.weight_dtype
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.router = param(rngs, normal(cfg.init_std), (d, e), (axes.EMBED, None), pd)
        self.w_gate = param(rngs, normal(cfg.init_std), (e, d, f), (axes.EXPERT, axes.EMBED, axes.MLP), pd)
        self.w_up = param(rngs, normal(cfg.init_std), (e, d, f), (axes.EXPERT, axes.EMBED, axes.MLP), pd)
        self.w_down = param(rngs, normal(out_std), (e, f, d), (axes.EXPERT, axes.MLP, axes.EMBED), pd)
        if cfg.moe.expert_bias:
            self.expert_bias = ExpertBias(jnp.zeros((e,), jnp.float32), out_sharding=(None,), eager_sharding=False)
        if cfg.moe.n_shared_experts:
            self.shared = MLP(cfg.replace(d_ff=cfg.moe.n_shared_experts * f), rngs)
        self.moe: MoEConfig = cfg.moe
        self.dtype = cfg.compute_dtype
        self.routed_experts = routed_experts

    def __call__(self, x_BxTxD: jax.Array) -> tuple[jax.Array, jax.Array]:
        y_BxTxD, loss, _ = self.with_load(x_BxTxD)
        return y_BxTxD, loss

    def with_load(self, x_BxTxD: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(output [B, T, D], weighted router loss, each expert's load [E]: its fraction of the assignments)."""
        bias_E = self.expert_bias[...] if self.moe.expert_bias else None
        routing = route(x_BxTxD, self.router[...], self.moe.top_k, self.moe, bias_E)
        if self.moe.dispatch == "capacity":
            y_BxTxD = self._capacity(x_BxTxD, routing)
        else:
            y_BxTxD = self._dropless(x_BxTxD, routing)
        if self.moe.n_shared_experts:
            y_BxTxD = y_BxTxD + self.shared(x_BxTxD.astype(self.dtype))
        return y_BxTxD.astype(x_BxTxD.dtype), router_loss(routing, self.moe), expert_load(routing)

    def _capacity(self, x_BxTxD: jax.Array, routing: Routing) -> jax.Array:
        dt = self.dtype
        capacity = self.moe.capacity(x_BxTxD.shape[1])
        slots_BxTxJxExC = capacity_slots(routing.experts_BxTxJ, self.moe.n_experts, capacity)
        dispatch_BxTxExC = jnp.sum(slots_BxTxJxExC, axis=2).astype(dt)  # a token picks an expert at most once
        combine_BxTxExC = jnp.einsum("btjec,btj->btec", slots_BxTxJxExC, routing.weights_BxTxJ)
        # Dispatch where the tokens are (every expert's slots of the local sequences), then move the slots to
        # their experts' devices: a change of layout GSPMD makes an all-to-all. The combine goes back the same way.
        token_names, expert_names = (None, axes.BATCH, None, axes.EMBED), (axes.EXPERT, axes.EXPERT_BATCH, None,
                                                                           axes.EMBED)
        x_ExBxCxD = axes.constrain(jnp.einsum("btec,btd->ebcd", dispatch_BxTxExC, x_BxTxD.astype(dt)), token_names)
        x_ExBxCxD = axes.constrain(x_ExBxCxD, expert_names)
        gate_ExBxCxF = jnp.einsum("ebcd,edf->ebcf", x_ExBxCxD, self.w_gate[...].astype(dt))
        up_ExBxCxF = jnp.einsum("ebcd,edf->ebcf", x_ExBxCxD, self.w_up[...].astype(dt))
        h_ExBxCxF = axes.constrain(jax.nn.silu(gate_ExBxCxF) * up_ExBxCxF,
                                   (axes.EXPERT, axes.EXPERT_BATCH, None, axes.MLP))
        out_ExBxCxD = axes.constrain(jnp.einsum("ebcf,efd->ebcd", h_ExBxCxF, self.w_down[...].astype(dt)),
                                     expert_names)
        out_ExBxCxD = axes.constrain(out_ExBxCxD, token_names)
        return jnp.einsum("btec,ebcd->btd", combine_BxTxExC.astype(dt), out_ExBxCxD)

    def _dropless(self, x_BxTxD: jax.Array, routing: Routing) -> jax.Array:
        dt = self.dtype
        return (self.routed_experts or dropless_experts)(x_BxTxD.astype(dt), routing, self.w_gate[...].astype(dt),
                                                          self.w_up[...].astype(dt), self.w_down[...].astype(dt))
