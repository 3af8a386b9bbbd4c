"""The FastAPI app: /v1/completions, /v1/chat/completions, /v1/models (behind the API key when one is set),
/health, /metrics, /tokenize and /detokenize. Every error is OpenAI-shaped ({"error": {message, type, param,
code}}) and concerns its request alone. /health is 503 while the model loads or the server drains.

The tokenizer is passed in (serve/ does not import train/): any object with `encode(text, add_special_tokens=True)
-> list[int]`, `decode(ids, skip_special_tokens=True) -> str`, `eos_ids` (or `eos_id`), and optionally
`apply_chat_template(messages, add_generation_prompt=True) -> str`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.api.async_engine import AsyncEngine
from serve.api.generation import GenerationRun, engine_requests
from serve.api.metrics import CONTENT_TYPE, ServerMetrics
from serve.api.protocol import APIError, Generation, bad, parse_generation
from serve.engine import Engine
from serve.request_checks import shown

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 4 << 20
MAX_WAITING = 256


class ServerState:
    """What the routes share: the engine (None while loading), the tokenizer, the settings, whether draining."""

    def __init__(self, model_name: str, api_key: str | None, max_body_bytes: int, max_waiting: int):
        self.model_name, self.api_key = model_name, api_key
        self.max_body_bytes, self.max_waiting = max_body_bytes, max_waiting
        self.engine: AsyncEngine | None = None
        self.tokenizer: Any = None
        self.draining = False
        self.created = int(time.time())
        self.metrics = ServerMetrics()

    def set_engine(self, engine: AsyncEngine | Engine, tokenizer: Any) -> None:
        """The model is loaded: serve it (an `Engine` is started in its own thread here)."""
        if isinstance(engine, Engine):
            engine = AsyncEngine(engine, self.metrics).start()
        self.metrics = engine.metrics
        self.engine, self.tokenizer = engine, tokenizer

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.alive and not self.draining

    async def drain(self, timeout_s: float) -> None:
        """Take no new requests; let the running ones finish for up to `timeout_s`, then end the rest with
        finish_reason "abort"; return when none is left."""
        self.draining = True
        if self.engine is None:
            return
        deadline = time.monotonic() + timeout_s
        while self.engine.num_unfinished and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.engine.num_unfinished:
            log.warning("drain: %d requests still running after %.0f s: aborting them", self.engine.num_unfinished,
                        timeout_s)
            self.engine.abort_all()
            while self.engine.num_unfinished and self.engine.alive:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # let the streams send their last chunks


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def create_app(engine: AsyncEngine | Engine | None = None, tokenizer: Any = None, model_name: str = "meshlm", *,
               api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               max_waiting: int = MAX_WAITING) -> FastAPI:
    """The app serving `engine` (None: loading; call `app.state.server.set_engine` when it is)."""
    state = ServerState(model_name, api_key, max_body_bytes, max_waiting)
    if engine is not None:
        state.set_engine(engine, tokenizer)
    app = FastAPI(title="meshlm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(APIError(e.status_code, str(e.detail), code=str(e.status_code)))

    def check_key(request: Request) -> None:
        if state.api_key:
            auth = request.headers.get("authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), state.api_key.encode()):
                raise APIError(401, "Incorrect or missing API key (send 'Authorization: Bearer KEY')",
                               code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @app.get("/health")
    async def health() -> Response:
        if state.ready:
            return JSONResponse({"status": "ok"})
        status = "draining" if state.draining else "loading" if state.engine is None else "engine failed"
        return JSONResponse({"status": status}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        card = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "meshlm"}
        if state.engine is not None:
            card["max_model_len"] = state.engine.model_cfg.max_seq_len
        return {"object": "list", "data": [card]}

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        return await _generate(state, request, chat=False)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(state, request, chat=True)

    app.include_router(v1)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body = await read_json(request, state.max_body_bytes)
        if not isinstance(body, dict) or ("prompt" in body) == ("messages" in body):
            raise bad("prompt", "give exactly one of 'prompt' (text) and 'messages' (a chat)")
        gen = parse_generation({**body, "model": None}, chat="messages" in body)
        ids = prompt_ids(state, gen, add_special_tokens=body.get("add_special_tokens", True) is not False)
        return {"tokens": ids, "count": len(ids), "max_model_len": _engine(state).model_cfg.max_seq_len}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        body = await read_json(request, state.max_body_bytes)
        tokens = body.get("tokens") if isinstance(body, dict) else None
        vocab = _engine(state).model_cfg.vocab_size
        if not isinstance(tokens, list) or not all(type(t) is int and 0 <= t < vocab for t in tokens):
            raise bad("tokens", f"tokens must be a list of token ids in [0, {vocab}), got {shown(tokens)}")
        return {"prompt": _tokenizer(state).decode(tokens)}

    return app


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON: 413 beyond `limit` bytes (checked as it arrives), 400 if it is not JSON."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"the request body is {int(length)} bytes; the limit is {limit}", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is over the limit of {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as e:
        raise bad(None, f"the request body is not JSON ({getattr(e, 'msg', e)})") from None


def _engine(state: ServerState) -> AsyncEngine:
    if state.draining:
        raise APIError(503, "the server is shutting down", code="draining", headers={"Retry-After": "5"})
    if state.engine is None:
        raise APIError(503, "the model is still loading", code="loading", headers={"Retry-After": "5"})
    if not state.engine.alive:
        raise APIError(503, f"the engine failed ({state.engine.error!r})", code="engine_failed")
    return state.engine


def _tokenizer(state: ServerState) -> Any:
    _engine(state)
    if state.tokenizer is None:
        raise APIError(400, "this model has no tokenizer: give the prompt as token ids", param="prompt")
    return state.tokenizer


def eos_ids(tokenizer: Any) -> tuple[int, ...]:
    ids = getattr(tokenizer, "eos_ids", None)
    if ids is None:
        one = getattr(tokenizer, "eos_id", None)
        ids = () if one is None else (one,)
    return tuple(int(t) for t in ids)


def chat_text(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The chat as the model's prompt: its chat template, or plain 'role: content' lines without one."""
    if getattr(tokenizer, "chat_template", None) and hasattr(tokenizer, "apply_chat_template"):
        try:
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as e:  # a template that rejects this chat (roles out of order, ...) is this request's fault
            raise bad("messages", f"the chat template rejects these messages ({type(e).__name__}: {e})") from None
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def prompt_ids(state: ServerState, gen: Generation, add_special_tokens: bool = True) -> list[int]:
    """The prompt's token ids (token-id prompts as given), checked against the vocabulary."""
    engine = _engine(state)
    param = "messages" if gen.chat else "prompt"
    if isinstance(gen.prompt, list):
        ids = gen.prompt
    else:
        tok = _tokenizer(state)
        text = chat_text(tok, gen.messages) if gen.chat else gen.prompt
        try:  # a chat template writes the special tokens itself
            ids = [int(t) for t in tok.encode(text, add_special_tokens=add_special_tokens and not gen.chat)]
        except Exception as e:
            raise bad(param, f"the prompt cannot be tokenized ({type(e).__name__}: {shown(str(e))})") from None
    vocab = engine.model_cfg.vocab_size
    for i, t in enumerate(ids):
        if not 0 <= t < vocab:
            raise bad(param, f"token id {t} is outside the vocabulary [0, {vocab}) (prompt[{i}])")
    if not ids:
        raise bad(param, "the prompt is empty")
    return ids


