"""Checkpoints through orbax's `CheckpointManager`: the train state (params, optimizer state, step) plus a JSON
record (step, data position, run config). Saves are asynchronous and atomic (orbax finalises a step's folder only
when complete), so a run killed mid-save resumes from the last complete step.

A checkpoint that is complete but damaged (a truncated data file, an empty metadata file, a missing folder, NaN
values) fails to restore: `restore_newest` reports it in one line, renames it `<step>.broken` (a name orbax does
not read as a step; never deleted) and falls back to the newest one that restores."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """No checkpoint of a run restores (each one's reason is in the message)."""


def one_line(error: BaseException, limit: int = 240) -> str:
    """`error` as a single short line: the type and first message line of the innermost exception it was raised
    from (orbax wraps TensorStore's precise reason, e.g. a byte range beyond a truncated file, in a generic one)."""
    while (inner := error.__cause__ or (None if error.__suppress_context__ else error.__context__)) is not None:
        error = inner
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[:limit - 3] + "..."


class Checkpointer:
    """Save and restore train states under `directory`, keeping the newest `keep`. `read_only` (for serving and
    inspection) creates nothing, deletes nothing and starts no background clean-up."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        self.directory = Path(os.path.abspath(directory))
        self.read_only = read_only
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True, create=False, max_to_keep=None,
                                                   enable_async_checkpointing=False)
        else:
            options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                   cleanup_tmp_directories=True, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The complete checkpoints' steps, oldest first."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, record: dict[str, Any]) -> None:
        """Start saving `state` and `record` as `step`; returns while the write goes on in the background."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record))
        self._manager.save(step, args=args, force=True)

    def restore(self, step: int, like: Any) -> tuple[Any, dict[str, Any]]:
        """The state saved at `step`, shaped (and sharded) like the abstract or concrete pytree `like`."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore())
        restored = self._manager.restore(step, args=args)
        return restored["state"], restored["record"]

    def restore_params(self, step: int, like_params: Any) -> Any:
        """Only the parameters saved at `step` (shaped and sharded like `like_params`): the optimizer state is
        not read, so damage confined to it does not matter."""
        abstract = {"params": jax.tree.map(ocp.utils.to_shape_dtype_struct, like_params)}
        state_dir = self.directory / str(step) / "state"
        if not state_dir.is_dir():
            raise FileNotFoundError(f"checkpoint {step} has no state folder ({state_dir})")
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
        args = ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args, partial_restore=True)
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as reader:
            return reader.restore(state_dir, args=args)["params"]

    def set_aside(self, step: int) -> Path:
        """Rename checkpoint `step` to `<step>.broken` (or `<step>.broken-2`, ...), out of orbax's sight; returns
        the new path. Only process 0 renames; every process forgets the step."""
        source = self.directory / str(step)
        target, n = self.directory / f"{step}.broken", 1
        while target.exists():
            n += 1
            target = self.directory / f"{step}.broken-{n}"
        if jax.process_index() == 0:
            source.rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"meshlm: checkpoint {step} set aside")
        self._manager.reload()
        return target

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def restore_newest(ckpt: Checkpointer, restore: Callable[[int], Any],
                   problem: Callable[[Any], str | None] = lambda restored: None) -> tuple[int, Any] | None:
    """`(step, restore(step))` for the newest checkpoint that restores and in which `problem(restored)` finds
    nothing wrong; None if there are no checkpoints. Each newer checkpoint that fails is reported in one warning
    line (step and reason) and, unless `ckpt` is read-only, renamed aside (`Checkpointer.set_aside`). If none
    restores, raises CheckpointError naming every step and its reason, and renames nothing."""
    failures: list[tuple[int, str]] = []
    for step in reversed(ckpt.all_steps()):
        try:
            restored = restore(step)
            bad = problem(restored)
        except Exception as e:  # a damaged checkpoint fails in many ways (TensorStore, JSON, missing keys, ...)
            bad = one_line(e)
        if bad is None:
            for failed, reason in failures:
                where = "left in place" if ckpt.read_only else f"moved to {ckpt.set_aside(failed).name}"
                log.warning("checkpoint %d does not restore (%s); %s; using checkpoint %d", failed, reason,
                            where, step)
            return step, restored
        failures.append((step, bad))
    if failures:
        raise CheckpointError(f"no checkpoint in {ckpt.directory} restores: "
                              + "; ".join(f"step {step}: {reason}" for step, reason in failures))
    return None


def restore_run_params(run: str | os.PathLike, step: int | None, like: Any,
                       problem: Callable[[Any], str | None] = lambda params: None) -> tuple[int, Any]:
    """`(step, params)` of run directory `run`'s checkpoint `step`, restored shaped and placed like `like`, read
    only (the optimizer state is not read, nothing is written or renamed); `step` None: the newest checkpoint that
    restores and in which `problem(params)` finds nothing wrong (`restore_newest`). Raises FileNotFoundError (no
    checkpoints, no checkpoint at `step`) or CheckpointError (nothing restores)."""
    run = Path(run)
    ckpt = Checkpointer(run / "checkpoints", read_only=True)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise FileNotFoundError(f"{run} has no checkpoints yet")
        if step is None:
            return restore_newest(ckpt, lambda s: ckpt.restore_params(s, like), problem)
        if step not in steps:
            raise FileNotFoundError(f"{run} has no checkpoint at step {step} (it has steps {steps})")
        try:
            return step, ckpt.restore_params(step, like)
        except Exception as e:
            raise CheckpointError(f"checkpoint {step} of {run} does not restore: {one_line(e)}") from e
    finally:
        ckpt.close()
