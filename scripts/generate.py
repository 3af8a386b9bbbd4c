"""Generate with the continuous-batching engine from a meshlm run directory, a Hugging Face model directory or a
GGUF file.

    python -m scripts.generate --run runs/demo --prompt "def parse("                 # print continuations
    python -m scripts.generate --run runs/demo --prompts prompts.jsonl --out out.jsonl  # a batch, to JSONL
    python -m scripts.generate --hf path/to/llama --prompts prompts.jsonl --out out.jsonl --static
    python -m scripts.generate --gguf SmolLM2-135M-Instruct.Q4_1.gguf --chat "What is a prime?" --stream

    python -m scripts.generate --run runs/demo --prompt "def parse(" --stream --set serve.page_size=8

Prompts files: `.jsonl` lines `{"prompt": "..."}`, `{"prompt_ids": [...]}` or `{"messages": [{"role": "user",
"content": "..."}]}` (a chat, rendered with the model's chat template; a model without one gets an error for that
request) with optional per-request `id`, `max_new_tokens`, `temperature`, `top_k`, `top_p`, `min_p`, `seed`,
`logprobs` and `stop`: stop strings (`"stop": ["\\n\\n", "User:"]`, the text ends right before the first one
generated; finish_reason "stop") or a list of token ids (as before). Any other file is one prompt per line;
`--chat TEXT` is a one-message chat. The whole file is read (each line a JSON object) before the model loads.
The tokenizer is the source's own (train/tokenizer.py: a tokenizer.json, the GGUF vocabulary, the byte tokenizer
of a run) or `--tokenizer`; generation ends at its EOS and end-of-turn tokens. Results: one JSON line per request
(`id, text, token_ids, finish_reason, error, warning, ttft_s, tokens_per_s, cached_tokens`) in input order;
`token_ids` are every token generated, through a stop string's.
A request generates up to its own `max_new_tokens`, else `--max-new-tokens`, else up to the model's context. When
the command line's value would overflow the context it is clamped to the room the prompt leaves, with a `warning`
in that result; a request's own value that overflows is that request's error.
`--stream` prints each request's text as it is produced (UTF-8-safe: a character split over tokens appears once
whole), one request after another in input order: all are served together, the first unfinished one is printed
live and the later ones are printed, caught up, when their turn comes.
`--static` serves the same requests with static batching (the baseline). A bad request (serve/request_checks.py
says what each field may hold) gets its error in its own result line and the rest are served; a request without
an id is named `req-<its index>`.
Engine settings: every ServeConfig field as `--set serve.FIELD=VALUE` (the shorthand flags are the same settings).
Compiled steps are kept in JAX's persistent compilation cache (~/.cache/meshlm/jax, or $MESHLM_COMPILATION_CACHE, or
--compilation-cache DIR; --no-compilation-cache for none), so a second start reuses them. On stderr: the load
time, the compile time (JAX's tracing + compiling, or reading from the cache, after the model is loaded), the
serving time and the first output token's time since the process started, and one `summary: {json}` line with them.
Exit code: 0 when the batch was served and at least one request succeeded; 1 when every request failed, or if
serving itself stops (the finished results are still written); 2 for a bad command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from tqdm import tqdm

from scripts.common import (
    CompileClock,
    add_compilation_cache_args,
    compilation_cache_path,
    enable_compilation_cache,
    fail,
    process_age_s,
    setup_logging,
)
from scripts.model_source import add_source_args, load_source
from scripts.serve_flags import add_serve_args, load_draft_model
from scripts.stream_text import StreamPrinter

DEFAULT_PROMPTS = ["def ", "import os\n", "class Stack:\n    def __init__(self", "if __name__ == "]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(p)  # --run, --hf, --gguf, --step, --tokenizer
    p.add_argument("--prompt", action="append", help="prompt text (repeatable; default: a few code openings)")
    p.add_argument("--chat", action="append", help="a user message, answered as a chat (repeatable)")
    p.add_argument("--stop", action="append", help="a stop string for every request without its own (repeatable)")
    p.add_argument("--prompts", help="a prompts file: .jsonl, or text with one prompt per line")
    p.add_argument("--out", help="write results as JSONL here (default: print the texts)")
    p.add_argument("--stream", action="store_true",
                   help="print each request's text as its tokens are produced, one request after another")
    p.add_argument("--max-new-tokens", type=int,
                   help="tokens per request at most (default: up to the model's context); a request whose prompt "
                        "leaves less room is clamped to it, with a warning in its result")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, help="the engine's seed for requests without their own (= --set serve.seed)")
    add_serve_args(p)
    p.add_argument("--warmup", action="store_true",
                   help="compile every step shape before serving (timed as compile time, not serving time)")
    p.add_argument("--static", action="store_true", help="static batching (the baseline) instead of the engine")
    p.add_argument("--no-prefix-caching", action="store_true", help="= --set serve.prefix_caching=false")
    add_compilation_cache_args(p)
    p.add_argument("--log-level", default="WARNING")
    return p.parse_args(argv)


class Loaded(NamedTuple):
    """A model and its text functions (None without a tokenizer: token-id prompts only)."""

    model: Any
    encode: Callable[[str], list[int]] | None
    decode: Callable[[list[int]], str] | None
    stop_ids: tuple[int, ...]
    encode_chat: Callable[[list[dict[str, Any]]], list[int]] | None = None


def load(args: argparse.Namespace) -> Loaded:
    """The model of --run, --hf or --gguf (scripts/model_source.py), and its tokenizer's functions."""
    model, tok = load_source(args)
    if tok is None:
        return Loaded(model, None, None, ())
    encode_chat = tok.encode_chat if tok.chat_template else None
    return Loaded(model, tok.encode, tok.decode, tuple(tok.eos_ids), encode_chat)


