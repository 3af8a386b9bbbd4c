"""The decoder-only transformer: embedding, a stack of pre-norm blocks, final norm, LM head.

The model runs on one device as it stands. How it is spread is decided outside it and handed in at construction
(`create_model(cfg, attend=..., layer_stack=..., routed_experts=...)`, as `parallel/sharding.py` does from the
mesh): `attend`, the causal self-attention every block uses, `layer_stack`, what runs the stacked layers (in turn
by default; a pipeline over the mesh's stages), and `routed_experts`, what runs every MoE block's routed experts
under dropless dispatch (on this device by default; expert-parallel over the mesh's `expert` axis). The model
never reads a mesh or sharding rules to choose any of them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from model import axes
from model.attention import attention
from model.config import ModelConfig
from model.layers import MLP, RMSNorm, apply_rope, normal, param, rope_tables
from model.loss import cross_entropy, linear_cross_entropy
from model.mla import MLA
from model.moe import MoE, RoutedExperts
from model.mtp import MTPModule, mtp_targets

Attend = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # (q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh) -> out_BxTxHxDh
LayerAux = tuple[jax.Array, jax.Array]  # (router losses summed over layers [], each layer's expert load [L', E])
StageFn = Callable[[nnx.State, jax.Array, jax.Array], tuple[jax.Array, LayerAux]]
# (some of the stacked layers' state [L', ...], x_BxTxD, positions_BxT) -> (x_BxTxD, their LayerAux)
LayerStack = Callable[[StageFn, nnx.State, jax.Array, jax.Array], tuple[jax.Array, LayerAux]]
# (stage, the stacked layers' state [L, ...], x_BxTxD, positions_BxT) -> (x_BxTxD, LayerAux of all L layers)


def layers_in_turn(stage: StageFn, stacked: nnx.State, x_BxTxD: jax.Array, positions_BxT: jax.Array
                   ) -> tuple[jax.Array, LayerAux]:
    """The default `LayerStack`: every layer in turn on this device (one stage holding them all)."""
    return stage(stacked, x_BxTxD, positions_BxT)

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Attention(nnx.Module):
    """Grouped-query self-attention with rotary position embeddings (and, with `qk_norm`, each query and key
    head RMS-normalised before RoPE, as Qwen3)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h, k, hd, pd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.weight_dtype
        init = normal(cfg.init_std)
        self.wq = param(rngs, init, (d, h, hd), (axes.EMBED, axes.HEADS, axes.HEAD_DIM), pd)
        self.wk = param(rngs, init, (d, k, hd), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM), pd)
        self.wv = param(rngs, init, (d, k, hd), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM), pd)
        self.wo = param(rngs, normal(cfg.init_std / math.sqrt(2 * cfg.n_layers)), (h, hd, d),
                        (axes.HEADS, axes.HEAD_DIM, axes.EMBED), pd)
        if cfg.qkv_bias:
            zeros = jax.nn.initializers.zeros
            self.bq = param(rngs, zeros, (h, hd), (axes.HEADS, axes.HEAD_DIM), pd)
            self.bk = param(rngs, zeros, (k, hd), (axes.KV_HEADS, axes.HEAD_DIM), pd)
            self.bv = param(rngs, zeros, (k, hd), (axes.KV_HEADS, axes.HEAD_DIM), pd)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.norm_eps, pd, rngs, name=axes.HEAD_DIM)
            self.k_norm = RMSNorm(hd, cfg.norm_eps, pd, rngs, name=axes.HEAD_DIM)
        self.qkv_bias = cfg.qkv_bias
        self.qk_norm = cfg.qk_norm
        self.impl = cfg.attention_impl
        self.dtype = cfg.compute_dtype

    def __call__(self, x_BxTxD: jax.Array, cos: jax.Array, sin: jax.Array, attend: Attend | None = None
                 ) -> jax.Array:
        """`attend(q, k, v) -> out` replaces causal self-attention over this call's tokens (the serving engine
        passes one that writes k, v into its paged cache and attends over the cached sequence)."""
        dt = self.dtype
        q_BxTxHxDh = jnp.einsum("btd,dhe->bthe", x_BxTxD, self.wq[...].astype(dt))
        k_BxTxKxDh = jnp.einsum("btd,dke->btke", x_BxTxD, self.wk[...].astype(dt))
        v_BxTxKxDh = jnp.einsum("btd,dke->btke", x_BxTxD, self.wv[...].astype(dt))
        if self.qkv_bias:
            q_BxTxHxDh = q_BxTxHxDh + self.bq[...].astype(dt)
            k_BxTxKxDh = k_BxTxKxDh + self.bk[...].astype(dt)
            v_BxTxKxDh = v_BxTxKxDh + self.bv[...].astype(dt)
        if self.qk_norm:
            q_BxTxHxDh, k_BxTxKxDh = self.q_norm(q_BxTxHxDh), self.k_norm(k_BxTxKxDh)
        q_BxTxHxDh = axes.constrain(apply_rope(q_BxTxHxDh, cos, sin), (axes.BATCH, axes.LENGTH, axes.HEADS, None))
        k_BxTxKxDh = axes.constrain(apply_rope(k_BxTxKxDh, cos, sin), (axes.BATCH, axes.LENGTH, axes.KV_HEADS, None))
        v_BxTxKxDh = axes.constrain(v_BxTxKxDh, (axes.BATCH, axes.LENGTH, axes.KV_HEADS, None))
        if attend is None:
            out_BxTxHxDh = attention(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, impl=self.impl, causal=True)
        else:
            out_BxTxHxDh = attend(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh)
        return jnp.einsum("bthe,hed->btd", out_BxTxHxDh, self.wo[...].astype(dt))


