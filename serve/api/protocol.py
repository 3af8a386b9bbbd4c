"""The OpenAI wire format: request bodies of /v1/completions and /v1/chat/completions checked into `Generation`
(every bad value is an `APIError` naming its field, as the OpenAI API does), and the error body.

Fields (OpenAI names): model, prompt | messages, max_tokens / max_completion_tokens, temperature, top_p, top_k,
min_p, seed, n, stop (a string or a list of strings), stop_token_ids, ignore_eos, logprobs (completions: an int;
chat: a bool with top_logprobs), stream, stream_options.include_usage, echo (completions). Other fields are ignored,
as OpenAI-compatible servers do (clients send `user`, `frequency_penalty` = 0, ...).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from serve.request_checks import INT32_MAX, SEED_LIMIT, is_integer, is_number, shown
from serve.stop_strings import MAX_STOP_STRINGS

MAX_LOGPROBS = 20
MAX_N = 16
MAX_STOP = MAX_STOP_STRINGS


class APIError(Exception):
    """An error response: HTTP `status` and OpenAI's {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> APIError:
    return APIError(400, message, param=param)


@dataclasses.dataclass(frozen=True)
class Generation:
    """A checked request: what to generate and how. `prompt` is text or token ids (completions); `messages` the
    chat. `logprobs` None = none, k = the sampled token's logprob and the top k alternatives."""

    model: str | None
    prompt: str | list[int] | None = None
    messages: list[dict[str, str]] | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    n: int = 1
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    stream: bool = False
    include_usage: bool = False
    echo: bool = False

    @property
    def chat(self) -> bool:
        return self.messages is not None


def _get(body: dict, name: str, check, default=None):
    value = body.get(name)
    return default if value is None else check(name, value)


def _int(low: int, high: int):
    def check(name: str, value: Any) -> int:
        if not is_integer(value):
            raise bad(name, f"{name} must be an integer, got {shown(value)}")
        if not low <= value <= high:
            raise bad(name, f"{name} must be in [{low}, {high}], got {value}")
        return int(value)
    return check


def _float(low: float, high: float, low_open: bool = False):
    def check(name: str, value: Any) -> float:
        if not is_number(value) or (not is_integer(value) and not math.isfinite(value)):
            raise bad(name, f"{name} must be a finite number, got {shown(value)}")
        if value > high or value < low or (low_open and value == low):
            raise bad(name, f"{name} must be in {'(' if low_open else '['}{low}, {high}], got {value}")
        return float(value)
    return check


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise bad(name, f"{name} must be true or false, got {shown(value)}")
    return value


def _token_ids(name: str, value: Any) -> list[int]:
    if not isinstance(value, list) or not all(is_integer(t) and 0 <= t <= INT32_MAX for t in value):
        raise bad(name, f"{name} must be a list of token ids, got {shown(value)}")
    return [int(t) for t in value]


def _stop(name: str, value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad(name, f"stop must be a string or a list of strings, got {shown(value)}")
    if len(stops) > MAX_STOP:
        raise bad(name, f"stop takes at most {MAX_STOP} strings, got {len(stops)}")
    return tuple(s for s in stops if s)


def _prompt(name: str, value: Any) -> str | list[int]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one prompt
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(is_integer(t) for t in value):
        return _token_ids(name, value)
    raise bad(name, f"prompt must be a string or a non-empty list of token ids (one prompt per request), "
                    f"got {shown(value)}")


def _content(i: int, value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # content parts: only text
        texts = []
        for part in value:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise bad(f"messages[{i}].content", f"messages[{i}].content: only text parts are supported, got "
                                                    f"{shown(part)}")
            texts.append(part["text"])
        return "".join(texts)
    raise bad(f"messages[{i}].content", f"messages[{i}].content must be a string, got {shown(value)}")


def _messages(name: str, value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise bad(name, f"messages must be a non-empty list, got {shown(value)}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}]", f"messages[{i}] must be an object with a 'role', got {shown(m)}")
        out.append({"role": m["role"], "content": _content(i, m.get("content") or "")})
    return out


def parse_generation(body: Any, *, chat: bool) -> Generation:
    """The checked request of a completions (`chat` False) or chat completions body; raises APIError(400)."""
    if not isinstance(body, dict):
        raise bad(None, f"the request body must be a JSON object, got {shown(body)}")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", f"model must be a string, got {shown(model)}")
    fields: dict[str, Any] = {"model": model}
    if chat:
        if "messages" not in body:
            raise bad("messages", "messages is required")
        fields["messages"] = _messages("messages", body["messages"])
        for name in ("max_completion_tokens", "max_tokens"):
            if body.get(name) is not None:
                fields["max_tokens"] = _int(1, INT32_MAX)(name, body[name])
                break
        if _get(body, "logprobs", _bool, False):
            fields["logprobs"] = _get(body, "top_logprobs", _int(0, MAX_LOGPROBS), 0)
        elif body.get("top_logprobs") is not None:
            raise bad("top_logprobs", "top_logprobs needs logprobs: true")
    else:
        if "prompt" not in body:
            raise bad("prompt", "prompt is required")
        fields["prompt"] = _prompt("prompt", body["prompt"])
        fields["max_tokens"] = _get(body, "max_tokens", _int(1, INT32_MAX))
        fields["logprobs"] = _get(body, "logprobs", _int(0, MAX_LOGPROBS))
        fields["echo"] = _get(body, "echo", _bool, False)
    fields["temperature"] = _get(body, "temperature", _float(0.0, 100.0), 1.0)
    fields["top_p"] = _get(body, "top_p", _float(0.0, 1.0, low_open=True), 1.0)
    top_k = body.get("top_k")
    fields["top_k"] = 0 if top_k in (None, -1) else _int(0, INT32_MAX)("top_k", top_k)
    fields["min_p"] = _get(body, "min_p", _float(0.0, 1.0), 0.0)
    fields["seed"] = _get(body, "seed", _int(0, SEED_LIMIT - 1))
    fields["n"] = _get(body, "n", _int(1, MAX_N), 1)
    fields["stop"] = _get(body, "stop", _stop, ())
    fields["stop_token_ids"] = tuple(_get(body, "stop_token_ids", _token_ids, []))
    fields["ignore_eos"] = _get(body, "ignore_eos", _bool, False)
    fields["stream"] = _get(body, "stream", _bool, False)
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise bad("stream_options", f"stream_options must be an object, got {shown(options)}")
        if not fields["stream"]:
            raise bad("stream_options", "stream_options needs stream: true")
        fields["include_usage"] = _get(options, "include_usage", _bool, False)
    return Generation(**fields)
