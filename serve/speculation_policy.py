"""When to speculate: a measured switch per decode-batch size.

Verifying k drafted tokens costs a forward over k + 1 positions per row; it pays while the device is memory-bound
(small batches) and the drafts are accepted, and costs more than it brings once the step is compute-bound or the
drafts miss. No cost model predicts that crossing on every machine, so the engine measures it: for each bucket of
decode rows, the output tokens per second of steps with and without speculation (an exponential moving average);
it runs the faster mode and, every `probe_every` steps of a bucket, spends `probe_steps` steps on the other to keep
its figure current.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class _Rates:
    tokens_per_s: dict[bool, float] = dataclasses.field(default_factory=dict)
    steps: int = 0


class SpeculationPolicy:
    """Chooses per step whether to speculate, from the measured rates of each decode-batch bucket."""

    def __init__(self, probe_every: int = 48, probe_steps: int = 4, smoothing: float = 0.3):
        self.probe_every, self.probe_steps, self.smoothing = probe_every, probe_steps, smoothing
        self._rates: dict[int, _Rates] = {}

    def speculate(self, bucket: int) -> bool:
        """Whether the next step with this many decode rows (bucketed) should speculate."""
        rates = self._rates.setdefault(bucket, _Rates())
        rates.steps += 1
        known = rates.tokens_per_s
        if True not in known:
            return True
        if False not in known:
            return False
        best = known[True] >= known[False]
        return (not best) if rates.steps % self.probe_every < self.probe_steps else best

    def record(self, bucket: int, speculated: bool, tokens: int, seconds: float) -> None:
        """A decode-only step of this bucket emitted `tokens` in `seconds`."""
        if seconds <= 0:
            return
        rates = self._rates.setdefault(bucket, _Rates())
        rate = tokens / seconds
        old = rates.tokens_per_s.get(speculated)
        rates.tokens_per_s[speculated] = rate if old is None else old + self.smoothing * (rate - old)

    def rates(self) -> dict[int, dict[bool, float]]:
        """bucket -> {speculated: tokens/s} as measured so far."""
        return {b: dict(r.tokens_per_s) for b, r in self._rates.items()}
