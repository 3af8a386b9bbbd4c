"""An EAGLE-style draft head (Li et al. 2024, EAGLE-1/2): one decoder layer that predicts the target model's next
feature from its current feature and the next token, for speculative decoding.

The target's feature f_t is the output of its last block at position t, before the final norm (`Transformer.hidden`).
Pair i of a sequence is [f_i, e(x_{i+1})] (2D wide: the feature and the embedding of the token after it), projected
by a Linear 2D -> D (with bias) and run through one `model.transformer.Block` of the target's shape (causal
attention over the pairs, RoPE at absolute positions: pair i sits at position i). Its output g_i predicts f_{i+1},
and the target's own final norm and LM head applied to g_i give the distribution of x_{i+2}. The head owns only
the Linear and the Block; the embedding, final norm and LM head are the target's, passed in at every call (frozen,
never saved with the head). The block is dense even for an MoE target (EAGLE's head is a plain Llama layer).

Style "mtp" is the same head shaped as DeepSeek-V3's depth-1 multi-token prediction module (model/mtp.py): the head
is an `MTPModule` (input norms on both halves, the embedding first, no bias, the target's kind of block, MoE
included, and its own output norm before the target's LM head), and `mtp_draft_head` builds it from a target trained
with `model.mtp_depth >= 1` by taking that module's weights. MTP's pair i is the same [h_i, e(x_{i+1})] predicting
x_{i+2}, so drafting and serving treat both styles alike; drafting past the first token feeds the module its own
output h^1 back as the next hidden state, as EAGLE feeds g.

Drafting (`draft_tokens`) feeds the head its own predicted features back: from the target's f_0..f_t and the tokens
x_0..x_{t+1}, g_t gives the first drafted token d_1; then pair t+1 is [g_t, e(d_1)], whose output gives d_2, and so
on for Nd tokens. It recomputes the head over the whole sequence at each of the Nd steps (no cache): simple, exact,
and cheap next to the target, since the head is one layer.

Saved heads (`save_draft_head`, `load_draft_head`) are a folder: `draft_head.npz` (the parameters, float32, one
array per parameter path) and `draft_head.json` (the target's model config, and whatever the trainer records:
the target's source, steps, metrics). They live here, not in train/, so that serving can load a head.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model import axes
from model.checks import check_bool, check_int, check_one_of
from model.config import ModelConfig, MoEConfig
from model.layers import normal, param, rope_tables
from model.mtp import MTPModule
from model.transformer import Attend, Block, Transformer

WEIGHTS_FILE = "draft_head.npz"
META_FILE = "draft_head.json"
STYLES = ("eagle", "mtp")


@dataclasses.dataclass(frozen=True)
class DraftHeadConfig:
    """The head of a target whose model config is `target` (its layer's shape, and the width and vocabulary of
    the features and tokens it reads); `fc_bias`: a bias on the 2D -> D projection (EAGLE-1 has one); `style`:
    "eagle" (Linear -> one dense Block -> the target's final norm) or "mtp" (DeepSeek-V3's MTP module: input norms,
    [embedding; feature], no bias, the target's kind of block, its own output norm; `fc_bias` must be False)."""

    target: ModelConfig
    fc_bias: bool = True
    style: str = "eagle"

    def __post_init__(self) -> None:
        if not isinstance(self.target, ModelConfig):
            raise ValueError(f"draft_head.target must be a ModelConfig, got {self.target!r}")
        check_bool("draft_head.fc_bias", self.fc_bias)
        check_one_of("draft_head.style", self.style, STYLES)
        if self.style == "mtp" and self.fc_bias:
            raise ValueError("draft_head.fc_bias must be False with draft_head.style 'mtp' (DeepSeek-V3's MTP "
                             "projection has no bias)")

    @property
    def block_config(self) -> ModelConfig:
        """The config its one layer is built from: the target's, one dense layer ("eagle"), or one layer of the
        target's kind, an MoE layer for an MoE target ("mtp", as model/transformer.py builds its MTP blocks)."""
        if self.style == "mtp":
            moe = dataclasses.replace(self.target.moe, first_dense_layers=0)
            return self.target.replace(n_layers=1, moe=moe, scan_layers=False, remat="none", loss_chunks=0,
                                       mtp_depth=0)
        return self.target.replace(n_layers=1, moe=MoEConfig(), scan_layers=False, remat="none", loss_chunks=0)

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target.to_dict(), "fc_bias": self.fc_bias, "style": self.style}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DraftHeadConfig:
        return cls(target=ModelConfig.from_dict(values["target"]), fc_bias=values.get("fc_bias", True),
                   style=values.get("style", "eagle"))


