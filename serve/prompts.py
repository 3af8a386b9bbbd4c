"""Batch files for `scripts/generate.py`: prompts in (text, one per line; or JSONL), results out (JSONL).

JSONL lines hold `{"prompt": "text"}` or `{"prompt_ids": [ids]}`, optionally with `id`, `max_new_tokens`,
`temperature`, `top_k`, `top_p`, `seed` and `stop` (a list of token ids) for that request alone; the command
line's values are the defaults; serve/request_checks.py says what each field may hold. A line whose request is
bad becomes an error result of its own, naming the line, and the others are served; only a line that is not a
JSON object at all (a file that is not a batch) is refused, before anything runs. A request without an id is
named `req-<its index in the batch>`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serve import request_checks
from serve.engine import Completion, Request, SamplingParams
from serve.request_checks import RequestError

PER_REQUEST = request_checks.FIELDS


def request_from(record: Any, defaults: Request, encode: Callable[[str], list[int]] | None, where: str,
                 default_id: str) -> Request:
    """One Request from a JSON record, the missing fields from `defaults`, named `default_id` if it has no id.
    Raises RequestError (its message naming the request and `where`) if the record is not a servable request."""
    rid = record.get("id") if isinstance(record, dict) else None
    rid = rid if request_checks.field_problem("id", rid) is None and rid is not None else default_id
    problem = request_checks.request_problem(record)
    ids = None
    if problem is None and "prompt" in record:
        if encode is None:
            problem = "this model has no tokenizer for text prompts; give 'prompt_ids'"
        else:
            try:
                ids = [int(t) for t in encode(record["prompt"])]
            except Exception as e:  # a tokenizer's failure on this text is this request's problem alone
                problem = f"the prompt cannot be tokenized ({type(e).__name__}: {request_checks.shown(str(e))})"
    if problem is not None:
        raise RequestError(f"request {rid!r}: {where}: {problem}", rid)
    sampling = dataclasses.replace(defaults.sampling, **{k: record[k] for k in ("temperature", "top_k", "top_p",
                                                                                  "seed") if k in record})
    return Request(tuple(record["prompt_ids"] if ids is None else ids),
                   record.get("max_new_tokens", defaults.max_new_tokens),
                   tuple(record["stop"]) if "stop" in record else defaults.stop_ids, sampling, rid)


def rejected(error: RequestError) -> Completion:
    """The result of a request refused before serving: finish_reason "error", the error's text and id."""
    return Completion(error.request_id, [], finish_reason="error", error=str(error))


def read_requests(path: str | Path, defaults: Request,
                  encode: Callable[[str], list[int]] | None) -> list[Request | Completion]:
    """Requests from a `.jsonl` file (one JSON object per line) or any other text file (one prompt per line;
    escapes like \\n are not interpreted), in order; a bad request's place holds its error result (see `rejected`).
    Empty lines are skipped. Raises FileNotFoundError, or ValueError naming a line that is not a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prompts file at {path}")
    items: list[Request | Completion] = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as e:  # also an integer too long, or nesting too deep, to read
                raise ValueError(f"{where}: not JSON ({getattr(e, 'msg', e)})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {request_checks.shown(record)}")
        else:
            record = {"prompt": line}
        try:
            items.append(request_from(record, defaults, encode, where, f"req-{len(items)}"))
        except RequestError as e:
            items.append(rejected(e))
    if not items:
        raise ValueError(f"{path} holds no prompts")
    return items


def default_request(max_new_tokens: int, temperature: float, top_k: int, top_p: float, seed: int | None,
                    stop_ids: tuple[int, ...]) -> Request:
    """The request whose fields a batch line falls back on (the command line's values); no prompt."""
    return Request((), max_new_tokens, stop_ids, SamplingParams(temperature, top_k, top_p, seed))


def result_record(c: Completion, decode: Callable[[list[int]], str] | None) -> dict[str, Any]:
    """The JSONL record of a completion: id, text, token_ids, finish_reason, error, ttft_s, tokens_per_s,
    cached_tokens (prompt tokens the prefix cache supplied)."""
    elapsed = c.token_times_s[-1] - c.arrival_s if c.token_times_s else None
    return {"id": c.request_id, "text": decode(c.token_ids) if decode and c.token_ids else "",
            "token_ids": c.token_ids, "finish_reason": c.finish_reason, "error": c.error, "ttft_s": c.ttft_s,
            "tokens_per_s": len(c.token_ids) / elapsed if elapsed else None, "cached_tokens": c.num_cached_tokens}
