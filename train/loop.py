"""The training loop: build or resume the state, step, evaluate, checkpoint, and report metrics."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.transformer import create_model
from train.checkpoint import Checkpointer
from train.config import RunConfig
from train.data import Corpus, batch_at, load_corpus
from train.metrics import MetricsLog
from train.optimizer import lr_schedule, make_optimizer
from train.step import init_train_state, make_eval_step, make_train_step
from train.tokenizer import ByteTokenizer

log = logging.getLogger(__name__)

EVAL_SEED = 12345  # validation windows are the same for every evaluation and every run


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradient; the run stopped without saving the bad state."""


def evaluate(eval_step: Callable, params: dict, corpus: Corpus, cfg: RunConfig) -> dict[str, float]:
    """Mean validation loss (nats per token) over `eval_batches` fixed windows, and bits per byte (the byte
    tokenizer makes a token a byte; the EOS between files is counted as one)."""
    t = cfg.train
    rows = t.batch_size // t.grad_accum
    losses = [float(eval_step(params, batch_at(corpus.val, seed=EVAL_SEED, step=i, batch_size=rows,
                                                 seq_len=t.seq_len)))
              for i in range(t.eval_batches)]
    val_loss = float(np.mean(losses))
    return {"val_loss": val_loss, "val_bpb": val_loss / math.log(2)}


def check_run_dir(out: Path, cfg: RunConfig) -> None:
    """Refuse to resume a run directory that holds a run with a different configuration."""
    saved = out / "config.json"
    if not saved.exists():
        return
    old = RunConfig.from_dict(json.loads(saved.read_text()))
    if old != cfg:
        diffs = [f"{section}.{k}: {v!r} -> {getattr(getattr(cfg, section), k)!r}"
                 for section in ("model", "train")
                 for k, v in getattr(old, section).__dict__.items() if getattr(getattr(cfg, section), k) != v]
        raise ValueError(f"{out} holds a run with a different config ({'; '.join(diffs)}); "
                         "use a new --out, or the same settings to resume it")


def train(cfg: RunConfig, out_dir: str | Path, *, flops_per_token: float | None = None,
          peak_flops: float | None = None, on_record: Callable[[dict[str, Any]], None] | None = None
          ) -> dict[str, Any]:
    """Train `cfg` in `out_dir`, resuming from its newest checkpoint if there is one. Returns the last record.

    Every `log_every` steps a record {step, loss, lr, grad_norm, tokens_per_s, mfu} goes to metrics.jsonl and
    `on_record`; evaluations add {val_loss, val_bpb}. Raises NonFiniteError naming the step if the loss or
    gradient norm stops being finite; the newest checkpoint on disk is then the last good one."""
    t = cfg.train
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.model.vocab_size < ByteTokenizer.vocab_size:
        raise ValueError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the byte tokenizer's "
                         f"{ByteTokenizer.vocab_size} ids")
    check_run_dir(out, cfg)
    (out / "config.json").write_text(cfg.to_json())
    corpus = load_corpus(t.data, val_fraction=t.val_fraction)

    graphdef, params = nnx.split(create_model(cfg.model, seed=t.seed))
    params = nnx.to_pure_dict(params)
    optimizer, schedule = make_optimizer(t), lr_schedule(t)
    state = init_train_state(params, optimizer)
    ckpt = Checkpointer(out / "checkpoints", keep=t.keep_checkpoints)
    start = ckpt.latest_step() or 0
    if start:
        state, record = ckpt.restore(start, state)
        if record.get("corpus_key") != corpus.key:
            log.warning("the training text changed since step %d was saved; batches will differ", start)
        log.info("resumed from step %d", start)
    metrics_log = MetricsLog(out / "metrics.jsonl", resume_step=start)
    train_step, eval_step = make_train_step(graphdef, optimizer, schedule), make_eval_step(graphdef)

    micro = t.batch_size // t.grad_accum
    tokens_per_step = t.batch_size * t.seq_len
    last: dict[str, Any] = {"step": start}
    timer_start, timed_steps = None, 0
    try:
        for step in range(start, t.steps):
            batch = batch_at(corpus.train, seed=t.data_seed, step=step, batch_size=t.batch_size, seq_len=t.seq_len)
            state, metrics = train_step(state, jnp.asarray(batch.reshape(t.grad_accum, micro, t.seq_len + 1)))
            loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
            done = step + 1
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                good = ckpt.latest_step()
                raise NonFiniteError(f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {done}; "
                                     f"stopped without saving; the last good checkpoint is step {good}")
            if timer_start is None:  # the first step includes compilation: time from its end
                timer_start = time.perf_counter()
            else:
                timed_steps += 1
            boundary = done == t.steps
            if done % t.log_every == 0 or boundary:
                elapsed = time.perf_counter() - timer_start
                tps = timed_steps * tokens_per_step / elapsed if timed_steps else None
                mfu = tps * flops_per_token / peak_flops if tps and flops_per_token and peak_flops else None
                last = {"step": done, "loss": loss, "lr": float(metrics["lr"]), "grad_norm": grad_norm,
                        "tokens_per_s": tps, "mfu": mfu}
                metrics_log.write(last)
                if on_record:
                    on_record(last)
            if done % t.eval_every == 0 or boundary:
                paused = time.perf_counter()
                last = {"step": done, **evaluate(eval_step, state["params"], corpus, cfg)}
                metrics_log.write(last)
                if on_record:
                    on_record(last)
                timer_start += time.perf_counter() - paused
            if done % t.ckpt_every == 0 or boundary:
                paused = time.perf_counter()
                ckpt.save(done, state, {"step": done, "data_seed": t.data_seed, "next_batch": done,
                                        "corpus_key": corpus.key, "config": cfg.to_dict()})
                timer_start += time.perf_counter() - paused
    finally:
        ckpt.close()
        metrics_log.close()
    return last


def load_params(run_dir: str | Path, step: int | None = None) -> tuple[RunConfig, nnx.Module]:
    """The model of a run directory at `step` (default: the newest checkpoint)."""
    run = Path(run_dir)
    cfg_path = run / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{run} has no config.json: is it a meshlm run directory?")
    cfg = RunConfig.from_dict(json.loads(cfg_path.read_text()))
    ckpt = Checkpointer(run / "checkpoints", keep=cfg.train.keep_checkpoints, async_save=False)
    step = step if step is not None else ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(f"{run} has no checkpoints yet")
    abstract = nnx.eval_shape(lambda: create_model(cfg.model, seed=0))
    graphdef, abstract_params = nnx.split(abstract)
    optimizer = make_optimizer(cfg.train)
    like = jax.eval_shape(lambda p: init_train_state(p, optimizer), nnx.to_pure_dict(abstract_params))
    state, _ = ckpt.restore(step, like)
    ckpt.close()
    return cfg, nnx.merge(graphdef, state["params"])
