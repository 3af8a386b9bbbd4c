"""The MoE router: which experts each token takes, with what weights, and the losses and load that come with it.

Softmax (Switch, Mixtral): probs = softmax(x @ W_router); each token takes its top_k experts.

Sigmoid (DeepSeek-V3, DeepSeekMoE): affinities s = sigmoid(x @ W_router). A per-expert bias b chooses the experts
and nothing else: with groups (`n_group`), each group scores the sum of its two best s + b, the `topk_group` best
groups are kept, and the token takes the top_k experts of s + b within them. Their weights are the unbiased s.
Both routers then renormalise the chosen weights to sum to 1 (`norm_topk_prob`, when top_k > 1: a top-1 weight of
1 would cut the router off from the loss) and scale them by `routed_scaling_factor`. This is transformers'
DeepseekV3TopkRouter (which also renormalises a top-1 weight) with its `e_score_correction_bias` as b.

Aux-loss-free balancing (DeepSeek-V3, Wang et al. 2024): b is not trained; after each step the trainer moves it
by rate * sign(mean load - load) per expert (`update_expert_bias`), so an overloaded expert becomes less likely
to be chosen and an idle one more. `expert_load` is the fraction of the routed assignments each expert got.

Losses: Switch's load balance E * sum_e f_e * P_e over the batch; DeepSeek-V3's sequence-wise balance loss, the
same per sequence and averaged over sequences; ST-MoE's z-loss mean(logsumexp(logits)^2). For the sigmoid router
P_e uses the affinities normalised to sum to 1 per token (DeepSeek-V3's s').
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from model.config import MoEConfig


class ExpertBias(nnx.Variable):
    """The sigmoid router's per-expert selection bias [E]: model state the optimizer leaves alone (the train step
    sets it with `update_expert_bias`); checkpointed with the parameters."""


class Routing(NamedTuple):
    weights_BxTxJ: jax.Array  # float32 combine weights of the chosen experts
    experts_BxTxJ: jax.Array  # int32 expert ids, best first
    probs_BxTxE: jax.Array    # float32 router probabilities (sigmoid: affinities normalised per token)
    logits_BxTxE: jax.Array   # float32 router logits


def route(x_BxTxD: jax.Array, router_DxE: jax.Array, top_k: int, moe: MoEConfig | None = None,
          bias_E: jax.Array | None = None) -> Routing:
    """The router's choice for every token (float32 throughout). `moe` (None: a plain softmax router) gives the
    router kind, groups, renormalisation and scaling; `bias_E` the sigmoid router's selection bias."""
    moe = moe or MoEConfig(n_experts=router_DxE.shape[1], top_k=top_k)
    logits_BxTxE = jnp.einsum("btd,de->bte", x_BxTxD.astype(jnp.float32), router_DxE.astype(jnp.float32))
    if moe.router == "sigmoid":
        scores_BxTxE = jax.nn.sigmoid(logits_BxTxE)
        probs_BxTxE = scores_BxTxE / jnp.sum(scores_BxTxE, axis=-1, keepdims=True)
    else:
        scores_BxTxE = probs_BxTxE = jax.nn.softmax(logits_BxTxE, axis=-1)
    choice_BxTxE = scores_BxTxE
    if bias_E is not None:
        choice_BxTxE = choice_BxTxE + jax.lax.stop_gradient(bias_E.astype(jnp.float32))
    if moe.n_group > 1:
        choice_BxTxE = limit_groups(choice_BxTxE, moe.n_group, moe.topk_group)
    _, experts_BxTxJ = top_k_of(jax.lax.stop_gradient(choice_BxTxE), top_k)
    weights_BxTxJ = jnp.take_along_axis(scores_BxTxE, experts_BxTxJ, axis=-1)
    if moe.norm_topk_prob and top_k > 1:
        weights_BxTxJ = weights_BxTxJ / (jnp.sum(weights_BxTxJ, axis=-1, keepdims=True) + 1e-20)
    if moe.routed_scaling_factor != 1.0:
        weights_BxTxJ = weights_BxTxJ * moe.routed_scaling_factor
    return Routing(weights_BxTxJ, experts_BxTxJ.astype(jnp.int32), probs_BxTxE, logits_BxTxE)


