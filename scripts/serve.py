"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) on the continuous-batching engine.

    python -m scripts.serve --run runs/demo                         # http://127.0.0.1:8000/v1
    python -m scripts.serve --hf path/to/llama --port 8080 --api-key secret --set serve.max_running=32
    python -m scripts.serve --gguf SmolLM2-135M-Instruct.Q4_1.gguf

Endpoints: /v1/completions, /v1/chat/completions, /v1/models (behind the API key, from --api-key or
$MESHLM_API_KEY, when one is set), /health (503 while loading or draining), /metrics (Prometheus), /tokenize,
/detokenize. The server listens at once and loads the model in the background (/health says when it is ready).
SIGTERM (or Ctrl-C) drains: no new requests; running ones finish within --drain-timeout seconds or end with
finish_reason "abort"; then the process exits. Engine settings: every ServeConfig field as --set serve.FIELD=VALUE.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
import time

from scripts.common import add_compilation_cache_args, fail, setup_logging, use_compilation_cache
from scripts.model_source import add_source_args, load_source, source_name
from scripts.serve_flags import add_serve_args, load_draft_model, serve_config_or_exit

log = logging.getLogger("scripts.serve")
API_KEY_ENV = "MESHLM_API_KEY"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' on /v1 (default ${API_KEY_ENV})")
    p.add_argument("--model-name", help="the model's name in the API (default: the source's file or folder name)")
    p.add_argument("--max-waiting", type=int, default=256,
                   help="requests waiting for the engine at most; beyond, 503 with Retry-After")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20, help="request bodies larger get 413")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds running requests get to finish after SIGTERM before they are aborted")
    p.add_argument("--warmup", action="store_true", help="compile the engine's step shapes before serving")
    add_serve_args(p)
    add_compilation_cache_args(p)
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def load_engine(args: argparse.Namespace, serve_cfg, state, loop: asyncio.AbstractEventLoop, server) -> None:
    """Load the model and start the engine (in a thread: the server answers /health meanwhile)."""
    from serve.engine import Engine

    try:
        start = time.perf_counter()
        model, tokenizer = load_source(args)
        engine = Engine(model, serve_cfg, draft_model=load_draft_model(args, model.cfg))
        if args.warmup:
            engine.warmup()
        loop.call_soon_threadsafe(state.set_engine, engine, tokenizer)
        log.info("model %r ready in %.1f s (%d KV pages of %d tokens)", state.model_name,
                 time.perf_counter() - start, engine.allocator.num_usable, serve_cfg.page_size)
    except BaseException as e:
        log.error("loading the model failed: %s", e, exc_info=not isinstance(e, (FileNotFoundError, ValueError)))
        state.load_error = e
        server.should_exit = True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    for name in ("max_waiting", "max_body_bytes", "port"):
        if getattr(args, name) < (0 if name == "port" else 1):
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    serve_cfg = serve_config_or_exit(args)
    use_compilation_cache(args)
    import uvicorn

    from serve.api.app import create_app

    app = create_app(None, None, args.model_name or source_name(args),
                     api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                     max_body_bytes=args.max_body_bytes, max_waiting=args.max_waiting)
    state = app.state.server
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                            timeout_graceful_shutdown=5, access_log=False)
    server = DrainingServer(config, state, args.drain_timeout)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        threading.Thread(target=load_engine, args=(args, serve_cfg, state, loop, server), daemon=True).start()
        await server.serve()

    state.load_error = None
    asyncio.run(serve())
    if state.engine is not None:
        state.engine.stop()
    if state.load_error is not None:
        print(f"error: loading the model failed: {state.load_error}", file=sys.stderr)
        return 1
    return 0


class DrainingServer:
    """uvicorn's server, whose first SIGTERM/SIGINT drains the app (`ServerState.drain`) before shutting down; a
    second one exits at once."""

    def __new__(cls, config, state, drain_timeout: float):
        import uvicorn

        class _Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame) -> None:
                if state.draining or sig not in (signal.SIGTERM, signal.SIGINT):
                    return super().handle_exit(sig, frame)
                log.info("signal %d: draining (up to %.0f s), then exiting", sig, drain_timeout)
                loop = asyncio.get_event_loop()

                def start_drain() -> None:
                    task = loop.create_task(state.drain(drain_timeout))
                    task.add_done_callback(lambda _: setattr(self, "should_exit", True))

                loop.call_soon_threadsafe(start_drain)  # wakes the loop, wherever the signal interrupted it

        return _Server(config)


if __name__ == "__main__":
    sys.exit(main())
