"""What a run trains on, beyond the config: its tokenizer (train/run_tokenizer.py), the tokenized text or, for
SFT, the weighted chat data (train/sft.py), its batches, its starting parameters (fresh or pretrained,
train/pretrained.py), and validation in bits per byte.

Bits per byte are computed from the bytes the validation targets stand for (`token_byte_lengths`), not from
loss / ln 2 per token, so runs with different tokenizers compare: val_bpb = (sum of the targets' losses in nats)
/ (ln 2 x the bytes of those targets). For the byte tokenizer every target is one byte and this is loss / ln 2.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import optax

from train.config import RunConfig
from train.data import Corpus, load_corpus, windows_at
from train.run_tokenizer import (
    RUN_TOKENIZER_FILE,
    AnyTokenizer,
    run_tokenizer,
    save_run_tokenizer,
    token_byte_lengths,
    training_tokenizer,
)
from train.sharded import MeshPlan, global_batch, init_sharded_train_state
from train.step import Batch, TrainState

EVAL_SEED = 12345  # validation windows are the same for every evaluation and every run


@dataclasses.dataclass(frozen=True)
class RunData:
    """A run's tokenizer, its corpus (with loss weights for SFT), and each id's length in bytes."""

    tokenizer: AnyTokenizer
    corpus: Corpus
    token_bytes: np.ndarray

    @property
    def weighted(self) -> bool:
        return self.corpus.train_weights is not None


def run_data_tokenizer(cfg: RunConfig, out: str | Path) -> AnyTokenizer:
    """The run's own copy of its tokenizer when `out` has one (a resumed run), else `train.tokenizer`'s. Raises
    ValueError naming both numbers if `model.vocab_size` cannot hold the tokenizer's ids."""
    copy = Path(out) / RUN_TOKENIZER_FILE
    tokenizer = run_tokenizer(out) if copy.is_file() else training_tokenizer(cfg.train.tokenizer)
    if cfg.model.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's "
                         f"{tokenizer.vocab_size} ids (train.tokenizer={cfg.train.tokenizer!r}); set "
                         f"model.vocab_size={tokenizer.vocab_size} or more")
    return tokenizer


def load_run_data(cfg: RunConfig, out: str | Path) -> RunData:
    """The tokenizer and the tokenized training text (or chat data, with `train.sft`) of the run in `out`."""
    t = cfg.train
    tokenizer = run_data_tokenizer(cfg, out)
    if t.sft:
        from train.sft import load_chat_corpus

        corpus = load_chat_corpus(t.data, tokenizer, val_fraction=t.val_fraction)
    else:
        corpus = load_corpus(t.data, val_fraction=t.val_fraction, tokenizer=tokenizer)
    return RunData(tokenizer, corpus, token_byte_lengths(tokenizer))


def keep_tokenizer(data: RunData, out: str | Path) -> None:
    """Write the run's copy of its tokenizer into `out` (process 0, when the run directory is written)."""
    save_run_tokenizer(data.tokenizer, out)


def data_batch(data: RunData, sharding: jax.sharding.NamedSharding, shape: tuple[int, ...], *, seed: int,
               step: int, split: str = "train") -> Batch:
    """Batch `step` of stream `seed` (global_batch) of the training or validation split: token ids, and for SFT
    the pair (tokens, weights) cut from the same places."""
    corpus = data.corpus
    tokens = global_batch(getattr(corpus, split), sharding, shape, seed=seed, step=step)
    weights = getattr(corpus, f"{split}_weights")
    if weights is None:
        return tokens
    return tokens, global_batch(weights, sharding, shape, seed=seed, step=step)


def batch_struct(data: RunData, shape: tuple[int, ...], sharding: jax.sharding.NamedSharding):
    """The ShapeDtypeStruct(s) of a training batch, to lower the step with."""
    one = jax.ShapeDtypeStruct(shape, np.int32, sharding=sharding)
    return (one, one) if data.weighted else one


def evaluate_run(eval_step: Callable, params: dict, data: RunData, cfg: RunConfig,
                 rows: jax.sharding.NamedSharding) -> dict[str, float]:
    """Validation over `eval_batches` fixed windows: `val_loss`, the mean loss in nats per target token (per
    assistant token for SFT), and `val_bpb` from the bytes those targets stand for (module docstring).
    `eval_step` is `sharded_eval_step` (mean loss), or `sharded_weighted_eval_step` for SFT."""
    t = cfg.train
    n_rows = t.batch_size // t.grad_accum
    shape = (n_rows, t.seq_len + 1)
    nats = weight = n_bytes = 0.0
    for i in range(t.eval_batches):
        batch = data_batch(data, rows, shape, seed=EVAL_SEED, step=i, split="val")
        targets = windows_at(data.corpus.val, seed=EVAL_SEED, step=i, batch_size=n_rows, seq_len=t.seq_len)[:, 1:]
        if data.weighted:
            loss_sum, w = eval_step(params, *batch)
            nats, weight = nats + float(loss_sum), weight + float(w)
            w_targets = windows_at(data.corpus.val_weights, seed=EVAL_SEED, step=i, batch_size=n_rows,
                                   seq_len=t.seq_len)[:, 1:]
            n_bytes += float(np.sum(data.token_bytes[targets] * w_targets))
        else:
            nats += float(eval_step(params, batch)) * targets.size
            weight += targets.size
            n_bytes += float(np.sum(data.token_bytes[targets]))
    return {"val_loss": nats / max(weight, 1.0), "val_bpb": nats / (math.log(2) * max(n_bytes, 1.0))}


def initial_state(plan: MeshPlan, optimizer: optax.GradientTransformation, cfg: RunConfig) -> TrainState:
    """A fresh train state: random parameters (`train.seed`), or those of `train.init` loaded straight into
    their shardings; the optimizer's state is new either way."""
    if cfg.train.init is None:
        return plan.init_state(optimizer, seed=cfg.train.seed)
    from train.pretrained import load_pretrained_params

    params = load_pretrained_params(cfg.train.init, cfg.model, plan.abstract_params, plan.params_shardings)
    return init_sharded_train_state(params, optimizer, plan.state_shardings)
