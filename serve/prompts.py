"""Batch files for `scripts/generate.py`: prompts in (text, one per line; or JSONL), results out (JSONL).

JSONL lines hold `{"prompt": "text"}` or `{"prompt_ids": [ids]}`, optionally with `id`, `max_new_tokens`,
`temperature`, `top_k`, `top_p`, `seed` and `stop` (a list of token ids) for that request alone; the command
line's values are the defaults. A bad line is reported with its line number, before anything runs.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serve.engine import Completion, Request, SamplingParams

PER_REQUEST = ("id", "prompt", "prompt_ids", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop")


def request_from(record: dict[str, Any], defaults: Request, encode: Callable[[str], list[int]] | None,
                 where: str) -> Request:
    """One Request from a JSON record, the missing fields from `defaults`. Raises ValueError naming `where`."""
    unknown = sorted(set(record) - set(PER_REQUEST))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known keys are {list(PER_REQUEST)}")
    if ("prompt" in record) == ("prompt_ids" in record):
        raise ValueError(f"{where}: give exactly one of 'prompt' (text) and 'prompt_ids' (token ids)")
    if "prompt" in record:
        if not isinstance(record["prompt"], str):
            raise ValueError(f"{where}: 'prompt' must be a string, got {record['prompt']!r}")
        if encode is None:
            raise ValueError(f"{where}: this model has no tokenizer for text prompts; give 'prompt_ids'")
        ids = encode(record["prompt"])
    else:
        ids = record["prompt_ids"]
        if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
            raise ValueError(f"{where}: 'prompt_ids' must be a list of integers")
    sampling = dataclasses.replace(defaults.sampling, **{k: record[k] for k in ("temperature", "top_k", "top_p",
                                                                                  "seed") if k in record})
    stop = tuple(record["stop"]) if "stop" in record else defaults.stop_ids
    return Request(tuple(ids), record.get("max_new_tokens", defaults.max_new_tokens), stop, sampling,
                   str(record["id"]) if "id" in record else None)


def read_requests(path: str | Path, defaults: Request, encode: Callable[[str], list[int]] | None) -> list[Request]:
    """Requests from a `.jsonl` file (one JSON object per line) or any other text file (one prompt per line;
    escapes like \\n are not interpreted). Empty lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prompts file at {path}")
    requests = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object")
        else:
            record = {"prompt": line}
        requests.append(request_from(record, defaults, encode, where))
    if not requests:
        raise ValueError(f"{path} holds no prompts")
    return requests


def default_request(max_new_tokens: int, temperature: float, top_k: int, top_p: float, seed: int | None,
                    stop_ids: tuple[int, ...]) -> Request:
    return Request((), max_new_tokens, stop_ids, SamplingParams(temperature, top_k, top_p, seed))


def result_record(c: Completion, decode: Callable[[list[int]], str] | None) -> dict[str, Any]:
    """The JSONL record of a completion: id, text, token_ids, finish_reason, error, ttft_s, tokens_per_s,
    cached_tokens (prompt tokens the prefix cache supplied)."""
    elapsed = c.token_times_s[-1] - c.arrival_s if c.token_times_s else None
    return {"id": c.request_id, "text": decode(c.token_ids) if decode and c.token_ids else "",
            "token_ids": c.token_ids, "finish_reason": c.finish_reason, "error": c.error, "ttft_s": c.ttft_s,
            "tokens_per_s": len(c.token_ids) / elapsed if elapsed else None, "cached_tokens": c.num_cached_tokens}
