"""Batch files for `scripts/generate.py`: prompts in (text, one per line; or JSONL), results out (JSONL).

A JSONL line holds one prompt: `{"prompt": "text"}`, `{"prompt_ids": [ids]}` or `{"messages": [{"role": ...,
"content": ...}, ...]}` (a chat, rendered by the model's chat template with the assistant's turn opened), and
optionally `id`, `max_new_tokens`, `temperature`, `top_k`, `top_p`, `min_p`, `seed`, `logprobs` and `stop` for that
request alone. `stop` is either stop strings -- a string or a list of strings: the output ends right before the
first one it contains -- or, as before, a list of token ids that end the request when generated. The command
line's values are the defaults; serve/request_checks.py says what each field may hold. A line whose request is
bad becomes an error result of its own, naming the line, and the others are served; only a line that is not a JSON
object at all (a file that is not a batch) is refused, before anything runs. A request without an id is named
`req-<its index in the batch>`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from model.jsonl import read_json_objects
from serve import request_checks
from serve.engine import Completion, Request, SamplingParams
from serve.request import rejected
from serve.request_checks import RequestError
from serve.stop_strings import stop_strings_problem

PER_REQUEST = (*request_checks.FIELDS, "messages")
SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "seed")
Encode = Callable[[str], list[int]]
EncodeChat = Callable[[list[dict[str, Any]]], list[int]]


@dataclasses.dataclass(frozen=True)
class BatchItem:
    """One line of a batch: its Request (or, refused before serving, its error result) and its stop strings."""

    request: Request | Completion
    stop_strings: tuple[str, ...] = ()


def _is_stop_strings(value: Any) -> bool:
    """`stop` given as text (a string, or a list holding a string) rather than as token ids."""
    return isinstance(value, str) or (isinstance(value, list) and any(isinstance(v, str) for v in value))


def _checked_fields(record: Any) -> tuple[dict[str, Any], tuple[str, ...], str | None]:
    """The record's engine fields (stop strings and messages taken out), its stop strings, and its problem."""
    if not isinstance(record, dict):
        return {}, (), request_checks.request_problem(record)
    fields, stops = dict(record), ()
    if "stop" in fields and _is_stop_strings(fields["stop"]):
        problem = stop_strings_problem(fields["stop"])
        if problem is not None:
            return fields, (), problem
        stop = fields.pop("stop")
        stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if "messages" in fields:
        if "prompt" in fields or "prompt_ids" in fields:
            return fields, stops, "give exactly one of 'prompt', 'prompt_ids' and 'messages'"
        if not isinstance(fields["messages"], list):
            return fields, stops, f"messages must be a list of messages, got {request_checks.shown(fields['messages'])}"
        # the other fields are checked as for a text prompt; the messages themselves by the chat template's renderer
        others = {k: v for k, v in fields.items() if k != "messages"}
        return fields, stops, request_checks.request_problem({**others, "prompt": ""})
    return fields, stops, request_checks.request_problem(fields)


def _token_ids(encode: Callable | None, value: Any, missing: str,
               failed: Callable[[Exception], str]) -> tuple[list[int] | None, str | None]:
    """(`encode(value)` as ints, None), or (None, the problem): `missing` without an encoder, `failed(error)` when
    it raises (a tokenizer's failure on this request is this request's problem alone)."""
    if encode is None:
        return None, missing
    try:
        return [int(t) for t in encode(value)], None
    except Exception as e:
        return None, failed(e)


