"""Random paged-cache contents for the decode-kernel tests: block tables of shuffled pages, pools whose live slots
hold N(0, 1) data and whose every other slot (the null page, free pages, the tails of last pages) holds `poison`."""

from __future__ import annotations

import numpy as np


def random_pages(rng: np.random.Generator, page_size: int, lengths: list[int], pools: dict[str, tuple[int, int]],
                 poison: float) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(block tables [B, M] int32, {name: pool [heads, Np, page_size, dim] float32}) for `pools` = {name: (heads,
    dim)}: sequence b's `lengths[b]` tokens on its pages, in table order, one spare table entry per row."""
    pages_of = [-(-n // page_size) for n in lengths]
    B, M = len(lengths), max(1, *pages_of) + 1
    n_pages = 1 + sum(pages_of) + 3  # the null page, the sequences' pages, 3 free ones
    out = {name: np.full((heads, n_pages, page_size, dim), poison, np.float32) for name, (heads, dim) in pools.items()}
    tables = np.zeros((B, M), np.int32)
    free = rng.permutation(np.arange(1, n_pages))  # shuffled: a sequence's pages are not contiguous
    for b, n in enumerate(lengths):
        pages, free = free[:pages_of[b]], free[pages_of[b]:]
        tables[b, :len(pages)] = pages
        for i, page in enumerate(pages):
            filled = min(page_size, n - i * page_size)
            for name, (heads, dim) in pools.items():
                out[name][:, page, :filled] = rng.normal(size=(heads, filled, dim))
    return tables, out
