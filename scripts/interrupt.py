"""Stop a run cleanly on SIGINT (Ctrl-C) or SIGTERM (what SLURM and Kubernetes send before they kill a job): the
first signal only asks the training loop to stop after its current step (it polls `StopOnSignal`); it also puts
back the default handlers, so a second signal aborts at once."""

from __future__ import annotations

import signal
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal:
    """A `should_stop` for `train.loop.train`, true once SIGINT or SIGTERM has arrived (`received` says which).
    Installs its handlers on entry (main thread only) and restores the previous ones on exit."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)
        for sig in SIGNALS:  # the next Ctrl-C or SIGTERM kills the process at once
            signal.signal(sig, signal.SIG_DFL)

    def __call__(self) -> bool:
        return self.received is not None

    @property
    def exit_code(self) -> int:
        """The shell's code for death by that signal (130 for SIGINT, 143 for SIGTERM): the run did not finish."""
        return 128 + int(self.received) if self.received is not None else 0

    def __enter__(self) -> StopOnSignal:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
