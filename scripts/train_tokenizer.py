"""Train a byte-level BPE tokenizer (GPT-2's kind: every byte is a token, so any text round-trips exactly) on the
training text, with the `tokenizers` library, and write it as a tokenizer.json for `scripts.train --tokenizer`:

    python -m scripts.train_tokenizer --vocab-size 8192 --out runs/tok8k.json [--data PATH]

`--data` names text as `scripts.train --data` does (default: the Python standard library); the files the
training run will hold out for validation (same `--val-fraction`) are left out. The vocabulary is the 256 bytes,
one special token `<|endoftext|>` (the document separator, EOS) and merges up to `--vocab-size` ids in all.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from scripts.common import fail, setup_logging

EOS_TOKEN = "<|endoftext|>"


def train_bpe(texts, vocab_size: int):
    """A byte-level BPE `tokenizers.Tokenizer` of `vocab_size` ids trained on the strings `texts` yields."""
    import tokenizers

    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
                                             show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    return backend


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="a text file, a folder or a glob (default: the Python standard library)")
    p.add_argument("--vocab-size", type=int, default=8192, help="ids in all: 256 bytes + EOS + merges")
    p.add_argument("--val-fraction", type=float, default=0.01, help="as train.val_fraction: those files are left out")
    p.add_argument("--out", required=True, help="the tokenizer.json to write")
    args = p.parse_args(argv)
    setup_logging("WARNING")
    if args.vocab_size < 258:
        fail(f"--vocab-size {args.vocab_size}: at least 258 (256 bytes, EOS and one merge)")

    from train.data import is_validation_file, resolve_files

    try:
        files = resolve_files(args.data)
    except FileNotFoundError as e:
        fail(str(e))
    train_files = [f for f in files if not is_validation_file(f, args.val_fraction)] or files
    start = time.perf_counter()
    backend = train_bpe((f.read_bytes().decode("utf-8", errors="replace") for f in train_files), args.vocab_size)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    backend.save(args.out)
    print(f"wrote {args.out}: {backend.get_vocab_size()} ids from {len(train_files)} files in "
          f"{time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