class Block(nnx.Module):
    """x + attn(norm(x)), then + mlp(norm(x)); the attention is multi-head latent attention when `cfg.mla` is
    enabled, and the MLP a Mixture of Experts when `cfg.moe` has experts (unless `dense_mlp`)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dense_mlp: bool = False,
                 routed_experts: RoutedExperts | None = None):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.weight_dtype, rngs)
        self.attn = MLA(cfg, rngs) if cfg.mla.enabled else Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.weight_dtype, rngs)
        moe = cfg.moe.enabled and not dense_mlp
        self.mlp = MoE(cfg, rngs, routed_experts) if moe else MLP(cfg, rngs)

    def __call__(self, x_BxTxD: jax.Array, cos: jax.Array, sin: jax.Array, attend: Attend | None = None
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """(the block's output, (its weighted MoE router loss, its experts' load [E]): 0 and [] when dense)."""
        x_BxTxD = x_BxTxD + self.attn(self.attn_norm(x_BxTxD), cos, sin, attend)
        if isinstance(self.mlp, MoE):
            y_BxTxD, router_loss, load_E = self.mlp.with_load(self.mlp_norm(x_BxTxD))
        else:
            y_BxTxD = self.mlp(self.mlp_norm(x_BxTxD))
            router_loss, load_E = jnp.zeros((), jnp.float32), jnp.zeros((0,), jnp.float32)
        return axes.constrain(x_BxTxD + y_BxTxD, (axes.BATCH, axes.LENGTH, axes.EMBED)), (router_loss, load_E)


class Transformer(nnx.Module):
    """Token ids [B, T] -> float32 logits [B, T, vocab]. Layers are stacked on a leading `layers` axis and run as
    an unrolled loop (`scan_layers=True`: one `jax.lax.scan`, whose compile time does not grow with depth). An MoE
    model with `moe.first_dense_layers = k` has two stacks, run in turn: `dense_blocks` (its first k blocks, with
    the dense MLP) and `blocks` (the rest); a pipelined layer stack takes only one, and is refused then."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, attend: Attend | None = None,
                 layer_stack: LayerStack | None = None, routed_experts: RoutedExperts | None = None):
        """`attend`: every block's causal self-attention (None: `cfg.attention_impl` on one device);
        `layer_stack`: what runs the stacked layers (None: `layers_in_turn`); `routed_experts`: what runs every
        MoE block's routed experts under dropless dispatch, the MTP modules' included (None: all on this device,
        model/moe.py's `dropless_experts`). All are static (they live in the graphdef, not the state), so they
        should be hashable values: functions or frozen dataclasses."""
        self.cfg = cfg
        self.attend = attend
        self.layer_stack = layer_stack
        self.routed_experts = routed_experts
        pd = cfg.weight_dtype
        self.embed = param(rngs, normal(cfg.init_std), (cfg.vocab_size, cfg.d_model), (axes.VOCAB, axes.EMBED), pd)
        n_dense = dense_layers(cfg)
        if n_dense and layer_stack is not None:
            raise ValueError(f"model.moe.first_dense_layers ({n_dense}) with a pipelined layer stack (mesh.stage > 1) "
                             f"is not supported: the pipeline takes one stack of like blocks; use "
                             f"model.moe.first_dense_layers=0 or mesh.stage=1")
        if n_dense:
            self.dense_blocks = _stacked_blocks(cfg, rngs, n_dense, dense_mlp=True)
        self.blocks = _stacked_blocks(cfg, rngs, cfg.n_layers - n_dense, routed_experts=routed_experts)
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd, rngs)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, normal(cfg.init_std), (cfg.d_model, cfg.vocab_size),
                                 (axes.EMBED, axes.VOCAB), pd)
        if cfg.mtp_depth and layer_stack is not None:
            raise ValueError(f"model.mtp_depth ({cfg.mtp_depth}) with a pipelined layer stack (mesh.stage > 1) is not "
                             f"supported yet; use model.mtp_depth=0 or mesh.stage=1")
        if cfg.mtp_depth:
            self.mtp = nnx.List([MTPModule(cfg, Block(cfg, rngs, routed_experts=routed_experts), rngs)
                                 for _ in range(cfg.mtp_depth)])

    def embed_tokens(self, tokens_BxT: jax.Array) -> jax.Array:
        """Token ids [B, T] -> embeddings [B, T, d_model] in the compute dtype."""
        # Gather the table's embed dimension (FSDP shards it) before the lookup: a gather whose output must
        # move from embed-sharded to batch-sharded is one GSPMD can only do by replicating everything.
        table_VxD = axes.constrain(self.embed[...], (axes.VOCAB, axes.EMBED))
        x_BxTxD = jnp.take(table_VxD, tokens_BxT, axis=0).astype(self.cfg.compute_dtype)
        return axes.constrain(x_BxTxD, (axes.BATCH, axes.LENGTH, axes.EMBED))

    def head(self) -> jax.Array:
        """The LM head [d_model, vocab] in the compute dtype (the embedding's transpose when tied)."""
        head_DxV = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
        return head_DxV.astype(self.cfg.compute_dtype)

    def logits(self, x_BxTxD: jax.Array) -> jax.Array:
        """The final norm and LM head: hidden states [B, T, d_model] -> float32 logits [B, T, vocab]."""
        return self._project(self.final_norm(x_BxTxD))

    def _project(self, x_BxTxD: jax.Array) -> jax.Array:
        """The LM head over normalised hidden states: float32 logits [B, T, vocab]."""
        if self.cfg.logits_grad_dtype == "compute":
            logits_BxTxV = _head_with_compute_dtype_grad(x_BxTxD, self.head())
        else:
            logits_BxTxV = jnp.einsum("btd,dv->btv", x_BxTxD, self.head(), preferred_element_type=jnp.float32)
        return axes.constrain(logits_BxTxV, (axes.BATCH, axes.LENGTH, axes.VOCAB))

    def hidden(self, tokens_BxT: jax.Array, positions_BxT: jax.Array | None = None) -> jax.Array:
        """Token ids [B, T] -> the last block's output [B, T, d_model] (before the final norm)."""
        return self.hidden_and_router_loss(tokens_BxT, positions_BxT)[0]

    def hidden_and_router_loss(self, tokens_BxT: jax.Array, positions_BxT: jax.Array | None = None
                               ) -> tuple[jax.Array, jax.Array]:
        """`hidden`, and the MoE router loss averaged over layers (0 for a dense model)."""
        return self.hidden_and_router_stats(tokens_BxT, positions_BxT)[:2]

    def hidden_and_router_stats(self, tokens_BxT: jax.Array, positions_BxT: jax.Array | None = None
                                ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """`hidden_and_router_loss`, and each MoE layer's expert load [L, E] (the fraction of its routed
        assignments each expert took; [L, 0] for a dense model; the `blocks` stack's L - first_dense_layers rows
        with dense first layers), the router loss averaged over the MoE layers."""
        cfg = self.cfg
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
        x_BxTxD = self.embed_tokens(tokens_BxT)
        stacks = [self.dense_blocks, self.blocks] if dense_layers(cfg) else [self.blocks]
        for blocks in stacks:  # the last stack's loads are the MoE layers'; a dense stack's are [k, 0]
            graphdef, stacked = nnx.split(blocks)

            def stage(layers_state: nnx.State, x_BxTxD: jax.Array, positions_BxT: jax.Array,
                      graphdef: nnx.GraphDef = graphdef) -> tuple[jax.Array, LayerAux]:
                layer = self._layer_fn(graphdef, positions_BxT)
                x_BxTxD, (router_losses, loads_LxE) = _run_layers(layer, x_BxTxD, layers_state, cfg.scan_layers)
                return x_BxTxD, (jnp.sum(router_losses), loads_LxE)

            x_BxTxD, (router_loss_sum, load_LxE) = (self.layer_stack or layers_in_turn)(stage, stacked, x_BxTxD,
                                                                                         positions_BxT)
        return x_BxTxD, router_loss_sum / (cfg.n_layers - dense_layers(cfg)), load_LxE

    def _layer_fn(self, graphdef: nnx.GraphDef, positions_BxT: jax.Array) -> Callable:
        """`layer(x, layer_state) -> (x, (router loss, expert load))` for one block at these positions,
        rematerialised per `remat`: the step `_run_layers` applies over the stacked layers."""
        cfg = self.cfg
        cos, sin = rope_tables(positions_BxT, cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling)

        def layer(x_BxTxD: jax.Array, layer_state: nnx.State) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
            return nnx.merge(graphdef, layer_state)(x_BxTxD, cos, sin, self.attend)

        if cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
        return layer

    def __call__(self, tokens_BxT: jax.Array, positions_BxT: jax.Array | None = None) -> jax.Array:
        return self.logits(self.hidden(tokens_BxT, positions_BxT))

    def loss(self, tokens_BxT: jax.Array, targets_BxT: jax.Array) -> jax.Array:
        """Mean cross-entropy (nats) of predicting `targets` from `tokens`; with `loss_chunks` the LM head and the
        loss are fused chunk by chunk (model/loss.py) and the [B, T, vocab] logits are never materialised."""
        return self.losses(tokens_BxT, targets_BxT)[0]

    def losses(self, tokens_BxT: jax.Array, targets_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(`loss`, the MoE router loss averaged over layers): training minimises their sum."""
        return self.losses_and_load(tokens_BxT, targets_BxT)[:2]

    def losses_and_load(self, tokens_BxT: jax.Array, targets_BxT: jax.Array
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """`losses`, and each layer's expert load [L, E] (see `hidden_and_router_stats`)."""
        x_BxTxD, router_loss, load_LxE = self.hidden_and_router_stats(tokens_BxT)
        return self.loss_of_hidden(x_BxTxD, targets_BxT), router_loss, load_LxE

    def loss_of_hidden(self, x_BxTxD: jax.Array, targets_BxT: jax.Array) -> jax.Array:
        """Mean cross-entropy of the last block's output `x` against `targets` (fused with the head under
        `loss_chunks`)."""
        cfg = self.cfg
        if not cfg.loss_chunks:
            return cross_entropy(self.logits(x_BxTxD), targets_BxT)
        grad_dtype = cfg.compute_dtype if cfg.logits_grad_dtype == "compute" else jnp.float32
        return linear_cross_entropy(self.final_norm(x_BxTxD), self.head(), targets_BxT, cfg.loss_chunks, grad_dtype)

    def mtp_logits(self, x_BxTxD: jax.Array, tokens_BxT: jax.Array) -> tuple[list[jax.Array], jax.Array]:
        """The multi-token prediction modules over the main model's last block output `x` (model/mtp.py): each
        depth k's float32 logits [B, T - k, vocab] for the tokens k + 1 after positions 0..T-k-1, and their blocks'
        MoE router loss, averaged over depths."""
        cfg = self.cfg
        positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
        logits, router_loss, h_BxTxD = [], jnp.zeros((), jnp.float32), x_BxTxD
        for k, module in enumerate(self.mtp, start=1):
            n = tokens_BxT.shape[1] - k
            cos, sin = rope_tables(positions_BxT[:, :n], cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling)
            embedded, _ = mtp_targets(tokens_BxT, tokens_BxT, k)
            h_BxTxD, depth_router_loss = module(h_BxTxD[:, :n], self.embed_tokens(embedded), cos, sin, self.attend)
            logits.append(self._project(module.norm(h_BxTxD)))
            router_loss = router_loss + depth_router_loss
        return logits, router_loss / cfg.mtp_depth

    def mtp_loss(self, x_BxTxD: jax.Array, tokens_BxT: jax.Array, targets_BxT: jax.Array,
                 weights_BxT: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """(the multi-token prediction modules' cross-entropy, the mean over depths of each depth's mean over its
        positions (weighted by `weights` of the targets, if given), their MoE router loss)."""
        logits, router_loss = self.mtp_logits(x_BxTxD, tokens_BxT)
        losses = []
        for k, logits_BxTxV in enumerate(logits, start=1):
            _, targets_k = mtp_targets(tokens_BxT, targets_BxT, k)
            nll_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1) - jnp.take_along_axis(
                logits_BxTxV, targets_k[..., None], axis=-1)[..., 0]
            if weights_BxT is None:
                losses.append(jnp.mean(nll_BxT))
            else:
                w_BxT = weights_BxT[:, k:].astype(jnp.float32)
                losses.append(jnp.sum(nll_BxT * w_BxT) / jnp.maximum(jnp.sum(w_BxT), 1.0))
        return jnp.mean(jnp.stack(losses)), router_loss


def dense_layers(cfg: ModelConfig) -> int:
    """How many leading blocks keep the dense MLP in an MoE model (`moe.first_dense_layers`; 0 when dense)."""
    return cfg.moe.first_dense_layers if cfg.moe.enabled else 0


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs, n: int, dense_mlp: bool = False,
                    routed_experts: RoutedExperts | None = None) -> Block:
    """`n` blocks stacked on a leading `layers` axis (one vmapped `Block`)."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: axes.LAYERS})
    def make_blocks(rngs: nnx.Rngs) -> Block:
        return Block(cfg, rngs, dense_mlp, routed_experts)

    return make_blocks(rngs)


def _run_layers(layer: Callable, x_BxTxD: jax.Array, stacked: nnx.State, scan: bool) -> tuple[jax.Array, Any]:
    """Apply `layer(x, layer_state) -> (x, aux)` over the stacked layers' leading axis: (x, aux per layer), every
    leaf of the aux pytree stacked on a leading layers axis."""
    if scan:
        return jax.lax.scan(layer, x_BxTxD, stacked)
    # One split per weight, not a slice per layer: the transpose of a split is a single concatenate, while each
    # slice's transpose pads its layer's gradient to the whole stack and XLA re-adds those pads inside every
    # consumer (docs/BENCHMARKS.md has the cost).
    leaves, treedef = jax.tree.flatten(stacked)
    n_layers = leaves[0].shape[0]
    split = [[part.reshape(part.shape[1:]) for part in jnp.split(a, n_layers)] for a in leaves]
    aux = []
    for i in range(n_layers):
        x_BxTxD, aux_i = layer(x_BxTxD, jax.tree.unflatten(treedef, [parts[i] for parts in split]))
        aux.append(aux_i)
    return x_BxTxD, jax.tree.map(lambda *per_layer: jnp.stack(per_layer), *aux)


@jax.custom_vjp
def _head_with_compute_dtype_grad(x_BxTxD: jax.Array, head_DxV: jax.Array) -> jax.Array:
    """x @ head with float32 output; the backward rounds the float32 cotangent to x's dtype first, so both
    gradient matmuls run in the compute dtype (bfloat16 on GPU) rather than as float32 GEMMs."""
    return jnp.einsum("btd,dv->btv", x_BxTxD, head_DxV, preferred_element_type=jnp.float32)


def _head_fwd(x_BxTxD: jax.Array, head_DxV: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _head_with_compute_dtype_grad(x_BxTxD, head_DxV), (x_BxTxD, head_DxV)


def _head_bwd(residuals: tuple[jax.Array, jax.Array], g_BxTxV: jax.Array) -> tuple[jax.Array, jax.Array]:
    x_BxTxD, head_DxV = residuals
    g_BxTxV = g_BxTxV.astype(x_BxTxD.dtype)
    dx = jnp.einsum("btv,dv->btd", g_BxTxV, head_DxV, preferred_element_type=jnp.float32)
    dhead = jnp.einsum("btd,btv->dv", x_BxTxD, g_BxTxV, preferred_element_type=jnp.float32)
    return dx.astype(x_BxTxD.dtype), dhead.astype(head_DxV.dtype)


_head_with_compute_dtype_grad.defvjp(_head_fwd, _head_bwd)


def for_inference(model: Transformer) -> Transformer:
    """The same weights with every MoE layer dispatching dropless: at inference a token's output must not depend
    on which other tokens share its batch, as capacity dispatch makes it. Dense and dropless models come back
    unchanged."""
    cfg = model.cfg
    if not cfg.moe.enabled or cfg.moe.dispatch == "dropless":
        return model
    dropless = cfg.replace(moe=dataclasses.replace(cfg.moe, dispatch="dropless"))
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(dropless, rngs=nnx.Rngs(params=0),
                                                               attend=model.attend, layer_stack=model.layer_stack,
                                                               routed_experts=model.routed_experts)))
    return nnx.merge(graphdef, nnx.state(model))


def create_model(cfg: ModelConfig, seed: int = 0, *, attend: Attend | None = None,
                 layer_stack: LayerStack | None = None, routed_experts: RoutedExperts | None = None) -> Transformer:
    """A freshly initialised model (`attend`, `layer_stack`, `routed_experts`: see `Transformer`)."""
    return Transformer(cfg, rngs=nnx.Rngs(params=seed), attend=attend, layer_stack=layer_stack,
                       routed_experts=routed_experts)