def limit_groups(choice_BxTxE: jax.Array, n_group: int, topk_group: int) -> jax.Array:
    """`choice` with every expert outside the token's `topk_group` best groups set to -inf; a group's score is
    the sum of its two best choice scores (its one, for groups of one expert)."""
    *lead, E = choice_BxTxE.shape
    per_group = E // n_group
    grouped_BxTxGxS = choice_BxTxE.reshape(*lead, n_group, per_group)
    group_score_BxTxG = jnp.sum(top_k_of(grouped_BxTxGxS, min(2, per_group))[0], axis=-1)
    _, kept_BxTxK = top_k_of(group_score_BxTxG, topk_group)
    kept_BxTxG = jnp.sum(jax.nn.one_hot(kept_BxTxK, n_group, dtype=jnp.int32), axis=-2) > 0
    return jnp.where(kept_BxTxG[..., None], grouped_BxTxGxS, -jnp.inf).reshape(*lead, E)


def top_k_of(x_BxTxE: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`jax.lax.top_k` over the last axis (ties to the lower index) as k rounds of argmax: elementwise work and
    reductions that shard along the batch, where XLA's TopK gathers the whole batch onto every device."""
    values, indices = [], []
    for _ in range(k):
        index_BxT = jnp.argmax(x_BxTxE, axis=-1)
        values.append(jnp.take_along_axis(x_BxTxE, index_BxT[..., None], axis=-1)[..., 0])
        indices.append(index_BxT)
        x_BxTxE = jnp.where(jax.nn.one_hot(index_BxT, x_BxTxE.shape[-1], dtype=bool), -jnp.inf, x_BxTxE)
    return jnp.stack(values, axis=-1), jnp.stack(indices, axis=-1)


def expert_load(routing: Routing) -> jax.Array:
    """The fraction [E] (float32, summing to 1) of all top-k assignments that went to each expert."""
    n_experts = routing.probs_BxTxE.shape[-1]
    return jnp.mean(jax.nn.one_hot(routing.experts_BxTxJ, n_experts, dtype=jnp.float32), axis=(0, 1, 2))


def load_balance_loss(routing: Routing) -> jax.Array:
    """Switch's auxiliary loss E * sum_e f_e * P_e over all top-k assignments (1 when balanced)."""
    n_experts = routing.probs_BxTxE.shape[-1]
    mean_prob_E = jnp.mean(routing.probs_BxTxE, axis=(0, 1))
    return n_experts * jnp.sum(expert_load(routing) * mean_prob_E)


def sequence_balance_loss(routing: Routing) -> jax.Array:
    """DeepSeek-V3's sequence-wise balance loss: E * sum_e f_e * P_e within each sequence, averaged over
    sequences (1 when every sequence is balanced)."""
    n_experts = routing.probs_BxTxE.shape[-1]
    fraction_BxE = jnp.mean(jax.nn.one_hot(routing.experts_BxTxJ, n_experts, dtype=jnp.float32), axis=(1, 2))
    mean_prob_BxE = jnp.mean(routing.probs_BxTxE, axis=1)
    return n_experts * jnp.mean(jnp.sum(fraction_BxE * mean_prob_BxE, axis=-1))


def router_z_loss(routing: Routing) -> jax.Array:
    """ST-MoE's z-loss: the mean squared log-partition of the router logits."""
    return jnp.mean(jax.nn.logsumexp(routing.logits_BxTxE, axis=-1) ** 2)


def router_loss(routing: Routing, moe: MoEConfig) -> jax.Array:
    """The weighted sum of the router losses `moe` asks for (Switch balance, z-loss, sequence-wise balance)."""
    loss = moe.aux_loss_weight * load_balance_loss(routing) + moe.z_loss_weight * router_z_loss(routing)
    if moe.seq_aux_loss_weight:
        loss = loss + moe.seq_aux_loss_weight * sequence_balance_loss(routing)
    return loss


def update_expert_bias(bias_xE: jax.Array, load_xE: jax.Array, rate: float) -> jax.Array:
    """Aux-loss-free balancing: bias + rate * sign(mean load - load) along the last (expert) axis, so overloaded
    experts lose selection score and underloaded ones gain it (any leading axes, e.g. layers, are independent)."""
    mean_xE = jnp.mean(load_xE, axis=-1, keepdims=True)
    return (bias_xE + rate * jnp.sign(mean_xE - load_xE)).astype(bias_xE.dtype)


def load_max_over_mean(load_xE: jax.Array) -> jax.Array:
    """max_e load / mean load (1 when balanced, E when one expert takes everything), the worst over any leading
    axes (layers)."""
    return jnp.max(jnp.max(load_xE, axis=-1) / jnp.mean(load_xE, axis=-1))
