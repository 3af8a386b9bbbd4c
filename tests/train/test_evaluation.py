"""train/evaluation.py's pure parts: windows cover every token once, the batched padded scorer equals the model's
own log-softmax row by row, lm-eval's context/choice split, acc against an argmax done here, and the JSONL checks.
(tests/scripts/test_evaluate.py compares whole evaluations with transformers.)

Tolerance: the scorer and the reference run the same float32 model on the same tokens; padding and batching change
XLA's reduction order only, so log-probabilities agree to ~1e-6 absolute; 1e-5 is the house fp32 tolerance."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import create_model, get_preset
from train.evaluation import (
    ChoiceItem,
    TokenScorer,
    choice_metrics,
    read_choice_items,
    score_documents,
    split_choice,
    text_files,
    text_windows,
)


@pytest.mark.parametrize("n,seq_len,stride", [(1, 4, None), (2, 4, None), (4, 4, None), (5, 4, None),
                                              (100, 16, None), (100, 16, 5), (37, 8, 1), (64, 64, None)])
def test_windows_predict_every_token_but_the_first_exactly_once(n, seq_len, stride):
    counts = np.zeros(n, int)
    for w in text_windows(n, seq_len, stride):
        assert 0 <= w.begin < w.end <= n and w.end - w.begin <= seq_len and 1 <= w.n_scored <= w.end - w.begin - 1
        counts[w.end - w.n_scored:w.end] += 1
    assert counts[:1].sum() == 0 and (counts[1:] == 1).all()


def test_windows_refuse_a_stride_that_would_skip_tokens():
    with pytest.raises(ValueError, match="stride must be in"):
        text_windows(10, 4, 4)
    with pytest.raises(ValueError, match="seq_len must be at least 2"):
        text_windows(10, 1)


@pytest.fixture(scope="module")
def tiny_model():
    return create_model(get_preset("tiny").replace(dtype="float32"), seed=3)


@nnx.jit
def _logits(model, ids_BxT):
    return model(ids_BxT)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, np.float64)
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def _log_softmax_targets(model, ids: list[int]) -> np.ndarray:
    """log p(ids[t] | ids[:t]) for t >= 1, from the model's logits on the unpadded row, in numpy float64."""
    logp = _log_softmax(_logits(model, jnp.asarray([ids]))[0])
    return logp[np.arange(len(ids) - 1), ids[1:]]


def test_scorer_equals_the_models_log_softmax_on_each_unpadded_row(tiny_model):
    """Rows of many lengths, prefixes of two 64-token sequences (a causal model's log-probabilities on a prefix
    are those of the whole row's first positions: one reference forward for all), batched three at a time."""
    whole = np.random.default_rng(0).integers(0, 259, size=(2, 64))
    logp = _log_softmax(_logits(tiny_model, jnp.asarray(whole)))
    lengths = (2, 7, 64, 33, 17, 5, 40)
    rows = [whole[i % 2, :n].tolist() for i, n in enumerate(lengths)]
    scorer = TokenScorer(tiny_model, batch_size=3)
    seen = []
    got = scorer(rows, progress=lambda done, total: seen.append((done, total)))
    for i, (row, lp) in enumerate(zip(rows, got, strict=True)):
        want = logp[i % 2, np.arange(len(row) - 1), row[1:]]
        np.testing.assert_allclose(lp, want, rtol=1e-5, atol=1e-5)
    assert seen == [(3, 7), (6, 7), (7, 7)]
    # Compiled shapes: (3, 64), (3, 32), (1, 16) so far; eleven rows of 20-30 tokens add only (2, 32).
    assert scorer._logprobs._cache_size() == 3
    scorer([whole[0, :n].tolist() for n in range(20, 31)])
    assert scorer._logprobs._cache_size() == 4
    with pytest.raises(ValueError, match="row 0 has 65 tokens"):
        scorer([[1] * 65])
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        scorer([[1, 259]])


def test_documents_sum_the_windows_nats(tiny_model):
    """Two documents over 16-token windows against a loop written here: each window's forward, the tokens it is
    the first to predict."""
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 256, size=n).tolist() for n in (50, 23)]
    nats, tokens = score_documents(TokenScorer(tiny_model, batch_size=4, max_len=16), docs, 16, stride=6)
    want, count = 0.0, 0
    for ids in docs:
        done = 1
        for begin in range(0, len(ids), 6):
            end = min(begin + 16, len(ids))
            lp = _log_softmax_targets(tiny_model, ids[begin:end])
            want -= lp[done - begin - 1:].sum()
            count += end - done
            done = end
            if end == len(ids):
                break
    assert tokens == count == 50 + 23 - 2
    assert nats == pytest.approx(want, rel=1e-5)


def test_split_choice_moves_the_contexts_trailing_space_to_the_choice():
    def encode(text: str) -> list[int]:
        return [ord(c) for c in text.replace(" P", "\x01")]  # " P" is one token: the boundary merges

    ctx, cont = split_choice(encode, "The capital is ", "Paris")
    assert ctx == encode("The capital is") and cont == encode(" Paris") == [1] + [ord(c) for c in "aris"]


def test_acc_and_acc_norm_follow_the_argmax():
    items = [ChoiceItem("q", ("a", "bbbb"), 1), ChoiceItem("q", ("a", "bb", "c"), 0), ChoiceItem("q", ("x", "y"), 1)]
    lls = [[-2.0, -4.0], [-1.0, -1.5, -3.0], [-1.0, -1.0]]
    summary, records = choice_metrics(items, lls)
    assert [r["pred"] for r in records] == [0, 0, 0]  # the last a tie: the first choice
    assert [r["pred_norm"] for r in records] == [1, 1, 0]  # -4/4 > -2/1; -1.5/2 > -1/1
    assert summary == {"items": 3, "acc": pytest.approx(1 / 3), "acc_norm": pytest.approx(1 / 3)}


def _write(path, lines):
    path.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + "\n")
    return path


GOOD = {"context": "2 + 2 =", "choices": [" 4", " 5"], "answer": 0}


@pytest.mark.parametrize("bad,message", [
    ({"context": "c", "choices": ["a", "b"]}, "x.jsonl:2: missing key 'answer'"),
    ({"context": "c", "choices": ["a", "b"], "answer": 2}, "x.jsonl:2: 'answer' must be an index into the 2 choices"),
    ({"context": "c", "choices": ["a"], "answer": 0}, "x.jsonl:2: 'choices' must be a list of at least two"),
    ({"context": "", "choices": ["a", "b"], "answer": 0}, "x.jsonl:2: 'context' must be a non-empty string"),
    ("{not json", "x.jsonl:2: not JSON"),
])
def test_choice_file_errors_name_the_line(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        read_choice_items(_write(tmp_path / "x.jsonl", [GOOD, bad]))


def test_choice_file_reads_items(tmp_path):
    assert read_choice_items(_write(tmp_path / "x.jsonl", [GOOD, "", GOOD])) == [
        ChoiceItem("2 + 2 =", (" 4", " 5"), 0)] * 2
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_choice_items(tmp_path / "missing.jsonl")


def test_text_files_of_a_file_a_folder_and_a_glob(tmp_path):
    for name in ("b.txt", "a.txt", "sub/c.md"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(name)
    assert text_files(str(tmp_path / "a.txt")) == [tmp_path / "a.txt"]
    assert text_files(str(tmp_path)) == [tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "sub/c.md"]
    assert text_files(str(tmp_path / "*.txt")) == [tmp_path / "a.txt", tmp_path / "b.txt"]
    with pytest.raises(FileNotFoundError, match="no such file, folder or glob match"):
        text_files(str(tmp_path / "*.rst"))
