"""Evaluate a model (a meshlm run, a Hugging Face directory or a GGUF file) on text or on multiple-choice items.

    python -m scripts.evaluate --gguf SmolLM2-135M-Instruct.Q4_1.gguf --data README.md
    python -m scripts.evaluate --run runs/demo --data 'corpus/*.py' --seq-len 256 --json
    python -m scripts.evaluate --hf path/to/llama --data tests/data/choices_tiny.jsonl

Text (any file, a folder of them, or a glob): each file is one document, encoded as its tokenizer encodes it
(with the BOS it adds, nothing else), cut into windows of --seq-len tokens (default: the model's context) that
overlap by one token, so every token but a document's first is predicted once (--stride S: windows start S
tokens apart and score only the tokens no earlier window scored, Hugging Face's perplexity recipe; train/evaluation.py
says more). Reports loss (nats per token), perplexity, bits per byte (all nats / the text's UTF-8 bytes / ln 2)
and the counts. --max-tokens N evaluates only the first N tokens (of the documents in turn).

Multiple choice (a .jsonl of {"context": str, "choices": [str, ...], "answer": index}): the summed log-likelihood
of each choice's tokens after its context (lm-eval-harness's split: context + choice encoded together); reports
acc (highest log-likelihood) and acc_norm (log-likelihood per UTF-8 byte of the choice); --json adds every item's
log-likelihoods and predictions.

Compiled shapes are kept in JAX's persistent compilation cache (as scripts/generate.py: ~/.cache/meshlm/jax,
$MESHLM_COMPILATION_CACHE, --compilation-cache DIR, --no-compilation-cache), so a second evaluation skips them.
Output: one line of metrics (`seconds`: the scoring, compiles included), or with --json one JSON object. A
progress line on stderr; errors are one line (exit code 2)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from scripts.common import add_compilation_cache_args, fail, setup_logging, use_compilation_cache
from scripts.model_source import add_source_args, load_source, source_name


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(p)  # --run, --hf, --gguf, --step, --tokenizer
    p.add_argument("--data", required=True, help="a text file, a folder or glob of them, or a multiple-choice .jsonl")
    p.add_argument("--seq-len", type=int, help="tokens per window (default: the model's context)")
    p.add_argument("--stride", type=int, help="tokens between window starts (default: seq-len - 1)")
    p.add_argument("--batch-size", type=int,
                   help="windows (or choices) per jitted call (default: text 8192 // seq-len, at least 1; "
                        "multiple choice 8)")
    p.add_argument("--max-tokens", type=int, help="text: evaluate only the first N tokens")
    p.add_argument("--json", action="store_true", help="print one JSON object (with per-item predictions)")
    add_compilation_cache_args(p)
    p.add_argument("--log-level", default="WARNING")
    return p.parse_args(argv)


class ProgressLine:
    """`rows done/all` rewritten in place on stderr."""

    def __init__(self, what: str):
        self.what, self.start = what, time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        end = "\n" if done == total else ""
        print(f"\r{self.what}: {done}/{total} ({time.perf_counter() - self.start:.1f} s)", end=end,
              file=sys.stderr, flush=True)


def _documents(files: list[Path], tokenizer, max_tokens: int | None) -> tuple[list[list[int]], int]:
    """(token ids of each document, UTF-8 bytes they hold), cut to --max-tokens."""
    documents, n_bytes, budget = [], 0, max_tokens
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            fail(f"cannot read {path} as UTF-8 text: {e}")
        ids = tokenizer.encode(text)
        if budget is not None and len(ids) > budget:
            ids = ids[:budget]
            text = tokenizer.decode(ids, skip_special_tokens=True)
        if budget is not None:
            budget -= len(ids)
        if len(ids) > 1:
            documents.append(ids)
            n_bytes += len(text.encode("utf-8"))
        if budget == 0:
            break
    if not documents:
        fail(f"no text to evaluate in {', '.join(map(str, files))} (every document is empty or a single token)")
    return documents, n_bytes


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    setup_logging(args.log_level)
    for flag in ("seq_len", "stride", "batch_size", "max_tokens"):
        value = getattr(args, flag)
        if value is not None and value < (2 if flag == "seq_len" else 1):
            fail(f"--{flag.replace('_', '-')} must be at least {2 if flag == 'seq_len' else 1}, got {value}")
    from train.evaluation import (
        TextScore,
        TokenScorer,
        choice_metrics,
        read_choice_items,
        score_choices,
        score_documents,
        text_files,
    )

    multiple_choice = args.data.endswith(".jsonl")
    try:
        items = read_choice_items(args.data) if multiple_choice else None
        files = None if multiple_choice else text_files(args.data)
        model, tokenizer = load_source(args)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    if tokenizer is None:
        fail(f"{args.hf} has no tokenizer.json: name one with --tokenizer")
    context = model.cfg.max_seq_len
    seq_len = args.seq_len or context
    if seq_len > context:
        fail(f"--seq-len {seq_len} is beyond the model's context of {context} tokens")
    if args.stride is not None and args.stride > seq_len - 1:
        fail(f"--stride {args.stride} must be at most seq-len - 1 = {seq_len - 1}")
    use_compilation_cache(args)
    batch_size = args.batch_size or (8 if multiple_choice else max(1, 8192 // seq_len))
    scorer = TokenScorer(model, batch_size, seq_len)
    start = time.perf_counter()
    try:
        if multiple_choice:
            lls = score_choices(scorer, tokenizer.encode, items, ProgressLine("choices"))
            result, records = choice_metrics(items, lls)
        else:
            documents, n_bytes = _documents(files, tokenizer, args.max_tokens)
            nats, tokens = score_documents(scorer, documents, seq_len, args.stride, ProgressLine("windows"))
            result, records = TextScore(nats, tokens, n_bytes).metrics(), None
    except ValueError as e:
        fail(str(e))
    result = {"model": source_name(args), "data": args.data, "seq_len": seq_len, **result,
              "seconds": round(time.perf_counter() - start, 3)}
    if args.json:
        print(json.dumps({**result, "predictions": records} if records is not None else result))
    else:
        print(" ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return result


if __name__ == "__main__":
    main()