def check_defaults(args: argparse.Namespace) -> None:
    """Exit 2 naming the flag and value if a command-line request default fails the requests' own field check."""
    from serve.request_checks import field_problem
    from serve.stop_strings import stop_strings_problem

    for name in ("max_new_tokens", "temperature", "top_k", "top_p", "seed"):
        value = getattr(args, name)
        problem = field_problem(name, value) if value is not None else None
        if problem:
            fail(f"--{name.replace('_', '-')}: {problem}")
    problem = stop_strings_problem(args.stop) if args.stop else None
    if problem:
        fail(f"--stop: {problem}")
    if sum(bool(x) for x in (args.prompt, args.prompts, args.chat)) > 1:
        fail("give one of --prompt, --prompts and --chat")


def serving_config(args: argparse.Namespace):
    """The ServeConfig of the command line (exit 2 naming a bad --set field or value)."""
    from scripts.serve_flags import serve_config, split_overrides

    try:
        overrides = split_overrides(args.overrides)["serve"]
        implied = ([f"serve.seed={args.seed}"] if args.seed is not None else []) + \
                  (["serve.prefix_caching=false"] if args.no_prefix_caching else [])
        return serve_config(args, implied + overrides)
    except ValueError as e:
        fail(str(e))


def fit_to_context(items: list, default: int | None, max_seq_len: int) -> tuple[list, list[str | None]]:
    """Give every request without its own max_new_tokens (None) the command line's, or all the room its prompt
    leaves in the context if none was given; a command-line value that would overflow the context is clamped to
    the room, with a warning for that request's result. A request that gave its own value keeps it (the engine
    refuses it if it overflows). Returns the items and each one's warning (or None)."""
    from serve.engine import Request
    from serve.request import rejected
    from serve.request_checks import RequestError

    fitted, warnings = [], []
    for item in items:
        warning = None
        if isinstance(item, Request) and item.max_new_tokens is None:
            n, rid = len(item.prompt_ids), item.request_id
            room = max_seq_len - n
            if room < 1 and n:
                item = rejected(RequestError(f"request {rid!r}: the prompt ({n} tokens) fills the model's context "
                                             f"of {max_seq_len}: no room for a new token", rid))
            elif default is not None and default > room:
                warning = (f"max_new_tokens clamped from {default} to {room}: prompt ({n} tokens) + {default} would "
                           f"exceed the model's context of {max_seq_len}")
                item = dataclasses.replace(item, max_new_tokens=room)
            else:
                item = dataclasses.replace(item, max_new_tokens=default if default is not None else max(room, 1))
        fitted.append(item)
        warnings.append(warning)
    return fitted, warnings


def command_line_records(args: argparse.Namespace) -> list[tuple[str, dict]] | None:
    """The requests of --prompt or --chat (or the default prompts) as prompts-file records; None with --prompts."""
    if args.prompts:
        return None
    if args.chat:
        return [(f"--chat {i}", {"messages": [{"role": "user", "content": text}]}) for i, text in enumerate(args.chat)]
    return [(f"--prompt {i}", {"prompt": text}) for i, text in enumerate(args.prompt or DEFAULT_PROMPTS)]


