"""The training loop: build or resume the state, step, evaluate, checkpoint, and report metrics."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from parallel.mesh import MeshConfig
from parallel.sharding import batch_sharding
from train.checkpoint import Checkpointer, restore_newest, restore_run_params
from train.config import RunConfig
from train.data import check_corpus
from train.metrics import MetricsLog, moe_record
from train.optimizer import lr_schedule, make_optimizer
from train.profile import StepProfiler
from train.run_data import (  # noqa: F401 (EVAL_SEED: tests read it here)
    EVAL_SEED,
    batch_struct,
    data_batch,
    evaluate_run,
    initial_state,
    keep_tokenizer,
    load_run_data,
)
from train.run_dir import RunLock, check_run_dir
from train.sharded import (
    MeshPlan,
    plan_mesh,
    rows_sharding,
    sharded_eval_step,
    sharded_train_step,
    sharded_weighted_eval_step,
)
from train.step import all_finite

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss, gradient or updated state; the run stopped without saving it."""


class TrainingInterrupted(Exception):
    """`should_stop` asked the run to stop: step `step` was finished and saved in `checkpoint`."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(f"interrupted at step {step}; checkpoint saved in {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


def _agreed(stop: bool) -> bool:
    """Process 0's stop decision, on every process (so all stop after the same step)."""
    if jax.process_count() == 1:
        return stop
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(stop)))


_finite = jax.jit(all_finite)


def _not_finite(state: Any) -> str | None:
    """Why a restored train state may not be trained on (it holds NaN or infinite values), or None."""
    return None if bool(_finite(state)) else "it holds NaN or infinite values"


