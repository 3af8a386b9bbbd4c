"""AdamW with linear warmup, cosine decay to a floor, global-norm clipping, and no decay on norms or biases."""

from __future__ import annotations

import jax
import optax

from train.config import TrainConfig


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """0 -> lr linearly over warmup_steps, then cosine to lr * min_lr_ratio at `steps` (the run's length)."""
    warmup = min(cfg.warmup_steps, cfg.steps - 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup, decay_steps=cfg.steps,
        end_value=cfg.lr * cfg.min_lr_ratio)


NO_DECAY = frozenset({"scale", "bq", "bk", "bv"})  # RMSNorm scales and attention biases


def decay_mask(params: dict) -> dict:
    """True where weight decay applies: embeddings and projection matrices, not norm scales or biases. (With
    the stacked `layers` axis a norm scale is 2-D, so the test is by name, not by ndim.)"""
    def decays(path: tuple, leaf: jax.Array) -> bool:
        return str(getattr(path[-1], "key", path[-1])) not in NO_DECAY
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(lr_schedule(cfg), b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                    mask=decay_mask),
    )