def serve_with_stop_strings(engine, requests: list, stops: list[tuple[str, ...]],
                            decode: Callable[[list[int]], str] | None, on_token: Callable[[str, int], None] | None,
                            on_finish: Callable) -> list:
    """`Engine.generate` for requests all arriving now, except that a request whose text reaches one of its stop
    strings is aborted after the step that showed it (its result is cut at the stop string afterwards)."""
    from serve.request import rejected, report_finished
    from serve.request_checks import RequestError
    from serve.stop_strings import TextStream

    streams: dict[str, TextStream] = {}
    to_abort: list[str] = []

    def token(rid: str, t: int) -> None:
        text = streams.get(rid)
        if text is not None and not text.stopped:
            text.push(t)
            if text.stopped:
                to_abort.append(rid)  # not here: the engine is still handing out this step's tokens
        if on_token:
            on_token(rid, t)

    ids: list[str | None] = []
    results: list = []
    for request, st in zip(requests, stops, strict=True):
        try:
            rid = engine.submit(request, token)
        except RequestError as e:
            results.append(rejected(e, request))
            ids.append(None)
            on_finish(results[-1])
            continue
        if st and decode is not None:
            streams[rid] = TextStream(decode, st, request.prompt_ids)
        ids.append(rid)
        results.append(engine.completions[rid])
    reported: set[int] = set()
    while engine.has_unfinished:
        engine.step()
        while to_abort:
            engine.abort(to_abort.pop())
        report_finished(ids, results, reported, on_finish)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    check_defaults(args)
    serve_cfg = serving_config(args)
    cache_dir = compilation_cache_path(args)
    enable_compilation_cache(cache_dir)
    with CompileClock() as clock:
        return serve_and_report(args, serve_cfg, cache_dir, clock)