def check_compatible(cfg: DraftHeadConfig, target: ModelConfig) -> None:
    """ValueError unless `target` has the vocabulary and width the head was made for."""
    for name in ("vocab_size", "d_model"):
        ours, theirs = getattr(cfg.target, name), getattr(target, name)
        if ours != theirs:
            raise ValueError(f"the draft head was made for a target with {name} {ours}, but this target has "
                             f"{name} {theirs}")


class DraftHead(nnx.Module):
    """[f_i, e(x_{i+1})] -> Linear -> one Block -> g_i, the predicted f_{i+1} (the module docstring); style "mtp":
    an `MTPModule` over (f_i, e(x_{i+1}))."""

    def __init__(self, cfg: DraftHeadConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        block_cfg = cfg.block_config
        if cfg.style == "mtp":
            self.mtp = MTPModule(block_cfg, Block(block_cfg, rngs), rngs)
            return
        d, pd = block_cfg.d_model, block_cfg.weight_dtype
        self.fc = param(rngs, normal(block_cfg.init_std), (2 * d, d), (None, axes.EMBED), pd)
        if cfg.fc_bias:
            self.fc_bias = param(rngs, jax.nn.initializers.zeros, (d,), (axes.EMBED,), pd)
        self.block = Block(block_cfg, rngs)

    def __call__(self, features_BxTxD: jax.Array, embeds_BxTxD: jax.Array, positions_BxT: jax.Array,
                 attend: Attend | None = None) -> jax.Array:
        """Pairs (the target's features, the next tokens' embeddings) at `positions` -> g [B, T, D] (compute
        dtype); `attend` replaces the causal self-attention over this call's pairs (see `Block`)."""
        block_cfg = self.cfg.block_config
        cos, sin = rope_tables(positions_BxT, block_cfg.rope_dim, block_cfg.rope_theta, block_cfg.rope_scaling)
        if self.cfg.style == "mtp":
            return self.mtp(features_BxTxD, embeds_BxTxD, cos, sin, attend)[0]
        dt = block_cfg.compute_dtype
        pair_BxTx2D = jnp.concatenate([features_BxTxD.astype(dt), embeds_BxTxD.astype(dt)], axis=-1)
        x_BxTxD = jnp.einsum("btc,cd->btd", pair_BxTx2D, self.fc[...].astype(dt))
        if self.cfg.fc_bias:
            x_BxTxD = x_BxTxD + self.fc_bias[...].astype(dt)
        return self.block(x_BxTxD, cos, sin, attend)[0]

    def logits(self, target: Transformer, g_BxTxD: jax.Array) -> jax.Array:
        """The float32 logits [B, T, V] of the head's outputs g: the target's final norm and LM head ("eagle"), or
        the module's own output norm and the target's LM head ("mtp", as `Transformer.mtp_logits` computes them)."""
        if self.cfg.style == "mtp":
            return target._project(self.mtp.norm(g_BxTxD))
        return target.logits(g_BxTxD)


def create_draft_head(target: ModelConfig, seed: int = 0, fc_bias: bool = True) -> DraftHead:
    """A freshly initialised head for a target of config `target`."""
    return DraftHead(DraftHeadConfig(target, fc_bias), rngs=nnx.Rngs(params=seed))


def mtp_draft_head(target: Transformer) -> DraftHead:
    """A draft head of style "mtp" that is `target`'s depth-1 multi-token prediction module (the same arrays, not
    copies; deeper modules are unused). Raises ValueError when `target` has none (model.mtp_depth 0)."""
    if not getattr(target.cfg, "mtp_depth", 0):
        raise ValueError("speculative method 'mtp' needs a model trained with multi-token prediction "
                         "(model.mtp_depth >= 1), but this model has model.mtp_depth 0")
    head = nnx.eval_shape(lambda: DraftHead(DraftHeadConfig(target.cfg, fc_bias=False, style="mtp"),
                                            rngs=nnx.Rngs(params=0)))
    nnx.update(head.mtp, nnx.state(target.mtp[0]))
    return head


def draft_forward(head: DraftHead, target: Transformer, features_BxTxD: jax.Array, next_tokens_BxT: jax.Array,
                  positions_BxT: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The training form: every pair of a batch at once. `features[:, i]` is f_i, `next_tokens[:, i]` is
    x_{i+1}; returns (g [B, T, D], the target's float32 logits of g [B, T, V]): g[:, i] predicts f_{i+1}, the
    logits x_{i+2}. `positions` default to 0..T-1."""
    if positions_BxT is None:
        positions_BxT = jnp.broadcast_to(jnp.arange(next_tokens_BxT.shape[1]), next_tokens_BxT.shape)
    g_BxTxD = head(features_BxTxD, target.embed_tokens(next_tokens_BxT), positions_BxT)
    return g_BxTxD, head.logits(target, g_BxTxD)


def draft_tokens(head: DraftHead, target: Transformer, features_TxD: jax.Array, tokens_T1: jax.Array, k: int, *,
                 temperature: float | jax.Array = 0.0, key: jax.Array | None = None,
                 length: int | jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Draft k tokens for one sequence without a cache: (tokens [Nd] int32, their draft distributions q [Nd, V]
    float32), Nd = k.

    `features_TxD` holds the target's features f_0..f_{n-1} and `tokens_T1` the tokens x_0..x_n, n = `length`
    (default T; rows past it are padding, ignored, so a caller can bucket T and not recompile). Step j feeds pair
    n-1+j (the target's last feature and token at j = 0, then the head's own g and drafted token) and drafts
    d_{j+1} from the target's LM head on the head's output: its argmax at `temperature` 0 (q is then one-hot on
    it), else a draw from q = softmax(logits / temperature) with `key`. Jit with `k` static; `temperature`,
    `key` and `length` may be traced."""
    check_int("k (tokens to draft)", k)
    check_compatible(head.cfg, target.cfg)
    if features_TxD.ndim != 2 or features_TxD.shape[1] != target.cfg.d_model:
        raise ValueError(f"features must be [T, d_model={target.cfg.d_model}], got shape {features_TxD.shape}")
    T = features_TxD.shape[0]
    if tokens_T1.shape != (T + 1,):
        raise ValueError(f"tokens must be [T + 1] = [{T + 1}] for features of length {T}, got shape "
                         f"{tokens_T1.shape}")
    if isinstance(temperature, (int, float)) and temperature > 0 and key is None:
        raise ValueError(f"sampling at temperature {temperature} needs a key")
    key = jax.random.key(0) if key is None else key
    n = T if length is None else length
    Tk = T + k  # room for k - 1 drafted pairs after the given ones (and one unused slot)
    feats_TkxD = jnp.zeros((Tk, features_TxD.shape[1]), features_TxD.dtype).at[:T].set(features_TxD)
    next_Tk = jnp.zeros((Tk,), jnp.int32).at[:T].set(tokens_T1[1:].astype(jnp.int32))
    positions_1xTk = jnp.arange(Tk)[None]
    temperature = jnp.asarray(temperature, jnp.float32)

    def step(carry: tuple[jax.Array, jax.Array], j_key: tuple[jax.Array, jax.Array]
             ) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
        feats_TkxD, next_Tk = carry
        j, step_key = j_key
        i = n - 1 + j  # the pair whose output drafts this step's token
        g_TkxD = head(feats_TkxD[None], target.embed_tokens(next_Tk[None]), positions_1xTk)[0]
        g_D = jax.lax.dynamic_index_in_dim(g_TkxD, i, keepdims=False)
        logits_V = head.logits(target, g_D[None, None])[0, 0]
        sampling = temperature > 0
        scaled_V = logits_V / jnp.where(sampling, temperature, 1.0)
        token = jnp.where(sampling, jax.random.categorical(step_key, scaled_V), jnp.argmax(logits_V))
        token = token.astype(jnp.int32)
        q_V = jnp.where(sampling, jax.nn.softmax(scaled_V), jax.nn.one_hot(token, logits_V.shape[0]))
        feats_TkxD = jax.lax.dynamic_update_index_in_dim(feats_TkxD, g_D.astype(feats_TkxD.dtype), i + 1, 0)
        next_Tk = jax.lax.dynamic_update_index_in_dim(next_Tk, token, i + 1, 0)
        return (feats_TkxD, next_Tk), (token, q_V.astype(jnp.float32))

    _, (tokens_Nd, q_NdxV) = jax.lax.scan(step, (feats_TkxD, next_Tk), (jnp.arange(k), jax.random.split(key, k)))
    return tokens_Nd, q_NdxV


def _flat_params(head: DraftHead) -> dict[str, np.ndarray]:
    """The head's parameters as {"block/attn/wq": float32 array, ...}."""
    flat = nnx.to_flat_state(nnx.state(head, nnx.Param))
    return {"/".join(map(str, path)): np.asarray(jax.device_get(v.get_value()), np.float32) for path, v in flat}


def save_draft_head(head: DraftHead, directory: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write the head's parameters and config (plus `meta`, e.g. the target's source) into `directory`."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / WEIGHTS_FILE, **_flat_params(head))
    record = {**(meta or {}), "config": head.cfg.to_dict()}
    (out / META_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return out


def load_draft_head(directory: str | Path, target: ModelConfig | None = None) -> tuple[DraftHead, dict[str, Any]]:
    """(the head saved in `directory`, its json record). With `target`, refuse a head made for another vocabulary
    or width. Raises FileNotFoundError or ValueError naming the problem."""
    where = Path(directory)
    for name in (WEIGHTS_FILE, META_FILE):
        if not (where / name).is_file():
            raise FileNotFoundError(f"{str(where)!r} is not a saved draft head: it has no {name}")
    meta = json.loads((where / META_FILE).read_text())
    cfg = DraftHeadConfig.from_dict(meta["config"])
    if target is not None:
        check_compatible(cfg, target)
    head = nnx.eval_shape(lambda: DraftHead(cfg, rngs=nnx.Rngs(params=0)))
    graphdef, state = nnx.split(head)
    flat = nnx.to_flat_state(state)
    with np.load(where / WEIGHTS_FILE) as saved:
        names = {"/".join(map(str, path)) for path, _ in flat}
        if names != set(saved.files):
            raise ValueError(f"{str(where / WEIGHTS_FILE)!r} does not match the draft head's parameters: missing "
                             f"{sorted(names - set(saved.files))}, unexpected {sorted(set(saved.files) - names)}")
        for path, variable in flat:
            array = saved["/".join(map(str, path))]
            if array.shape != variable.shape:
                raise ValueError(f"parameter {'/'.join(map(str, path))} has shape {list(array.shape)} in "
                                 f"{str(where)!r}, expected {list(variable.shape)}")
            variable.set_value(jnp.asarray(array, variable.dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(flat)), meta
