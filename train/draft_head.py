"""Training an EAGLE-style draft head (model/draft_head.py) on a frozen target model.

The target comes from a meshlm run ("run:DIR[@STEP]"), a Hugging Face directory ("hf:DIR") or a GGUF file
("gguf:FILE"), with its own tokenizer; the corpus (a text file, folder or glob, or the default corpus of
train/data.py) is tokenized with it and read as random windows of seq_len + 1 tokens, a pure function of (seed,
step). For each batch the target computes its features f and logits once, without gradients; on the pairs
i = 0..T-2 ([f_i, e(x_{i+1})]) the head's output g_i is fitted to f_{i+1} by smooth L1 (Huber, delta 1, mean over
features and positions) plus `w_cls` times the cross-entropy of the target's LM head on g_i against the target's
own next-token distribution at i+1 (`cls_target="target"`, distillation) or the actual token x_{i+2}
(`"data"`). EAGLE-1 uses L_reg + 0.1 L_cls. `agree` is the share of positions where the head's argmax token
equals the target's argmax next token: what greedy speculation would accept as the first drafted token.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from model.checks import check_int, check_ints, check_numbers, check_one_of
from model.draft_head import DraftHead, create_draft_head, draft_forward, draft_tokens, save_draft_head
from model.transformer import Transformer, for_inference
from train.data import load_corpus, windows_at
from train.metrics import MetricsLog
from train.pretrained import init_source
from train.run_tokenizer import AnyTokenizer, training_tokenizer

CLS_TARGETS = ("target", "data")


@dataclasses.dataclass(frozen=True)
class DraftTrainConfig:
    """How to train a draft head: `steps` AdamW steps (linear warmup over `warmup_steps`, cosine decay to a tenth
    of `lr`, gradients clipped to `clip_norm`) on batches of `batch_size` windows of `seq_len` + 1 tokens;
    the loss weights of the module docstring; `seed` draws the head's initial weights and the windows;
    `eval_batches` validation batches at the end (0: none), on which `greedy_acceptance` of
    `eval_draft_tokens` drafts is measured too (0: not); a metrics record every `log_every` steps."""

    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    clip_norm: float = 0.5
    w_cls: float = 0.1
    cls_target: str = "target"
    seed: int = 0
    eval_batches: int = 8
    eval_draft_tokens: int = 4
    log_every: int = 10

    def __post_init__(self) -> None:
        check_ints("draft.", self, ("steps", "batch_size", "log_every"))
        check_ints("draft.", self, ("warmup_steps", "seed", "eval_batches", "eval_draft_tokens"), minimum=0)
        check_int("draft.seq_len", self.seq_len)
        if self.seq_len < 2:
            raise ValueError(f"draft.seq_len must be at least 2 (a pair and the feature after it), got {self.seq_len}")
        check_numbers("draft.", self, ("lr", "clip_norm"))
        check_numbers("draft.", self, ("weight_decay", "w_cls"), strict=False)
        check_one_of("draft.cls_target", self.cls_target, CLS_TARGETS)
        if self.eval_draft_tokens > self.seq_len - 2:
            raise ValueError(f"draft.eval_draft_tokens must be at most draft.seq_len - 2 = {self.seq_len - 2} (the "
                             f"windows it drafts after are seq_len - eval_draft_tokens long), got "
                             f"{self.eval_draft_tokens}")


def load_target(spec: str) -> tuple[Transformer, AnyTokenizer]:
    """(the model, its tokenizer) of "run:DIR[@STEP]", "hf:DIR" or "gguf:FILE", ready for inference. Raises
    FileNotFoundError or ValueError naming the problem."""
    kind, path, step = init_source(spec)
    if kind == "run":
        from train.loop import load_params

        model = load_params(path, step)[1]
    elif kind == "hf":
        from model.hf import load_hf

        model = load_hf(path)
    else:
        from model.gguf import load_gguf

        model = load_gguf(path)
    return for_inference(model), training_tokenizer(spec)


def draft_loss(head: DraftHead, target: Transformer, tokens_BxT1: jax.Array, w_cls: float, cls_target: str
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, {"loss", "reg", "cls", "agree"}) of the head on windows `tokens` [B, T + 1] (module docstring)."""
    x_BxT = tokens_BxT1[:, :-1]
    f_BxTxD = jax.lax.stop_gradient(target.hidden(x_BxT))
    target_logits_BxTxV = jax.lax.stop_gradient(target.logits(f_BxTxD))
    g_BxTxD, logits_BxTxV = draft_forward(head, target, f_BxTxD[:, :-1], x_BxT[:, 1:])  # pairs 0..T-2
    reg = jnp.mean(optax.huber_loss(g_BxTxD.astype(jnp.float32), f_BxTxD[:, 1:].astype(jnp.float32), delta=1.0))
    log_q_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
    if cls_target == "target":
        p_BxTxV = jax.nn.softmax(target_logits_BxTxV[:, 1:], axis=-1)
        cls = -jnp.mean(jnp.sum(p_BxTxV * log_q_BxTxV, axis=-1))
    else:
        cls = -jnp.mean(jnp.take_along_axis(log_q_BxTxV, tokens_BxT1[:, 2:, None], axis=-1))
    agree = jnp.mean(jnp.argmax(logits_BxTxV, -1) == jnp.argmax(target_logits_BxTxV[:, 1:], -1))
    loss = reg + w_cls * cls
    return loss, {"loss": loss, "reg": reg, "cls": cls, "agree": agree.astype(jnp.float32)}


