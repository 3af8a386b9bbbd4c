"""Scoring a model on text: token log-likelihoods in padded, jitted batches; text cut into windows (loss,
perplexity, bits per byte); multiple-choice items scored by the log-likelihood of each choice (lm-eval-harness's
`loglikelihood`, as HellaSwag-style tasks are scored).

Windows follow the Hugging Face perplexity guide's loop: window i holds tokens [i * stride, i * stride + seq_len)
(the last one shorter) and scores the tokens no earlier window scored. The default stride, seq_len - 1, makes
neighbouring windows share one token, so every token but the document's first is predicted exactly once, each with
its own window's context (a smaller stride gives every scored token more context, at more cost). No token is
added: the text is encoded as the tokenizer encodes it (`encode(text)`, with the BOS its post-processor adds, as
transformers' `tokenizer(text)`), and the first token of a document is context only. Bits per byte are the nats of
every scored token over the UTF-8 bytes of the whole text, divided by ln 2, so byte and BPE tokenizers compare.
"""

from __future__ import annotations

import glob
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.jsonl import read_json_objects
from model.transformer import Transformer, for_inference

Progress = Callable[[int, int], None]  # (rows done, rows in all)
LOGIT_CHUNK = 512  # positions whose [B, chunk, vocab] logits exist at once


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) of a document, of which the last `n_scored` are predicted (from the ones before)."""

    begin: int
    end: int
    n_scored: int


def text_windows(n_tokens: int, seq_len: int, stride: int | None = None) -> list[Window]:
    """The windows over a document of `n_tokens` tokens (default stride: seq_len - 1, see the module doc).
    Raises ValueError for a seq_len below 2 or a stride outside [1, seq_len - 1]."""
    stride = seq_len - 1 if stride is None else stride
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    if not 1 <= stride <= seq_len - 1:
        raise ValueError(f"stride must be in [1, seq_len - 1 = {seq_len - 1}], got {stride}")
    windows, scored_to = [], 1  # token 0 is never predicted
    for begin in range(0, max(n_tokens - 1, 0), stride):
        end = min(begin + seq_len, n_tokens)
        windows.append(Window(begin, end, end - scored_to))
        scored_to = end
        if end == n_tokens:
            break
    return windows


def _bucket(n: int, cap: int, smallest: int = 16) -> int:
    """The padded size for `n`: the next power of two (at least `smallest`), at most `cap`."""
    return min(max(smallest, 1 << (n - 1).bit_length()), max(cap, n))


class TokenScorer:
    """log p(token t | tokens before t) for rows of token ids, `batch_size` rows per call of one jitted function.
    Rows are padded on the right to a power-of-two length (capped at the longest allowed) and batches to
    `batch_size` rows, so a long file compiles a handful of shapes, not one per window."""

    def __init__(self, model: Transformer, batch_size: int = 8, max_len: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        model = for_inference(model)
        self.max_len = max_len or model.cfg.max_seq_len
        self.batch_size = batch_size
        self.vocab_size = model.cfg.vocab_size
        graphdef, params = nnx.split(model)
        self._params = params

        @jax.jit
        def logprobs(params: nnx.State, tokens_BxT: jax.Array) -> jax.Array:
            model = nnx.merge(graphdef, params)
            x_BxTxD = model.hidden(tokens_BxT)
            targets_BxT = jnp.roll(tokens_BxT, -1, axis=1)  # the last position's target is padding: ignored
            out = []
            for s in range(0, tokens_BxT.shape[1], LOGIT_CHUNK):
                logits_BxCxV = model.logits(x_BxTxD[:, s:s + LOGIT_CHUNK])
                target_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxT[:, s:s + LOGIT_CHUNK, None], axis=-1)
                out.append(target_BxC[..., 0] - jax.nn.logsumexp(logits_BxCxV, axis=-1))
            return jnp.concatenate(out, axis=1)

        self._logprobs = logprobs

    def __call__(self, rows: Sequence[Sequence[int]], progress: Progress | None = None) -> list[np.ndarray]:
        """For each row of n >= 2 ids, the n - 1 log-probabilities (float64) of ids 1..n-1 given those before."""
        for i, row in enumerate(rows):
            if not 2 <= len(row) <= self.max_len:
                raise ValueError(f"row {i} has {len(row)} tokens; rows need 2 to {self.max_len}")
            if min(row) < 0 or max(row) >= self.vocab_size:
                raise ValueError(f"row {i} has a token id outside the model's vocabulary of {self.vocab_size}")
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # similar lengths share a batch
        out: list[np.ndarray] = [np.empty(0)] * len(rows)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            width = _bucket(len(rows[batch[0]]), self.max_len)
            tokens = np.zeros((_bucket(len(batch), self.batch_size, 1), width), np.int32)
            for r, i in enumerate(batch):
                tokens[r, :len(rows[i])] = rows[i]
            lp = np.asarray(self._logprobs(self._params, jnp.asarray(tokens)), np.float64)
            for r, i in enumerate(batch):
                out[i] = lp[r, :len(rows[i]) - 1]
            if progress:
                progress(min(start + self.batch_size, len(rows)), len(rows))
        return out


@dataclass(frozen=True)
class TextScore:
    """Summed negative log-likelihood (nats) over `tokens` scored tokens of texts holding `bytes` UTF-8 bytes."""

    nats: float
    tokens: int
    bytes: int

    def metrics(self) -> dict[str, float | int]:
        """loss (nats per token), perplexity, bits per byte, and the counts."""
        loss = self.nats / self.tokens
        return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": self.nats / self.bytes / math.log(2),
                "tokens": self.tokens, "bytes": self.bytes}


def score_documents(scorer: TokenScorer, documents: Sequence[Sequence[int]], seq_len: int,
                    stride: int | None = None, progress: Progress | None = None) -> tuple[float, int]:
    """(summed nats, tokens scored) of token-id documents, each cut into `text_windows` of its own."""
    rows, keep = [], []
    for ids in documents:
        for w in text_windows(len(ids), seq_len, stride):
            rows.append(list(ids[w.begin:w.end]))
            keep.append(w.n_scored)
    logprobs = scorer(rows, progress)
    nats = -sum(float(lp[len(lp) - k:].sum()) for lp, k in zip(logprobs, keep, strict=True))
    return nats, sum(keep)


# --- multiple choice ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice question: a context, its possible continuations, and the index of the right one."""

    context: str
    choices: tuple[str, ...]
    answer: int