def output_budget(engine: AsyncEngine, gen: Generation, n_prompt: int) -> int:
    """max_tokens, or all the room the prompt leaves; 400 if the request does not fit the context or the cache."""
    mc, cfg = engine.model_cfg, engine.engine.cfg
    context = min(mc.max_seq_len, engine.engine.allocator.num_usable * cfg.page_size)
    param = "messages" if gen.chat else "prompt"
    if n_prompt >= context:
        raise APIError(400, f"the prompt ({n_prompt} tokens) leaves no room for an output in this model's context "
                            f"of {context} tokens", param=param, code="context_length_exceeded")
    if gen.max_tokens is None:
        return context - n_prompt
    if n_prompt + gen.max_tokens > context:
        raise APIError(400, f"this model's context is {context} tokens, but the prompt ({n_prompt} tokens) + "
                            f"max_tokens ({gen.max_tokens}) = {n_prompt + gen.max_tokens}", param="max_tokens",
                       code="context_length_exceeded")
    return gen.max_tokens


async def _generate(state: ServerState, request: Request, chat: bool) -> Response:
    arrival = time.perf_counter()
    body = await read_json(request, state.max_body_bytes)
    gen = parse_generation(body, chat=chat)
    if gen.model is not None and gen.model != state.model_name:
        raise APIError(400, f"unknown model {gen.model!r}; this server serves {state.model_name!r}", param="model",
                       code="model_not_found")
    engine = _engine(state)
    if engine.num_queued + gen.n > state.max_waiting:
        raise APIError(503, f"the server is busy: {engine.num_queued} requests are waiting (limit "
                            f"{state.max_waiting}); retry shortly", code="queue_full", headers={"Retry-After": "1"})
    ids = prompt_ids(state, gen)
    stop_ids = tuple(dict.fromkeys(gen.stop_token_ids + (() if gen.ignore_eos else eos_ids(state.tokenizer))))
    vocab = engine.model_cfg.vocab_size
    if any(t >= vocab for t in stop_ids):
        raise bad("stop_token_ids", f"stop_token_ids must be in [0, {vocab}), got {list(gen.stop_token_ids)}")
    if state.tokenizer is None and (gen.stop or gen.logprobs is not None):
        raise bad("stop" if gen.stop else "logprobs", "stop strings and logprobs need a tokenizer")
    requests = engine_requests(gen, ids, output_budget(engine, gen, len(ids)), stop_ids,
                               uuid.uuid4().hex)
    decode = state.tokenizer.decode if state.tokenizer is not None else (lambda t: "")
    run = GenerationRun(engine, gen, requests, ids, decode, state.model_name, arrival)
    await run.start()
    echo = decode(ids) if gen.echo else ""
    if gen.stream:
        return StreamingResponse(_aborting(run, run.events(echo)), media_type="text/event-stream")
    watcher = asyncio.ensure_future(_disconnected(request))
    task = asyncio.ensure_future(run.response(echo))
    await asyncio.wait({watcher, task}, return_when=asyncio.FIRST_COMPLETED)
    if not task.done():  # the client went away: free its pages
        task.cancel()
        run.abort()
        return Response(status_code=499)
    watcher.cancel()
    return JSONResponse(task.result())


async def _aborting(run: GenerationRun, events):
    """The stream's events; if the client goes away (the task is cancelled), the choices are aborted."""
    try:
        async for event in events:
            yield event
    finally:
        run.abort()


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
