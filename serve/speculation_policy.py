"""When to speculate: a measured switch per decode-batch size.

Verifying k drafted tokens costs a forward over k + 1 positions per row; it pays while the device is memory-bound
(small batches) and the drafts are accepted, and costs more than it brings once the step is compute-bound or the
drafts miss. No cost model predicts that crossing on every machine, so the engine measures it: for each bucket of
decode rows, the output tokens per second of steps with and without speculation (decayed sums of both);
it measures each mode over `explore_steps` steps first, then runs the faster one and, every `probe_every` steps of
a bucket, spends `probe_steps` steps on the other to keep its figure current.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class _Rates:
    tokens: dict[bool, float] = dataclasses.field(default_factory=dict)  # decayed sums per mode
    seconds: dict[bool, float] = dataclasses.field(default_factory=dict)
    recorded: dict[bool, int] = dataclasses.field(default_factory=dict)  # steps measured per mode
    steps: int = 0

    def rate(self, speculated: bool) -> float | None:
        return self.tokens[speculated] / self.seconds[speculated] if speculated in self.tokens else None


class SpeculationPolicy:
    """Chooses per step whether to speculate, from the measured rates of each decode-batch bucket. A mode's rate is
    its tokens over its seconds, both summed with exponential decay (`decay` per recorded step): a ratio of sums,
    so a step that read back nothing (overlap's first step) or one slow step does not swing it."""

    def __init__(self, explore_steps: int = 4, probe_every: int = 64, probe_steps: int = 2, decay: float = 0.9):
        self.explore_steps, self.probe_every, self.probe_steps = explore_steps, probe_every, probe_steps
        self.decay = decay
        self._rates: dict[int, _Rates] = {}

    def speculate(self, bucket: int) -> bool:
        """Whether the next step with this many decode rows (bucketed) should speculate."""
        rates = self._rates.setdefault(bucket, _Rates())
        rates.steps += 1
        for mode in (True, False):  # each mode's first figure from several steps (a switch's first step is odd)
            if rates.recorded.get(mode, 0) < self.explore_steps:
                return mode
        best = rates.rate(True) >= rates.rate(False)
        return (not best) if rates.steps % self.probe_every < self.probe_steps else best

    def record(self, bucket: int, speculated: bool, tokens: int, seconds: float) -> None:
        """A decode-only step of this bucket emitted `tokens` in `seconds`."""
        if seconds <= 0:
            return
        rates = self._rates.setdefault(bucket, _Rates())
        rates.tokens[speculated] = rates.tokens.get(speculated, 0.0) * self.decay + tokens
        rates.seconds[speculated] = rates.seconds.get(speculated, 0.0) * self.decay + seconds
        rates.recorded[speculated] = rates.recorded.get(speculated, 0) + 1

    def rates(self) -> dict[int, dict[bool, float]]:
        """bucket -> {speculated: tokens/s} as measured so far."""
        return {b: {m: r.rate(m) for m in r.tokens} for b, r in self._rates.items()}