def serve_and_report(args: argparse.Namespace, serve_cfg, cache_dir: str | None, clock: CompileClock) -> int:
    """Load, serve, write the results and the summary; the exit code."""
    from serve.engine import Completion, Engine, Request
    from serve.prompts import default_request, read_records, requests_from, result_record
    from serve.static import StaticBatcher
    from serve.stop_strings import truncate_at_stop

    try:
        lines = command_line_records(args) or read_records(args.prompts)  # checked before the model loads
        start = time.perf_counter()
        model, encode, decode, stop, encode_chat = Loaded(*load(args))
        load_s = time.perf_counter() - start
        if encode is None and not args.prompts:
            fail("this model has no tokenizer for --prompt or --chat text; give --prompts with 'prompt_ids'")
        if decode is None and args.stop:
            fail("this model has no tokenizer for --stop strings")
        defaults = default_request(None, args.temperature, args.top_k, args.top_p, None, stop)
        batch = requests_from(lines, defaults, encode, encode_chat)
        stops = [item.stop_strings or (() if "stop" in line else tuple(args.stop or ()))
                 for item, (_, line) in zip(batch, lines, strict=True)]
        items, warnings = fit_to_context([item.request for item in batch], args.max_new_tokens,
                                         model.cfg.max_seq_len)
        before = clock.snapshot()  # what loading compiled is load time
        start = time.perf_counter()
        if args.static:
            server = StaticBatcher(model, batch_size=serve_cfg.max_running, page_size=serve_cfg.page_size,
                                   decode_impl=serve_cfg.decode_impl, seed=serve_cfg.seed)
        else:
            server = Engine(model, serve_cfg, draft_model=load_draft_model(args, model.cfg))
        engine_compile_start = getattr(server, "compile_s", None)
        if args.warmup and not args.static:
            server.warmup()
        setup_s = time.perf_counter() - start
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))

    requests = [item for item in items if isinstance(item, Request)]  # the rest are already error results
    printer = StreamPrinter(items, decode, stops) if args.stream else None
    bar = None if args.stream else tqdm(total=len(items), initial=len(items) - len(requests), desc="generate",
                                        unit="req", dynamic_ncols=True)
    finished: dict[str, Completion] = {}

    def on_finish(c: Completion) -> None:
        finished[c.request_id] = c
        if printer:
            printer.on_finish(c)
        else:
            bar.update(1)

    start = time.perf_counter()
    stopped: BaseException | None = None
    try:
        if args.static:
            served = server.generate(requests, on_finish=on_finish)
        else:
            served_stops = [st for item, st in zip(items, stops, strict=True) if isinstance(item, Request)]
            served = serve_with_stop_strings(server, requests, served_stops, decode,
                                             printer.on_token if printer else None, on_finish)
    except (Exception, KeyboardInterrupt) as e:  # not one request's fault: keep every finished result
        stopped = e
        logging.getLogger(__name__).error("generation stopped", exc_info=e)
        served = [finished.get(r.request_id) or Completion(r.request_id, list(r.prompt_ids), finish_reason="error",
                                                           error=f"not finished: generation stopped ({e!r})")
                  for r in requests]
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()

    answers = iter(served)
    results = [item if isinstance(item, Completion) else next(answers) for item in items]
    records = []
    for c, w, st in zip(results, warnings, stops, strict=True):
        text, matched = truncate_at_stop(decode(c.token_ids), st) if st and c.token_ids else (None, None)
        records.append({**result_record(c, decode, text, "stop" if matched else None), "warning": w})
    if args.out:
        out = Path(args.out)
        partial = out.with_name(out.name + ".partial")
        partial.write_text("".join(json.dumps(record) + "\n" for record in records))
        os.replace(partial, out)  # a reader never sees half a results file
    elif not args.stream:
        for item, record in zip(items, records, strict=True):
            print("=" * 72)
            if isinstance(item, Completion):
                print(f"[error: {record['error']}]")
                continue
            prompt = decode(list(item.prompt_ids)) if decode else str(list(item.prompt_ids))
            print(prompt + (f"[error: {record['error']}]" if record["error"] else record["text"]))
        print("=" * 72)
    for record in records:
        if record["warning"]:
            print(f"warning: request {record['id']!r}: {record['warning']}", file=sys.stderr)
    n_tokens = sum(len(c.token_ids) for c in results)
    errors = sum(c.error is not None for c in results)
    compiled = clock.snapshot()
    engine_compile_s = getattr(server, "compile_s", None)
    if engine_compile_s is not None:  # the engine's own clock (of every engine of this model: the difference)
        engine_compile_s = round(engine_compile_s - (engine_compile_start or 0.0), 3)
    compile_s = compiled["compile_s"] - before["compile_s"]
    firsts = [c.token_times_s[0] for c in results if c.token_times_s]
    age = process_age_s()
    first_token_s = round(age - (time.perf_counter() - min(firsts)), 2) if firsts and age is not None else None
    summary = {"server": "static" if args.static else "engine", "requests": len(results), "errors": errors,
               "output_tokens": n_tokens, "load_s": round(load_s, 3), "setup_s": round(setup_s, 3),
               "compile_s": round(compile_s, 3), "engine_compile_s": engine_compile_s,
               "serve_s": round(seconds, 3), "first_token_s": first_token_s,
               "tokens_per_s": round(n_tokens / seconds, 1) if seconds else None,
               **{k: compiled[k] - before[k] for k in ("compiles", "cache_hits", "cache_misses")},
               "compilation_cache": cache_dir}
    if getattr(server, "cfg", None) is not None and server.cfg.speculative is not None:
        summary["speculation"] = server.speculation.summary()
    since_start = f" (first token {first_token_s:.1f} s after the process started)" if first_token_s else ""
    print(f"{summary['server']}: {len(results)} requests ({errors} errors), {n_tokens} output tokens in "
          f"{seconds:.2f} s = {n_tokens / seconds:.1f} tokens/s{since_start}; load {load_s:.2f} s, "
          f"setup (KV cache{', warm-up' if args.warmup else ''}) {setup_s:.2f} s, "
          f"compile {compile_s:.2f} s ({summary['compiles']} compiles, {summary['cache_hits']} from the "
          f"compilation cache {cache_dir or '(off)'})", file=sys.stderr)
    print("summary: " + json.dumps(summary), file=sys.stderr)
    if stopped is not None:
        done = sum(c.error is None for c in results)
        print(f"error: generation stopped after {done} of {len(results)} requests finished ({stopped!r}); "
              f"{'their results are in ' + args.out if args.out else 'their texts are above'}", file=sys.stderr)
        return 130 if isinstance(stopped, KeyboardInterrupt) else 1
    if errors == len(results):
        print(f"error: every request failed ({errors} of {len(results)})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
