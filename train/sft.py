"""Supervised fine-tuning data: a JSONL file of `{"messages": [{"role", "content"}, ...]}` conversations, each
rendered with the tokenizer's chat template (train/chat_template.py), tokenized, and weighted for the loss: 1 on
the tokens of the assistant's turns, 0 elsewhere (system prompts, user turns, the template's headers).

The mask comes from the template itself, by rendering prefixes and taking the difference: an assistant turn is
the text that `render(messages[:k + 1])` adds to `render(messages[:k], add_generation_prompt=True)` (the reply
and the template's end-of-turn token, e.g. `<|im_end|>`; trailing whitespace after it is formatting, not
learned), and a token belongs to it when its first character does. Conversations are concatenated into one
stream (packed: a window of `seq_len + 1` tokens may span two conversations, as documents do in pretraining)
and batches are windows of it, with the weights cut from the same places (train/data.py's `windows_at`).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from model.jsonl import read_json_objects
from train.chat_template import messages_problem
from train.data import Corpus, token_dtype
from train.run_tokenizer import AnyTokenizer
from train.tokenizer import ByteTextTokenizer


def read_conversations(path: str | Path) -> list[list[dict[str, Any]]]:
    """The conversations of a JSONL file, one `{"messages": [...]}` object per non-empty line. Raises
    FileNotFoundError, or ValueError naming the line (`<path>:<line>: ...`) and what is wrong with it."""
    conversations = []
    for where, record in read_json_objects(path, "conversations"):
        messages = record.get("messages")
        problem = messages_problem(messages) if messages is not None else 'expected {"messages": [...]}'
        if problem:
            raise ValueError(f"{where}: {problem}")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"{where}: the conversation has no assistant message to learn")
        conversations.append(messages)
    return conversations


def _ids_and_starts(tokenizer: AnyTokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
    """The ids of `text` (no special tokens added: the template writes them) and each token's first character."""
    if isinstance(tokenizer, ByteTextTokenizer):
        data = text.encode("utf-8")
        char_of_byte = np.repeat(np.arange(len(text)), [len(c.encode("utf-8")) for c in text])
        return np.frombuffer(data, np.uint8).astype(np.int64), char_of_byte
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    return np.asarray(encoding.ids, np.int64), np.asarray([start for start, _ in encoding.offsets], np.int64)


def assistant_spans(tokenizer: AnyTokenizer, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character spans of its assistant turns. Raises ValueError
    if the template does not render the conversation prefix by prefix (then no mask can be derived from it)."""
    render = tokenizer.apply_chat_template
    full = render(messages, add_generation_prompt=False)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:k], add_generation_prompt=True), render(messages[:k + 1], False)
        if not (through.startswith(before) and full.startswith(through)):
            raise ValueError(f"the chat template does not render this conversation prefix by prefix (at message "
                             f"{k}), so the assistant tokens cannot be found from it")
        spans.append((len(before), len(through.rstrip())))
    return full, spans


def assistant_mask(tokenizer: AnyTokenizer, messages: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, weights) of one rendered conversation: weight 1 on the tokens of assistant turns (their
    end-of-turn token included), 0 elsewhere."""
    text, spans = assistant_spans(tokenizer, messages)
    ids, starts = _ids_and_starts(tokenizer, text)
    weights = np.zeros(len(ids), np.uint8)
    for begin, end in spans:
        weights[(starts >= begin) & (starts < end)] = 1
    return ids, weights


def _is_validation(messages: list[dict[str, Any]], val_fraction: float) -> bool:
    return zlib.crc32(json.dumps(messages, sort_keys=True).encode()) / 2**32 < val_fraction


def load_chat_corpus(path: str | Path, tokenizer: AnyTokenizer, val_fraction: float = 0.01) -> Corpus:
    """The conversations of `path` as a weighted Corpus: split by conversation (a stable hash picks about
    `val_fraction`; with too few conversations for that, the stream's last `val_fraction` of tokens is the
    validation split), tokens and weights packed end to end."""
    conversations = read_conversations(path)
    dtype = token_dtype(tokenizer.vocab_size)
    parts: dict[bool, list[tuple[np.ndarray, np.ndarray]]] = {False: [], True: []}
    for messages in conversations:
        parts[_is_validation(messages, val_fraction)].append(assistant_mask(tokenizer, messages))

    def packed(items: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        if not items:
            return np.zeros(0, dtype), np.zeros(0, np.uint8)
        return (np.concatenate([ids for ids, _ in items]).astype(dtype),
                np.concatenate([w for _, w in items]))

    (train, train_w), (val, val_w) = packed(parts[False]), packed(parts[True])
    n_train, n_val = len(parts[False]), len(parts[True])
    if not n_train or not n_val:
        train, train_w = packed(parts[False] + parts[True])
        cut = int(len(train) * (1 - val_fraction))
        train, val, train_w, val_w = train[:cut], train[cut:], train_w[:cut], train_w[cut:]
        n_train, n_val = len(conversations), 0
    key = f"sft-{zlib.crc32(train.tobytes() + val.tobytes()):08x}"
    return Corpus(train=train, val=val, key=key, n_train_files=n_train, n_val_files=n_val,
                  train_weights=train_w, val_weights=val_w)
