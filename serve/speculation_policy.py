"""How many tokens to draft: a measured choice of k per decode-batch size, 0 (plain decoding) among the choices.

Verifying k drafted tokens costs a forward over k + 1 positions per row; it pays while the device is memory-bound
(small batches) and the drafts are accepted, and costs more than it brings once the step is compute-bound or the
drafts miss; between the two a smaller k can pay where a larger one does not (the later drafts are accepted less
often and each widens the step). No cost model predicts those crossings on every machine, so the engine measures
them: for each bucket of decode rows, the output tokens per second of its last `window` steps at each k of
`choices`. It measures each k over `explore_steps` steps first (the largest first), then runs the fastest and,
every `probe_every` steps of a bucket, spends `probe_steps` steps on one of the others, in turn, to keep its figure
current.

Only a k's steady cost counts: a step is recorded when the `settle` steps before it ran the same k at the same
bucket (the engine counts the run). The first steps after a change of step shapes run slower than the steady ones
(on the 2-core CPU the first ~5 plain steps after speculation took 2-5 times the steady 0.5-0.7 ms of the demo
model), so a probe that measured them rated the probed k far below its steady rate and kept the incumbent.

A k's rate is its window's tokens over its seconds, each step's seconds capped at `outlier` times the window's
median step: a step that long was interrupted (a garbage collection, another process), which says nothing of the
k's cost, and a probed k has only a few steps in its window, so one interruption would otherwise decide the
choice. Steps of one k can differ in cost (an n-gram step with no draft verifies nothing), so the median alone
would not do. A k > 0 is chosen over plain decoding only when its rate is `margin` (5%) higher: within the
measurement's noise plain decoding, which cannot be slower than itself, wins (and each switch costs its slower
first steps).
"""

from __future__ import annotations

import collections
import dataclasses
import statistics
from collections.abc import Sequence

from model.checks import check_int, check_number


def draft_choices(num_tokens: int, adaptive: bool) -> tuple[int, ...]:
    """The k an engine may draft per step, largest first: with `adaptive`, `num_tokens`, half of it (rounded up) and 0
    (plain decoding); without, `num_tokens` only."""
    return tuple(sorted({num_tokens, (num_tokens + 1) // 2, 0}, reverse=True)) if adaptive else (num_tokens,)


@dataclasses.dataclass
class _Bucket:
    window: int
    steps: dict[int, collections.deque] = dataclasses.field(default_factory=dict)  # k -> (tokens, seconds)
    recorded: dict[int, int] = dataclasses.field(default_factory=dict)  # steps measured per k, ever
    choices: int = 0

    def add(self, k: int, tokens: int, seconds: float) -> None:
        self.steps.setdefault(k, collections.deque(maxlen=self.window)).append((tokens, seconds))
        self.recorded[k] = self.recorded.get(k, 0) + 1

    def rate(self, k: int, outlier: float) -> float | None:
        steps = self.steps.get(k)
        if not steps:
            return None
        cap = outlier * statistics.median(s for _, s in steps)
        return sum(t for t, _ in steps) / sum(min(s, cap) for _, s in steps)


class SpeculationPolicy:
    """Chooses per step how many tokens to draft, from the measured rates of each decode-batch bucket (the module
    docstring says how a rate is measured)."""

    def __init__(self, choices: Sequence[int], explore_steps: int = 4, probe_every: int = 128, probe_steps: int = 8,
                 settle: int = 4, window: int = 16, outlier: float = 3.0, margin: float = 0.05):
        if len(choices) < 2 or len(set(choices)) != len(choices):
            raise ValueError(f"speculation policy choices must be two or more different k, got {tuple(choices)}")
        for k in choices:
            check_int("speculation policy choice", k, minimum=0)
        for name, value in (("explore_steps", explore_steps), ("probe_every", probe_every),
                            ("probe_steps", probe_steps), ("window", window)):
            check_int(f"speculation policy {name}", value)
        check_int("speculation policy settle", settle, minimum=0)
        if probe_steps >= probe_every:
            raise ValueError(f"speculation policy probe_steps ({probe_steps}) must be fewer than probe_every "
                             f"({probe_every})")
        if probe_steps <= settle:
            raise ValueError(f"speculation policy probe_steps ({probe_steps}) must be more than settle ({settle}), "
                             "or a probe records nothing")
        check_number("speculation policy outlier", outlier)
        check_number("speculation policy margin", margin, strict=False)
        self.choices = tuple(sorted(choices, reverse=True))
        self.explore_steps, self.probe_every, self.probe_steps = explore_steps, probe_every, probe_steps
        self.settle, self.window, self.outlier, self.margin = settle, window, outlier, margin
        self._buckets: dict[int, _Bucket] = {}

    def _bucket(self, bucket: int) -> _Bucket:
        return self._buckets.setdefault(bucket, _Bucket(self.window))

    def choose(self, bucket: int) -> int:
        """The k the next step with this many decode rows (bucketed) drafts (0: decode plainly)."""
        b = self._bucket(bucket)
        b.choices += 1
        for k in self.choices:  # each k's first figure from several steps (a switch's first step is odd)
            if b.recorded.get(k, 0) < self.explore_steps:
                return k
        best = max(self.choices, key=lambda k: (self._score(b, k), k))
        if b.choices % self.probe_every >= self.probe_steps:
            return best
        others = [k for k in self.choices if k != best]
        return others[b.choices // self.probe_every % len(others)]

    def _score(self, b: _Bucket, k: int) -> float:
        """k's rate, a speculating k's discounted by `margin`."""
        return b.rate(k, self.outlier) / (1 + self.margin if k else 1)

    def record(self, bucket: int, k: int, tokens: int, seconds: float, run: int) -> None:
        """A decode-only step of this bucket that drafted k tokens a row emitted `tokens` in `seconds`, the `run`-th
        measurable step of this k and bucket in a row (counted only past `settle`)."""
        if seconds > 0 and run > self.settle:
            self._bucket(bucket).add(k, tokens, seconds)

    def rates(self) -> dict[int, dict[int, float]]:
        """bucket -> {k: tokens/s} as measured so far."""
        return {n: {k: b.rate(k, self.outlier) for k in b.steps} for n, b in self._buckets.items()}