def split_choice(encode: Callable[[str], list[int]], context: str, choice: str) -> tuple[list[int], list[int]]:
    """(context ids, choice ids) as lm-eval-harness splits them: trailing spaces of the context move to the
    choice, context + choice is encoded as one text, and the choice is every token after the context's own
    encoding (so a token merged across the boundary counts as the choice's)."""
    stripped = context.rstrip(" ")
    choice = context[len(stripped):] + choice
    whole, ctx = encode(stripped + choice), encode(stripped)
    return whole[:len(ctx)], whole[len(ctx):]


def score_choices(scorer: TokenScorer, encode: Callable[[str], list[int]], items: Sequence[ChoiceItem],
                  progress: Progress | None = None) -> list[list[float]]:
    """For each item, the summed log-likelihood (nats) of each choice's tokens given its context; a context longer
    than the scorer's rows is cut from the left. Raises ValueError naming an item whose choice encodes to no token
    or fills the whole row."""
    rows, where = [], []
    for i, item in enumerate(items):
        for j, choice in enumerate(item.choices):
            ctx, cont = split_choice(encode, item.context, choice)
            if not cont or not ctx:
                raise ValueError(f"item {i} choice {j}: the {'choice' if not cont else 'context'} encodes to no "
                                 "token")
            if len(cont) >= scorer.max_len:
                raise ValueError(f"item {i} choice {j}: {len(cont)} tokens leave no room for context in "
                                 f"{scorer.max_len}")
            rows.append((ctx + cont)[-scorer.max_len:])
            where.append((i, len(cont)))
    logprobs = scorer(rows, progress)
    out: list[list[float]] = [[] for _ in items]
    for (i, n), lp in zip(where, logprobs, strict=True):
        out[i].append(float(lp[len(lp) - n:].sum()))
    return out


def choice_metrics(items: Sequence[ChoiceItem], loglikelihoods: Sequence[Sequence[float]]
                   ) -> tuple[dict[str, float | int], list[dict[str, Any]]]:
    """(acc and acc_norm over the items, one prediction record per item). acc picks the choice of highest
    log-likelihood; acc_norm divides it by the choice's UTF-8 length in bytes first (lm-eval's acc_norm, which
    counts characters: the same for ASCII). Ties go to the first choice, as numpy's argmax."""
    records = []
    for item, lls in zip(items, loglikelihoods, strict=True):
        normed = [ll / max(len(c.encode("utf-8")), 1) for ll, c in zip(lls, item.choices, strict=True)]
        records.append({"answer": item.answer, "pred": int(np.argmax(lls)), "pred_norm": int(np.argmax(normed)),
                        "loglikelihoods": list(lls)})
    n = len(records)
    summary = {"items": n, "acc": sum(r["pred"] == r["answer"] for r in records) / n,
               "acc_norm": sum(r["pred_norm"] == r["answer"] for r in records) / n}
    return summary, records


# --- reading the data --------------------------------------------------------------------------------------------

def text_files(path: str) -> list[Path]:
    """The files of `path`: a file, every file under a folder (sorted), or a glob's matches. Raises
    FileNotFoundError when there are none."""
    p = Path(path)
    if p.is_file():
        return [p]
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else sorted(
        Path(f) for f in glob.glob(path, recursive=True) if Path(f).is_file())
    if not files:
        raise FileNotFoundError(f"no such file, folder or glob match: {path}")
    return files


def read_choice_items(path: str | Path) -> list[ChoiceItem]:
    """The items of a JSONL file of {"context": str, "choices": [str, ...], "answer": int}. Raises
    FileNotFoundError, or ValueError naming the line (`<path>:<line>: ...`) and what is wrong with it."""
    items = []
    for where, obj in read_json_objects(path, "items"):
        for key in ("context", "choices", "answer"):
            if key not in obj:
                raise ValueError(f"{where}: missing key {key!r}")
        context, choices, answer = obj["context"], obj["choices"], obj["answer"]
        if not isinstance(context, str) or not context:
            raise ValueError(f"{where}: 'context' must be a non-empty string")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise ValueError(f"{where}: 'choices' must be a list of at least two non-empty strings")
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise ValueError(f"{where}: 'answer' must be an index into the {len(choices)} choices, got {answer!r}")
        items.append(ChoiceItem(context, tuple(choices), answer))
    return items
