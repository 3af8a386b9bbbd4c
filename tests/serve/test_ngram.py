"""Prompt-lookup drafting against a brute-force search written here."""

import numpy as np
import pytest

from serve.ngram import NgramConfig, propose_ngram


def brute_force(t: list[int], cfg: NgramConfig) -> list[int]:
    for n in range(cfg.max_n, cfg.min_n - 1, -1):
        if n >= len(t):
            continue
        suffix = t[-n:]
        for i in range(len(t) - n - 1, -1, -1):  # latest occurrence that ends before the last token
            if t[i:i + n] == suffix:
                out = list(t)
                for j in range(cfg.num_tokens):  # copy on, past the end into what is copied
                    out.append(out[i + n + j])
                return out[len(t):]
    return []


@pytest.mark.parametrize("cfg", [NgramConfig(), NgramConfig(max_n=5, min_n=2, num_tokens=7), NgramConfig(1, 1, 1)])
def test_matches_brute_force_on_random_sequences(cfg):
    rng = np.random.default_rng(0)
    for _ in range(300):
        t = rng.integers(0, 4, rng.integers(1, 40)).tolist()
        assert propose_ngram(t, cfg) == brute_force(t, cfg), t


def test_examples():
    cfg = NgramConfig(max_n=2, min_n=1, num_tokens=3)
    assert propose_ngram([1, 2, 3, 4, 9, 1, 2], cfg) == [3, 4, 9]  # "1 2" recurs: what followed it
    assert propose_ngram([5, 1, 7, 8, 2, 1], cfg) == [7, 8, 2]  # only "1" recurs
    assert propose_ngram([1, 2, 3], cfg) == []  # nothing recurs
    assert propose_ngram([4], cfg) == []
    assert propose_ngram([3, 3, 3, 3], cfg) == [3, 3, 3]  # the latest occurrence (t[1:3]), copied on
    assert propose_ngram([1, 2, 1, 2], cfg) == [1, 2, 1]


def test_config_names_bad_values():
    with pytest.raises(ValueError, match="min_n"):
        NgramConfig(max_n=2, min_n=3)
    with pytest.raises(ValueError, match="num_tokens"):
        NgramConfig(num_tokens=0)
