"""A `jax.profiler` trace of a chosen range of train steps (`--profile START:STOP`), for TensorBoard's profile
plugin or Perfetto."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import jax

log = logging.getLogger(__name__)


def parse_steps(text: str) -> tuple[int, int]:
    """`"START:STOP"` as (start, stop): steps numbered from 1 as in metrics.jsonl, 1 <= START <= STOP."""
    first, sep, last = text.partition(":")
    try:
        start, stop = int(first), int(last)
    except ValueError:
        raise ValueError(f"--profile {text!r}: expected START:STOP, e.g. 10:12") from None
    if not sep or not 1 <= start <= stop:
        raise ValueError(f"--profile {text!r}: expected START:STOP with 1 <= START <= STOP")
    return start, stop


class StepProfiler:
    """Traces steps `start` to `stop` (inclusive, numbered from 1) into `directory`: call `before(step)` before
    running step `step` and `after(step, state)` once it is dispatched; `close()` ends a trace cut short. In a
    multi-process run each process traces its own work into `directory/process_<i>` (processes on one host would
    otherwise write files of the same name)."""

    def __init__(self, start: int, stop: int, directory: str | os.PathLike):
        if not 1 <= start <= stop:
            raise ValueError(f"profile steps must satisfy 1 <= start <= stop, got {start}:{stop}")
        self.start, self.stop, self.directory = start, stop, Path(directory)
        if jax.process_count() > 1:
            self.directory = self.directory / f"process_{jax.process_index()}"
        self.active = False

    def before(self, step: int) -> None:
        if step == self.start:
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory), create_perfetto_trace=True)
            self.active = True

    def after(self, step: int, state: Any) -> None:
        if self.active and step == self.stop:
            jax.block_until_ready(state)  # the trace holds the steps' device work, not only their dispatch
            self.close()
            log.info("profile of steps %d-%d in %s: view with `tensorboard --logdir %s` (the profile plugin, "
                     "pip install tensorboard-plugin-profile) or open its perfetto_trace.json.gz in "
                     "https://ui.perfetto.dev", self.start, self.stop, self.directory, self.directory)

    def close(self) -> None:
        if self.active:
            self.active = False
            jax.profiler.stop_trace()
