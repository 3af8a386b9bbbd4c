"""`SpeculationStats`: what speculative decoding has drafted and accepted so far, and the figures reported from it
(`generate`, the benchmarks, the server's /metrics)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class SpeculationStats:
    """Speculative decoding so far: verified decode rows, tokens drafted and accepted, and how many rows accepted
    their j-th drafted token (`accepted_at[j]`; a row accepts a prefix of its drafts)."""

    rows: int = 0
    drafted: int = 0
    accepted: int = 0
    accepted_at: list[int] = dataclasses.field(default_factory=list)

    @property
    def mean_accepted_length(self) -> float:
        """Tokens each verified row emitted on average: its accepted drafts plus the one the target sampled."""
        return 1.0 + self.accepted / self.rows if self.rows else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def summary(self) -> dict:
        """The figures a benchmark or `generate` reports: counts, acceptance rate, mean accepted length, and the
        rate at which rows accepted their j-th drafted token."""
        return {"verified_rows": self.rows, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance_rate": round(self.acceptance_rate, 4),
                "mean_accepted_length": round(self.mean_accepted_length, 3),
                "accepted_at_position": [round(n / self.rows, 4) if self.rows else 0.0 for n in self.accepted_at]}
