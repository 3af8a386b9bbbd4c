"""How the engine speculates: which proposer drafts tokens, how many, and whether a measured policy may switch
speculation off where it does not pay (serve/speculation_policy.py)."""

from __future__ import annotations

import dataclasses

from model.checks import check_bool, check_ints, check_one_of

PROPOSERS = ("ngram", "draft", "head", "mtp")


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """`method` "ngram" drafts by prompt lookup (serve/ngram.py: the last `ngram_max_n` down to `ngram_min_n` tokens
    matched earlier in the sequence), "draft" with a smaller model given to the engine, "head" with a draft head
    trained on the target's hidden states (serve/draft_head_runner.py), "mtp" with the target's own depth-1
    multi-token prediction module run as such a head (a model trained with model.mtp_depth >= 1); `num_tokens` (k)
    drafted tokens per decode at most, verified in one target forward. With `adaptive`, each decode-batch size
    measures its tokens/s drafting k, about k / 2 (rounded up) and no tokens (plain decoding) and keeps the fastest
    (probing the others now and then, serve/speculation_policy.py), so a batch where verifying k extra positions
    costs more than the accepted tokens bring drafts fewer or decodes plainly; without, every decode drafts k."""

    method: str = "ngram"
    num_tokens: int = 4
    ngram_max_n: int = 3
    ngram_min_n: int = 1
    adaptive: bool = True

    def __post_init__(self) -> None:
        check_one_of("speculative.method", self.method, PROPOSERS)
        check_ints("speculative.", self, ("num_tokens", "ngram_max_n", "ngram_min_n"))
        if self.ngram_min_n > self.ngram_max_n:
            raise ValueError(f"speculative.ngram_min_n ({self.ngram_min_n}) must be at most speculative.ngram_max_n "
                             f"({self.ngram_max_n})")
        check_bool("speculative.adaptive", self.adaptive)
