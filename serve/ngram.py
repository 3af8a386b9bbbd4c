"""Prompt-lookup drafting (n-gram speculation): propose the tokens that followed the most recent earlier occurrence
of the sequence's last n tokens, for input-grounded tasks (editing, summarising or continuing a given text) where
the output repeats spans of the prompt. No model, no device: a search over the request's own tokens on the host."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from model.checks import check_ints


@dataclasses.dataclass(frozen=True)
class NgramConfig:
    """Match the last `max_n` tokens, then shorter suffixes down to `min_n`; propose up to `num_tokens`."""

    max_n: int = 3
    min_n: int = 1
    num_tokens: int = 4

    def __post_init__(self) -> None:
        check_ints("ngram.", self, ("max_n", "min_n", "num_tokens"))
        if self.min_n > self.max_n:
            raise ValueError(f"ngram.min_n ({self.min_n}) must be at most ngram.max_n ({self.max_n})")


def propose_ngram(tokens: Sequence[int] | np.ndarray, cfg: NgramConfig = NgramConfig()) -> list[int]:
    """`cfg.num_tokens` drafted tokens for a sequence (prompt and output so far): for n from max_n down to min_n,
    the tokens after the latest earlier position where the last n tokens occur, copied on into the drafts
    themselves where they run past the end (LZ77's overlapping copy: a repeating pattern is drafted in full); []
    when no suffix recurs."""
    t = np.asarray(tokens, dtype=np.int64)
    for n in range(min(cfg.max_n, len(t) - 1), cfg.min_n - 1, -1):
        windows = sliding_window_view(t[:-1], n)  # window i is t[i:i+n]; it ends before the last token
        hits = np.flatnonzero((windows == t[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            drafts = t[start:start + cfg.num_tokens].tolist()
            while len(drafts) < cfg.num_tokens:  # the copy runs into its own output: the repetition goes on
                drafts.append(drafts[start + len(drafts) - len(t)])
            return drafts
    return []
