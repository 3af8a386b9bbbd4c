"""The tokenizer a training run reads its text with: named by `train.tokenizer`, copied into the run directory
so that resume, generate, serve and export use the same one even if the original file moves, and described by
what training needs beyond the `Tokenizer` interface: a fingerprint (the token cache's key), the id that
separates documents, and how many bytes of text each token stands for (bits per byte).

Names (`train.tokenizer`, `--tokenizer`): "bytes" (meshlm's byte tokenizer), a `tokenizer.json` path or a model
directory holding one, "hf:DIR", "gguf:FILE" (the vocabulary in the file's header), or "run:DIR[@STEP]" (another
run's tokenizer). A run's copy is `tokenizer.json` + `tokenizer_config.json` in the run directory; a byte run
has none.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from train.tokenizer import ByteTextTokenizer, ByteTokenizer, TextTokenizer, _bytes_to_unicode, load_tokenizer

AnyTokenizer = ByteTextTokenizer | TextTokenizer
RUN_TOKENIZER_FILE = "tokenizer.json"
DEFAULT_EOS = "<|endoftext|>"  # scripts/train_tokenizer.py's separator


def split_source(spec: str) -> tuple[str, str]:
    """("hf" | "gguf" | "run" | "path", the rest) of a source name such as "gguf:FILE"; a bare path is "path"."""
    kind, sep, rest = spec.partition(":")
    if sep and kind in ("hf", "gguf", "run"):
        if not rest:
            raise ValueError(f"{spec!r}: expected {kind}:PATH")
        return kind, rest
    return "path", spec


def run_path(rest: str) -> tuple[Path, int | None]:
    """The directory and step of "DIR[@STEP]" (None: the newest)."""
    directory, at, step = rest.rpartition("@")
    if at and step.isdigit():
        return Path(directory), int(step)
    return Path(rest), None


def training_tokenizer(spec: str) -> AnyTokenizer:
    """The tokenizer `spec` names (see the module docstring). Raises FileNotFoundError or ValueError naming it."""
    if spec == "bytes":
        return ByteTextTokenizer()
    kind, rest = split_source(spec)
    if kind == "run":
        return run_tokenizer(run_path(rest)[0])
    return load_tokenizer(rest)


def run_tokenizer(run_dir: str | Path) -> AnyTokenizer:
    """The tokenizer a run trained with: its own copy, or the byte tokenizer when it has none."""
    path = Path(run_dir) / RUN_TOKENIZER_FILE
    return load_tokenizer(path) if path.is_file() else ByteTextTokenizer()


def save_run_tokenizer(tokenizer: AnyTokenizer, run_dir: str | Path) -> None:
    """Keep a copy of `tokenizer` in `run_dir` (nothing for the byte tokenizer, the default). A bare
    tokenizer.json's separator is written down as its eos_token, so generation stops there."""
    if isinstance(tokenizer, TextTokenizer):
        if tokenizer.special_tokens.get("eos_token") is None:
            eos = tokenizer.backend.id_to_token(separator_id(tokenizer))
            tokenizer = TextTokenizer(tokenizer.backend, special_tokens={**tokenizer.special_tokens, "eos_token": eos},
                                      chat_template=tokenizer.chat_template, extra_eos_ids=tokenizer.eos_ids,
                                      clean_up_spaces=tokenizer.clean_up_spaces)
        tokenizer.save(run_dir)


def fingerprint(tokenizer: AnyTokenizer) -> str:
    """A short hash of everything that decides the ids of a text: "bytes" for the byte tokenizer."""
    if isinstance(tokenizer, ByteTextTokenizer):
        return "bytes"
    data = json.dumps([tokenizer.backend.to_str(), separator_id(tokenizer)], sort_keys=True)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def separator_id(tokenizer: AnyTokenizer) -> int:
    """The id written between documents: the tokenizer's EOS, or for a bare tokenizer.json (no config beside it,
    as scripts/train_tokenizer.py writes) its `<|endoftext|>` token. Raises ValueError if it has neither."""
    if tokenizer.eos_ids:
        return int(tokenizer.eos_ids[0])
    fallback = tokenizer.backend.token_to_id(DEFAULT_EOS)
    if fallback is None:
        raise ValueError(f"the tokenizer has no EOS token to separate documents with; give one in its "
                         f"tokenizer_config.json (eos_token) or add {DEFAULT_EOS!r}")
    return int(fallback)


def token_byte_lengths(tokenizer: AnyTokenizer) -> np.ndarray:
    """[vocab_size] int32: how many bytes of text each id stands for, the denominator of bits per byte. A
    byte-level token counts its bytes; the document separator counts 1 (as the byte tokenizer's EOS always
    has); other special tokens 0 (they are not text)."""
    sep = separator_id(tokenizer)
    if isinstance(tokenizer, ByteTextTokenizer):
        lengths = np.zeros(ByteTokenizer.vocab_size, np.int32)
        lengths[:256] = 1
        lengths[sep] = 1
        return lengths
    backend = tokenizer.backend
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    lengths = np.zeros(tokenizer.vocab_size, np.int32)
    added = backend.get_added_tokens_decoder()
    for token, i in backend.get_vocab(with_added_tokens=True).items():
        if i in added:
            lengths[i] = 0 if added[i].special else len(added[i].content.encode("utf-8"))
        elif all(c in byte_of for c in token):
            lengths[i] = len(token)  # GPT-2's byte-level spelling: one character per byte
        elif token.startswith("<0x") and token.endswith(">") and len(token) == 6:
            lengths[i] = 1  # sentencepiece's byte fallback
        else:
            lengths[i] = len(token.replace("\u2581", " ").encode("utf-8"))
    lengths[sep] = 1
    return lengths
