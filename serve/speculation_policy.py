"""When to speculate: a measured switch per decode-batch size.

Verifying k drafted tokens costs a forward over k + 1 positions per row; it pays while the device is memory-bound
(small batches) and the drafts are accepted, and costs more than it brings once the step is compute-bound or the
drafts miss. No cost model predicts that crossing on every machine, so the engine measures it: for each bucket of
decode rows, the output tokens per second of its last `window` steps with and without speculation; it measures each
mode over `explore_steps` steps first, then runs the faster one and, every `probe_every` steps of a bucket, spends
`probe_steps` steps on the other to keep its figure current.

A mode's rate is its window's tokens over its seconds, each step's seconds capped at `outlier` times the window's
median step: a step that long was interrupted (a garbage collection, another process), which says nothing of the
mode's cost, and the mode that is probed has only a few steps in its window, so one interruption would otherwise
decide the switch. Steps of a mode can differ in cost (an n-gram step with no draft verifies nothing), so the
median alone would not do.
"""

from __future__ import annotations

import collections
import dataclasses
import statistics

from model.checks import check_int, check_number


@dataclasses.dataclass
class _Bucket:
    window: int
    steps: dict[bool, collections.deque] = dataclasses.field(default_factory=dict)  # mode -> (tokens, seconds)
    recorded: dict[bool, int] = dataclasses.field(default_factory=dict)  # steps measured per mode, ever
    choices: int = 0

    def add(self, speculated: bool, tokens: int, seconds: float) -> None:
        self.steps.setdefault(speculated, collections.deque(maxlen=self.window)).append((tokens, seconds))
        self.recorded[speculated] = self.recorded.get(speculated, 0) + 1

    def rate(self, speculated: bool, outlier: float) -> float | None:
        steps = self.steps.get(speculated)
        if not steps:
            return None
        cap = outlier * statistics.median(s for _, s in steps)
        return sum(t for t, _ in steps) / sum(min(s, cap) for _, s in steps)


class SpeculationPolicy:
    """Chooses per step whether to speculate, from the measured rates of each decode-batch bucket (the module
    docstring says how a rate is measured)."""

    def __init__(self, explore_steps: int = 4, probe_every: int = 64, probe_steps: int = 3, window: int = 16,
                 outlier: float = 3.0):
        for name, value in (("explore_steps", explore_steps), ("probe_every", probe_every),
                            ("probe_steps", probe_steps), ("window", window)):
            check_int(f"speculation policy {name}", value)
        check_number("speculation policy outlier", outlier)
        self.explore_steps, self.probe_every, self.probe_steps = explore_steps, probe_every, probe_steps
        self.window, self.outlier = window, outlier
        self._buckets: dict[int, _Bucket] = {}

    def _bucket(self, bucket: int) -> _Bucket:
        return self._buckets.setdefault(bucket, _Bucket(self.window))

    def speculate(self, bucket: int) -> bool:
        """Whether the next step with this many decode rows (bucketed) should speculate."""
        b = self._bucket(bucket)
        b.choices += 1
        for mode in (True, False):  # each mode's first figure from several steps (a switch's first step is odd)
            if b.recorded.get(mode, 0) < self.explore_steps:
                return mode
        best = b.rate(True, self.outlier) >= b.rate(False, self.outlier)
        return (not best) if b.choices % self.probe_every < self.probe_steps else best

    def record(self, bucket: int, speculated: bool, tokens: int, seconds: float) -> None:
        """A decode-only step of this bucket emitted `tokens` in `seconds`."""
        if seconds > 0:
            self._bucket(bucket).add(speculated, tokens, seconds)

    def rates(self) -> dict[int, dict[bool, float]]:
        """bucket -> {speculated: tokens/s} as measured so far."""
        return {n: {m: b.rate(m, self.outlier) for m in b.steps} for n, b in self._buckets.items()}