def greedy_acceptance(head: DraftHead, target: Transformer, windows_BxT1: jax.Array, k: int) -> jax.Array:
    """How many of the head's k greedy drafts after each window the target's greedy decoding would accept [B]
    (0..k): the drafts from the target's features of the window (`draft_tokens`) against the target's own
    greedy continuation of it (k full forwards, no cache). Jit with `k` static."""
    T1 = windows_BxT1.shape[1]
    features_BxTxD = target.hidden(windows_BxT1[:, :-1])

    def extend(seq_BxS: jax.Array, j: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits_BxV = jax.lax.dynamic_index_in_dim(target(seq_BxS), T1 - 1 + j, axis=1, keepdims=False)
        token_B = jnp.argmax(logits_BxV, -1).astype(seq_BxS.dtype)
        return jax.lax.dynamic_update_index_in_dim(seq_BxS, token_B[:, None], T1 + j, axis=1), token_B

    padded_BxS = jnp.pad(windows_BxT1, ((0, 0), (0, k)))
    _, greedy_NdxB = jax.lax.scan(extend, padded_BxS, jnp.arange(k))
    drafts_BxNd, _ = jax.vmap(lambda f, x: draft_tokens(head, target, f, x, k))(features_BxTxD, windows_BxT1)
    return jnp.sum(jnp.cumprod(drafts_BxNd == greedy_NdxB.T, axis=1), axis=1)


def make_optimizer(cfg: DraftTrainConfig) -> optax.GradientTransformation:
    """AdamW with warmup and cosine decay, clipped; weight decay on matrices only (the head has no stacked axis,
    so a 1-D parameter is a norm scale or a bias)."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, min(cfg.warmup_steps, cfg.steps - 1), cfg.steps,
                                                  cfg.lr * 0.1)

    def matrices(params: nnx.State) -> nnx.State:
        return jax.tree.map(lambda p: p.ndim >= 2, params)

    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                       optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=matrices))


def make_steps(head: DraftHead, target: Transformer, cfg: DraftTrainConfig, optimizer: optax.GradientTransformation
               ) -> tuple[Callable, Callable]:
    """(train_step(head_params, opt_state, target_params, tokens) -> (head_params, opt_state, metrics),
    eval_step(head_params, target_params, tokens) -> metrics), jitted; the head's state is donated."""
    head_def, target_def = nnx.graphdef(head), nnx.graphdef(target)

    def objective(head_params: nnx.State, target_params: nnx.State, tokens_BxT1: jax.Array
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
        return draft_loss(nnx.merge(head_def, head_params), nnx.merge(target_def, target_params), tokens_BxT1,
                          cfg.w_cls, cfg.cls_target)

    def train_step(head_params: nnx.State, opt_state: Any, target_params: nnx.State, tokens_BxT1: jax.Array
                   ) -> tuple[nnx.State, Any, dict[str, jax.Array]]:
        grads, metrics = jax.grad(objective, has_aux=True)(head_params, target_params, tokens_BxT1)
        updates, opt_state = optimizer.update(grads, opt_state, head_params)
        return optax.apply_updates(head_params, updates), opt_state, {**metrics,
                                                                       "grad_norm": optax.tree.norm(grads)}

    return (jax.jit(train_step, donate_argnums=(0, 1)),
            jax.jit(lambda h, t, tokens: objective(h, t, tokens)[1]))


def fit_draft_head(target: Transformer, train_tokens: np.ndarray, cfg: DraftTrainConfig,
                   val_tokens: np.ndarray | None = None,
                   on_record: Callable[[dict[str, Any]], None] | None = None) -> tuple[DraftHead, dict[str, Any]]:
    """Train a fresh head for `target` on windows of the flat token array `train_tokens`; each record (every
    `log_every` steps, then the validation metrics on `val_tokens` as "val_*") goes to `on_record`. Returns
    (the head, the last record)."""
    if cfg.seq_len > target.cfg.max_seq_len:
        raise ValueError(f"draft.seq_len {cfg.seq_len} exceeds the target's max_seq_len {target.cfg.max_seq_len}")
    if len(train_tokens) < cfg.seq_len + 1:
        raise ValueError(f"the corpus has {len(train_tokens)} training tokens, fewer than one window of "
                         f"draft.seq_len + 1 = {cfg.seq_len + 1}")
    head = create_draft_head(target.cfg, seed=cfg.seed)
    optimizer = make_optimizer(cfg)
    head_params, target_params = nnx.state(head), nnx.state(target)
    opt_state = optimizer.init(head_params)
    train_step, eval_step = make_steps(head, target, cfg, optimizer)
    report = on_record or (lambda record: None)
    last: dict[str, Any] = {}
    began = time.perf_counter()
    for step in range(cfg.steps):
        tokens = windows_at(train_tokens, seed=cfg.seed, step=step, batch_size=cfg.batch_size, seq_len=cfg.seq_len)
        head_params, opt_state, metrics = train_step(head_params, opt_state, target_params, tokens)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            last = {"step": step + 1, **{k: float(v) for k, v in metrics.items()},
                    "elapsed_s": time.perf_counter() - began}
            report(last)
    head = nnx.merge(nnx.graphdef(head), head_params)
    if cfg.eval_batches and val_tokens is not None and len(val_tokens) > cfg.seq_len:
        last = {**last, **evaluate_draft_head(head, target, val_tokens, cfg, eval_step)}
        report(last)
    return head, last


def evaluate_draft_head(head: DraftHead, target: Transformer, val_tokens: np.ndarray, cfg: DraftTrainConfig,
                        eval_step: Callable | None = None) -> dict[str, float]:
    """The head's metrics on `cfg.eval_batches` held-out batches ("val_loss", "val_agree", ...) and, with
    `eval_draft_tokens` k, the share of windows whose first greedy draft the target accepts
    ("val_first_accepted") and the mean number of drafts accepted ("val_accepted", 0..k)."""
    eval_step = eval_step or make_steps(head, target, cfg, make_optimizer(cfg))[1]
    windows = [windows_at(val_tokens, seed=cfg.seed + 1, step=i, batch_size=cfg.batch_size, seq_len=cfg.seq_len)
               for i in range(cfg.eval_batches)]
    val = [eval_step(nnx.state(head), nnx.state(target), w) for w in windows]
    record = {f"val_{k}": float(np.mean([float(m[k]) for m in val])) for k in val[0]}
    if k := cfg.eval_draft_tokens:
        accept = jax.jit(greedy_acceptance, static_argnames="k")
        accepted = np.concatenate([np.asarray(accept(head, target, w[:, :cfg.seq_len + 1 - k], k=k))
                                   for w in windows])
        record.update(val_first_accepted=float(np.mean(accepted >= 1)), val_accepted=float(np.mean(accepted)))
    return record


def train_draft_head(target_spec: str, out: str | Path, cfg: DraftTrainConfig, corpus: str | None = None,
                     on_record: Callable[[dict[str, Any]], None] | None = None,
                     cache_dir: str | Path | None = None) -> tuple[DraftHead, dict[str, Any]]:
    """Train a head for the target `target_spec` on `corpus` (None: train/data.py's default corpus, tokenized
    with the target's tokenizer), logging to `out`/metrics.jsonl and saving the head into `out`
    (`load_draft_head(out)` reads it back). Returns (the head, the last record). Raises FileNotFoundError or
    ValueError naming bad input."""
    target, tokenizer = load_target(target_spec)
    if tokenizer.vocab_size > target.cfg.vocab_size:
        raise ValueError(f"the tokenizer of {target_spec!r} has {tokenizer.vocab_size} ids but the model's "
                         f"vocabulary is {target.cfg.vocab_size}")
    data = load_corpus(corpus, tokenizer=tokenizer, cache_dir=cache_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics_log = MetricsLog(out / "metrics.jsonl")

    def record(values: dict[str, Any]) -> None:
        metrics_log.write(values)
        if on_record:
            on_record(values)

    try:
        head, last = fit_draft_head(target, data.train, cfg, data.val, record)
    finally:
        metrics_log.close()
    save_draft_head(head, out, {"target_source": target_spec, "corpus": corpus, "train": dataclasses.asdict(cfg),
                                "metrics": last})
    return head, last