def request_from(record: Any, defaults: Request, encode: Encode | None, where: str, default_id: str,
                 encode_chat: EncodeChat | None = None) -> BatchItem:
    """One request from a JSON record, the missing fields from `defaults`, named `default_id` if it has no id.
    `encode` tokenizes a text prompt, `encode_chat` renders and tokenizes messages (None: the model has none).
    Raises RequestError (its message naming the request and `where`) if the record is not a servable request."""
    rid = record.get("id") if isinstance(record, dict) else None
    rid = rid if request_checks.field_problem("id", rid) is None and rid is not None else default_id
    fields, stops, problem = _checked_fields(record)
    ids = None
    if problem is None and "prompt" in fields:
        ids, problem = _token_ids(
            encode, fields["prompt"], "this model has no tokenizer for text prompts; give 'prompt_ids'",
            lambda e: f"the prompt cannot be tokenized ({type(e).__name__}: {request_checks.shown(str(e))})")
    if problem is None and "messages" in fields:
        ids, problem = _token_ids(
            encode_chat, fields["messages"],
            "this model has no chat template for 'messages'; give 'prompt' or 'prompt_ids'",
            lambda e: f"the messages cannot be rendered ({e})")  # bad messages, or the template refused them
        if problem is None and not ids:
            problem = "the chat template rendered the messages as an empty prompt"
    if problem is None and stops and encode is None:
        problem = "this model has no tokenizer for stop strings; give 'stop' as token ids"
    if problem is not None:
        raise RequestError(f"request {rid!r}: {where}: {problem}", rid)
    sampling = dataclasses.replace(defaults.sampling, **{k: fields[k] for k in SAMPLING_FIELDS if k in fields})
    request = Request(tuple(fields["prompt_ids"] if ids is None else ids),
                      fields.get("max_new_tokens", defaults.max_new_tokens),
                      tuple(fields["stop"]) if "stop" in fields else defaults.stop_ids, sampling, rid,
                      logprobs=fields.get("logprobs", defaults.logprobs))
    return BatchItem(request, stops)


def read_records(path: str | Path) -> list[tuple[str, Any]]:
    """The lines of a prompts file as (where, record) pairs: a `.jsonl` file's JSON objects, any other text file's
    lines as {"prompt": line} (escapes like \\n are not interpreted). Empty lines are skipped. Reads no model: a
    file that is not a batch is refused before anything loads. Raises FileNotFoundError, or ValueError naming a
    line that is not a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prompts file at {path}")
    if path.suffix == ".jsonl":
        return read_json_objects(path, "prompts")
    records = [(f"{path}:{number}", {"prompt": line})
               for number, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    if not records:
        raise ValueError(f"{path} holds no prompts")
    return records


def requests_from(records: list[tuple[str, Any]], defaults: Request, encode: Encode | None,
                  encode_chat: EncodeChat | None = None) -> list[BatchItem]:
    """The batch of `read_records`, in order; a bad request's place holds its error result (see `rejected`)."""
    items = []
    for where, record in records:
        try:
            items.append(request_from(record, defaults, encode, where, f"req-{len(items)}", encode_chat))
        except RequestError as e:
            items.append(BatchItem(rejected(e)))
    return items


def read_requests(path: str | Path, defaults: Request, encode: Encode | None,
                  encode_chat: EncodeChat | None = None) -> list[BatchItem]:
    """`requests_from(read_records(path), ...)`."""
    return requests_from(read_records(path), defaults, encode, encode_chat)


def default_request(max_new_tokens: int, temperature: float, top_k: int, top_p: float, seed: int | None,
                    stop_ids: tuple[int, ...], min_p: float = 0.0) -> Request:
    """The request whose fields a batch line falls back on (the command line's values); no prompt."""
    return Request((), max_new_tokens, stop_ids, SamplingParams(temperature, top_k, top_p, seed, min_p))


def result_record(c: Completion, decode: Callable[[list[int]], str] | None, text: str | None = None,
                  finish_reason: str | None = None) -> dict[str, Any]:
    """The JSONL record of a completion: id, text (`text` if given: cut at a stop string), token_ids,
    finish_reason (`finish_reason` if given), error, ttft_s, tokens_per_s, cached_tokens (prompt tokens the
    prefix cache supplied)."""
    elapsed = c.token_times_s[-1] - c.arrival_s if c.token_times_s else None
    if text is None:
        text = decode(c.token_ids) if decode and c.token_ids else ""
    return {"id": c.request_id, "text": text, "token_ids": c.token_ids,
            "finish_reason": finish_reason or c.finish_reason, "error": c.error, "ttft_s": c.ttft_s,
            "tokens_per_s": len(c.token_ids) / elapsed if elapsed else None, "cached_tokens": c.num_cached_tokens}