def train(cfg: RunConfig, out_dir: str | Path, *, flops_per_token: float | None = None,
          peak_flops: float | None = None, on_record: Callable[[dict[str, Any]], None] | None = None,
          on_compiled: Callable[[Any, MeshPlan], None] | None = None,
          devices: Sequence[jax.Device] | None = None, should_stop: Callable[[], bool] | None = None,
          profile: tuple[int, int] | None = None) -> dict[str, Any]:
    """Train `cfg` in `out_dir` on a mesh of `devices` (default: all devices of all processes) shaped by
    `cfg.mesh`, resuming from the newest checkpoint that restores (saved on any mesh; newer damaged ones are set
    aside, see train/checkpoint.py). Returns the last record.

    The data and the mesh are checked before anything is written to `out_dir`; then the run directory is locked
    (RunDirInUse names the trainer already there) and checked against this config. Every `log_every` steps a
    record {step, loss, lr, grad_norm, tokens_per_s, mfu} (+ MoE: router_loss, expert_load) goes to metrics.jsonl and
    `on_record`; evaluations add {val_loss, val_bpb}. `on_compiled(compiled_step, plan)` sees the compiled train
    step before the first step (for `--explain`). Raises NonFiniteError naming the step and the last finite
    checkpoint if the loss, the gradient norm or the updated state stops being finite; nothing non-finite is
    saved. In a multi-process run every process calls this; only process 0 locks the directory and writes
    config.json and metrics.jsonl (orbax coordinates the checkpoint writes). `peak_flops` is the peak of all the
    run's devices together (for MFU).

    Records also carry `tokens` (seen so far) and `elapsed_s` (wall time since the run began, summed over
    resumes up to the checkpoint resumed from); they go to `tensorboard/` too. The run lasts `train.steps +
    train.extend_steps` steps (the schedule's final learning rate holds over the extension). `should_stop` is
    polled after every step (process 0's answer counts): when true, the step is saved and TrainingInterrupted
    is raised once the save is complete. `profile=(start, stop)` traces those steps into `profile/`."""
    t = cfg.train
    out = Path(out_dir)
    primary = jax.process_index() == 0
    micro = t.batch_size // t.grad_accum
    optimizer, schedule = make_optimizer(t), lr_schedule(t)
    plan = plan_mesh(cfg.model, cfg.mesh, optimizer, micro_batch=micro, seq_len=t.seq_len, devices=devices)
    data = load_run_data(cfg, out)  # the run's tokenizer (its own copy on resume), text or chat data
    corpus = data.corpus
    check_corpus(corpus, t.seq_len, t.data)
    if corpus.n_val_files == 0:
        log.info("no validation files: the last %g%% of the training tokens (train.val_fraction=%g), %s tokens, "
                 "are held out for validation", 100 * t.val_fraction, t.val_fraction, f"{len(corpus.val):,}")
    began = time.perf_counter()

    with contextlib.ExitStack() as cleanup:  # closed in reverse: metrics, checkpoints (waits for saves), lock
        if primary:
            cleanup.enter_context(RunLock(out))
        check_run_dir(out, cfg)
        if primary:
            (out / "config.json").write_text(cfg.to_json())
            keep_tokenizer(data, out)
        ckpt = Checkpointer(out / "checkpoints", keep=t.keep_checkpoints)
        cleanup.callback(ckpt.close)
        resumed = restore_newest(ckpt, lambda step: ckpt.restore(step, plan.train_state),
                                 lambda restored: _not_finite(restored[0]))
        if resumed:
            start, (state, record) = resumed
            elapsed_before = record.get("elapsed_s", 0.0)
            if record.get("corpus_key") != corpus.key:
                log.warning("the training text changed since step %d was saved; batches will differ", start)
            log.info("resumed from step %d", start)
        else:
            start, elapsed_before = 0, 0.0
            state = initial_state(plan, optimizer, cfg)  # random, or train.init's pretrained parameters
        last_finite = start or None  # the newest checkpoint known to be finite (the restored one was checked)
        metrics_log = (MetricsLog(out / "metrics.jsonl", resume_step=start, tensorboard=out / "tensorboard")
                       if primary else None)
        if metrics_log:
            cleanup.callback(metrics_log.close)
        batches = batch_sharding(plan.mesh, plan.rules)
        batch_shape = (t.grad_accum, micro, t.seq_len + 1)
        train_step = sharded_train_step(plan.graphdef, optimizer, schedule, plan.mesh, plan.rules,
                                        plan.state_shardings, weighted=data.weighted)
        train_step = train_step.lower(plan.train_state, batch_struct(data, batch_shape, batches)).compile()
        if on_compiled:
            on_compiled(train_step, plan)
        eval_step = (sharded_weighted_eval_step if data.weighted else sharded_eval_step)(
            plan.graphdef, plan.mesh, plan.rules, plan.params_shardings)
        eval_rows = rows_sharding(plan.mesh, plan.rules)

        profiler = StepProfiler(*profile, out / "profile") if profile else None
        if profiler:
            cleanup.callback(profiler.close)

        def report(record: dict[str, Any]) -> None:
            record.update(tokens=record["step"] * tokens_per_step,
                          elapsed_s=elapsed_before + time.perf_counter() - began)
            if metrics_log:
                metrics_log.write(record)
            if on_record:
                on_record(record)

        tokens_per_step = t.batch_size * t.seq_len
        last: dict[str, Any] = {"step": start}
        timer_start, timed_steps = None, 0
        total = t.steps + t.extend_steps
        for step in range(start, total):
            batch = data_batch(data, batches, batch_shape, seed=t.data_seed, step=step)
            if profiler:
                profiler.before(step + 1)
            state, metrics = train_step(state, batch)
            if profiler:
                profiler.after(step + 1, state)
            loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
            done = step + 1
            if not (math.isfinite(loss) and math.isfinite(grad_norm) and bool(metrics["state_finite"])):
                what = ("the loss or gradient norm" if not (math.isfinite(loss) and math.isfinite(grad_norm))
                        else "the updated parameters or optimizer state")
                good = (f"the last finite checkpoint is step {last_finite}" if last_finite
                        else "there is no finite checkpoint to resume from")
                raise NonFiniteError(f"non-finite values in {what} at step {done}; loss {loss}, gradient norm "
                                     f"{grad_norm}; stopped without saving; {good}")
            if timer_start is None:  # the first step includes warm-up: time from its end
                timer_start = time.perf_counter()
            else:
                timed_steps += 1
            stop = should_stop is not None and _agreed(should_stop())
            boundary = done == total
            if done % t.log_every == 0 or boundary:
                elapsed = time.perf_counter() - timer_start
                tps = timed_steps * tokens_per_step / elapsed if timed_steps else None
                mfu = tps * flops_per_token / peak_flops if tps and flops_per_token and peak_flops else None
                last = {"step": done, "loss": loss, "lr": float(metrics["lr"]), "grad_norm": grad_norm,
                        "tokens_per_s": tps, "mfu": mfu}
                last.update(moe_record(metrics))  # MoE models: router loss and expert load
                report(last)
            if done % t.eval_every == 0 or boundary:
                paused = time.perf_counter()
                last = {"step": done, **evaluate_run(eval_step, state["params"], data, cfg, eval_rows)}
                report(last)
                timer_start += time.perf_counter() - paused
            if done % t.ckpt_every == 0 or boundary or stop:
                paused = time.perf_counter()
                ckpt.save(done, state, {"step": done, "data_seed": t.data_seed, "next_batch": done,
                                        "corpus_key": corpus.key, "mesh": plan.mesh_cfg.describe(),
                                        "config": cfg.to_dict(),
                                        "elapsed_s": elapsed_before + time.perf_counter() - began})
                last_finite = done
                timer_start += time.perf_counter() - paused
            if stop and not boundary:
                raise TrainingInterrupted(done, ckpt.directory / str(done))
    return last


def load_params(run_dir: str | Path, step: int | None = None,
                devices: Sequence[jax.Device] | None = None) -> tuple[RunConfig, nnx.Module]:
    """The model of a run directory at `step` (default: the newest checkpoint whose parameters restore and are
    finite; newer ones are reported in a warning and left in place), restored onto `devices` (default: this
    process's first device, whatever mesh or number of processes saved it). Reads the parameters only, never the
    optimizer state, and writes nothing. Raises FileNotFoundError (no run, no checkpoint) or CheckpointError."""
    run = Path(run_dir)
    cfg_path = run / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{run} has no config.json: is it a meshlm run directory?")
    cfg = RunConfig.from_dict(json.loads(cfg_path.read_text()))
    devices = list(devices or jax.local_devices()[:1])
    optimizer = make_optimizer(cfg.train)
    plan = plan_mesh(cfg.model, MeshConfig(data=-1), optimizer, micro_batch=len(devices),
                     seq_len=cfg.train.seq_len, devices=devices)
    _, params = restore_run_params(run, step, plan.train_state["params"], _not_finite)
    return cfg, nnx.merge(plan.graphdef, params)
