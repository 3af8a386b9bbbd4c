"""The one check of a generation request's fields, made before anything computes with them.

A request is a mapping of the wire fields below (a JSONL line of `scripts/generate.py`, an HTTP body; the engine
checks a `Request` through `serve.engine.request_problem`, which maps it onto the same fields). Every field's type,
range and int32 bounds are checked: bools are not integers, floats must be finite, strings and lists must be
strings and lists. A problem is one line naming the field and its value; None means the request is good.

    id              a non-empty string (default: the server names the request)
    prompt          text (needs a tokenizer); exactly one of prompt and prompt_ids
    prompt_ids      a non-empty list of token ids in [0, vocab_size)
    max_new_tokens  an integer in [1, 2**31 - 1]; prompt + max_new_tokens must fit the model's context
    temperature     a finite number in [0, float32 max]; 0 = greedy
    top_k           an integer in [0, 2**31 - 1]; 0 = no cut
    top_p           a finite number in (0, 1]
    min_p           a finite number in [0, 1]; 0 = no cut (ids below min_p x the top id's probability are dropped)
    logprobs        null or an integer in [0, 20]: the sampled token's log-probability and that many top ones
    seed            null or an integer in [0, 2**32)
    stop            a list of token ids in [0, vocab_size)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from model.checks import FLOAT32_MAX, interval_problem, shown

FIELDS = ("id", "prompt", "prompt_ids", "max_new_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "stop",
          "logprobs")
MAX_LOGPROBS = 20
INT32_MAX = 2**31 - 1
SEED_LIMIT = 2**32


class RequestError(ValueError):
    """A request that cannot be served; the message names the request and the reason, `request_id` the request."""

    def __init__(self, message: str, request_id: str | None = None):
        super().__init__(message)
        self.request_id = request_id


def is_integer(value: Any) -> bool:
    """An integer (Python or NumPy), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value: Any) -> bool:
    """An integer or a float (Python or NumPy), not a bool; may be non-finite."""
    return is_integer(value) or isinstance(value, (float, np.floating))


def _int_problem(name: str, value: Any, low: int, high: int) -> str | None:
    if not is_integer(value):
        return f"{name} must be an integer, got {shown(value)}"
    if value < low:
        return f"{name} must be >= {low}, got {shown(value)}"
    if value > high:
        return f"{name} must be <= {high}, got {shown(value)}"
    return None


def _number_problem(name: str, value: Any) -> str | None:
    if not is_number(value):
        return f"{name} must be a number, got {shown(value)}"
    if not is_integer(value) and not math.isfinite(value):  # an int of any size is finite (and too big for isfinite)
        return f"{name} must be finite, got {value}"
    return None


def _token_ids_problem(name: str, value: Any, vocab_size: int | None) -> str | None:
    if not isinstance(value, (list, tuple)):
        return f"{name} must be a list of token ids, got {shown(value)}"
    high = INT32_MAX + 1 if vocab_size is None else vocab_size
    where = "the vocabulary" if vocab_size is not None else "the int32 range"
    for i, token in enumerate(value):
        if not is_integer(token):
            return f"{name}[{i}] must be an integer token id, got {shown(token)}"
        if not 0 <= token < high:
            return f"token id {token} is outside {where} [0, {high}) ({name}[{i}])"
    return None


def field_problem(name: str, value: Any, *, vocab_size: int | None = None) -> str | None:
    """Why `value` is not a valid value of request field `name` (None if it is). Token ids are checked against
    `vocab_size` when given, else against the int32 range."""
    if name == "id":
        if value is not None and not (isinstance(value, str) and value):
            return f"id must be a non-empty string, got {shown(value)}"
        return None
    if name == "prompt":
        return None if isinstance(value, str) else f"prompt must be a string, got {shown(value)}"
    if name in ("prompt_ids", "stop"):
        return _token_ids_problem(name, value, vocab_size)
    if name == "max_new_tokens":
        return _int_problem(name, value, 1, INT32_MAX)
    if name == "top_k":
        return _int_problem(name, value, 0, INT32_MAX)
    if name == "seed":
        return None if value is None else _int_problem(name, value, 0, SEED_LIMIT - 1)
    if name == "logprobs":
        return None if value is None else _int_problem(name, value, 0, MAX_LOGPROBS)
    if name == "temperature":
        problem = _number_problem(name, value)
        if problem is None and not 0 <= value <= FLOAT32_MAX:
            problem = f"temperature must be >= 0 (and at most float32's {FLOAT32_MAX:.4g}), got {shown(value)}"
        return problem
    if name in ("top_p", "min_p"):  # top_p in (0, 1], min_p in [0, 1]
        return _number_problem(name, value) or interval_problem(name, value, 0, 1, open_low=name == "top_p",
                                                                 show=shown)
    return f"unknown field {shown(name)}; the fields are {list(FIELDS)}"


def request_problem(fields: Any, *, vocab_size: int | None = None, max_seq_len: int | None = None) -> str | None:
    """Why the request `fields` (a mapping of the module docstring's fields; absent ones take the server's
    defaults) cannot be served (None if it can). With `vocab_size`, token ids must be in the vocabulary; with
    `max_seq_len`, prompt_ids plus max_new_tokens must fit the context (a text prompt is checked once encoded)."""
    if not isinstance(fields, Mapping):
        return f"a request must be a JSON object, got {shown(fields)}"
    unknown = [key for key in fields if key not in FIELDS]
    if unknown:
        return f"unknown field {shown(unknown[0])}; the fields are {list(FIELDS)}"
    if ("prompt" in fields) == ("prompt_ids" in fields):
        return "give exactly one of 'prompt' (text) and 'prompt_ids' (token ids)"
    for name in FIELDS:
        if name in fields:
            problem = field_problem(name, fields[name], vocab_size=vocab_size)
            if problem:
                return problem
    # Every field has its type and bounds now: the arithmetic below is safe.
    prompt = fields.get("prompt_ids")
    if prompt is not None and len(prompt) == 0:
        return "the prompt is empty"
    if max_seq_len is not None and prompt is not None and "max_new_tokens" in fields:
        total = len(prompt) + fields["max_new_tokens"]
        if total > max_seq_len:
            return (f"prompt ({len(prompt)} tokens) + max_new_tokens ({fields['max_new_tokens']}) = {total} exceeds "
                    f"the model's context of {max_seq_len}")
    return None
