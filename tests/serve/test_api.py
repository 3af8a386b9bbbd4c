"""The OpenAI-compatible server (scripts/serve.py) as a subprocess on 127.0.0.1, driven by the official `openai`
client: streamed text equals the whole response's, one finish_reason per choice, seeded n=3 is reproducible, stop
strings (split across tokens) end the text before them, logprobs within their limit, every bad request its 4xx
while /health stays 200, 401 without the API key, 503 with Retry-After when the queue is full, a disconnect frees
its pages, 64 concurrent streams get exactly the offline engine's tokens with no page left allocated, and SIGTERM
drains (the last test: it ends the server). One server for the module: its start and compiles dominate the time."""

import asyncio
import dataclasses
import functools
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from model.presets import get_preset
from parallel.launch import free_port

CFG = dataclasses.replace(get_preset("tiny"), dtype="float32", max_seq_len=128, init_std=0.1)
SERVE_ARGS = ["--decode-impl", "reference", "--set", "serve.page_size=8", "--set", "serve.max_running=4",
              "--set", "serve.token_budget=32", "--set", "serve.prefill_tile=32",
              "--set", "serve.min_context_bucket=128"]
ROOT = Path(__file__).resolve().parents[2]
KEY = "sesame"


def serve_config():
    from serve.engine import ServeConfig

    return ServeConfig(page_size=8, max_running=4, token_budget=32, prefill_tile=32, min_context_bucket=128,
                       decode_impl="reference")


@functools.cache
def model_dir(root: str) -> Path:
    """A tiny random model as a Hugging Face directory (served with the byte tokenizer)."""
    from model.hf import save_hf
    from model.transformer import create_model

    path = Path(root) / "tiny"
    if not (path / "config.json").exists():
        save_hf(create_model(CFG, seed=0), path)
    return path


class Server:
    """scripts.serve in a subprocess; `url` once /health is 200."""

    def __init__(self, tmp: Path, *extra: str, env: dict | None = None, api_key: str = "none"):
        self.api_key = api_key
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"server-{self.port}.log"
        cache = tmp.parent / "jax-cache"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "scripts.serve", "--hf", str(model_dir(str(tmp.parent))), "--tokenizer", "bytes",
             "--port", str(self.port), "--model-name", "tiny", "--compilation-cache", str(cache), *SERVE_ARGS,
             *extra], cwd=ROOT, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
            env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                if self.healthy():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the server did not become healthy:\n{self.log.read_text()[-3000:]}")

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", self.api_key), max_retries=0, **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        return httpx.post(self.url + path, headers={"Authorization": f"Bearer {self.api_key}"}, **kw)

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics").text
        return float(re.search(rf"^{name} (\S+)$", text, re.MULTILINE).group(1))

    def healthy(self) -> bool:
        return httpx.get(self.url + "/health", timeout=5).status_code == 200

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve"), "--max-body-bytes", "65536", "--max-waiting", "64",
               "--drain-timeout", "0", env={"MESHLM_API_KEY": KEY}, api_key=KEY)
    yield s
    s.stop()


def test_models_tokenize_detokenize(server):
    assert [m.id for m in server.client().models.list().data] == ["tiny"]
    tokens = server.post("/tokenize", json={"prompt": "héllo"}).json()["tokens"]
    assert tokens == list("héllo".encode())
    assert server.post("/detokenize", json={"tokens": tokens}).json() == {"prompt": "héllo"}


def test_streamed_chunks_join_to_the_whole_text(server):
    client = server.client()
    for kw in ({"temperature": 0}, {"temperature": 1.0, "top_p": 0.9, "seed": 11, "extra_body": {"ignore_eos": True}}):
        whole = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=24, **kw)
        chunks = list(client.completions.create(model="tiny", prompt="def f(x):", max_tokens=24, stream=True,
                                                stream_options={"include_usage": True}, **kw))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
               [whole.choices[0].finish_reason] == ["length"]
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 24
        assert whole.usage.prompt_tokens == len("def f(x):")

    chat = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=16, temperature=0)
    whole = client.chat.completions.create(**chat)
    chunks = list(client.chat.completions.create(**chat, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert sum(c.choices[0].finish_reason is not None for c in chunks) == 1


def test_n3_with_a_seed_is_reproducible(server):
    client = server.client()
    kw = dict(model="tiny", prompt="x", max_tokens=12, n=3, temperature=1.0, seed=5, extra_body={"ignore_eos": True})
    runs = [client.completions.create(**kw) for _ in range(2)]
    texts = [[c.text for c in sorted(r.choices, key=lambda c: c.index)] for r in runs]
    assert texts[0] == texts[1] and len(set(texts[0])) == 3
    assert [c.finish_reason for c in runs[0].choices] == ["length"] * 3
    assert runs[0].usage.completion_tokens == 36
    streamed = list(client.completions.create(**kw, stream=True))
    for i in range(3):
        assert "".join(c.choices[0].text for c in streamed if c.choices[0].index == i) == texts[0][i]
        assert sum(c.choices[0].finish_reason is not None for c in streamed if c.choices[0].index == i) == 1


def test_stop_strings_end_the_text_before_them(server):
    client = server.client()
    full = client.completions.create(model="tiny", prompt="abc", max_tokens=40, temperature=0).choices[0].text
    stop = full[10:13]  # three characters: three byte tokens, split across tokens and stream chunks
    want = full[:full.index(stop)]
    whole = client.completions.create(model="tiny", prompt="abc", max_tokens=40, temperature=0,
                                      stop=["never-there", stop])
    assert (whole.choices[0].text, whole.choices[0].finish_reason) == (want, "stop")
    chunks = list(client.completions.create(model="tiny", prompt="abc", max_tokens=40, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]


def test_logprobs(server):
    client = server.client()
    r = client.completions.create(model="tiny", prompt="abc", max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(len(top) <= 3 and lp.token_logprobs[i] == pytest.approx(max(top.values()))
               for i, top in enumerate(lp.top_logprobs))  # greedy: the sampled token is the most likely
    c = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=20)
    assert [len(t.top_logprobs) for t in c.choices[0].logprobs.content] == [20] * 4
    for bad in ({"logprobs": True, "top_logprobs": 21}, {"top_logprobs": 2}):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a"}], **bad)
        assert info.value.body["param"] == "top_logprobs"
    assert server.healthy()


BAD = [  # (endpoint, body, status, param)
    ("completions", {"prompt": "a", "temperature": -1}, 400, "temperature"),
    ("completions", {"prompt": "a", "top_p": 0}, 400, "top_p"),
    ("completions", {"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"prompt": "a", "max_tokens": 500}, 400, "max_tokens"),
    ("completions", {"prompt": "a" * 200}, 400, "prompt"),
    ("completions", {"prompt": [1, 100000]}, 400, "prompt"),
    ("completions", {"prompt": "a", "n": 0}, 400, "n"),
    ("completions", {"prompt": "a", "logprobs": 21}, 400, "logprobs"),
    ("completions", {"prompt": "a", "seed": -3}, 400, "seed"),
    ("completions", {"prompt": "a", "stop": [1]}, 400, "stop"),
    ("completions", {"prompt": "a", "stop_token_ids": [9999]}, 400, "stop_token_ids"),
    ("completions", {"prompt": "a", "model": "gpt-4"}, 400, "model"),
    ("completions", {"prompt": "a", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("completions", {}, 400, "prompt"),
    ("chat/completions", {"messages": []}, 400, "messages"),
    ("chat/completions", {"messages": [{"content": "x"}]}, 400, "messages[0]"),
    ("chat/completions", {"messages": [{"role": "user", "content": "a"}], "max_completion_tokens": 1.5}, 400,
     "max_completion_tokens"),
]


@pytest.mark.parametrize("endpoint, body, status, param", BAD, ids=[f"{b[0]}-{b[3]}" for b in BAD])
def test_bad_request_gets_its_4xx_and_the_server_keeps_serving(server, endpoint, body, status, param):
    r = server.post(f"/v1/{endpoint}", json={"model": "tiny", **body})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"
    assert server.healthy()


def test_oversized_body_bad_json_and_unknown_route(server):
    r = server.post("/v1/completions", json={"prompt": "a" * 70000})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    r = server.post("/v1/completions", content=b"{not json")
    assert r.status_code == 400 and "not JSON" in r.json()["error"]["message"]
    assert server.post("/v1/nothing").status_code == 404
    assert server.healthy()
    r = server.client().completions.create(model="tiny", prompt="still here", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2


def test_a_disconnect_frees_the_pages(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json={"prompt": "abc", "max_tokens": 120, "stream": True,
                                                            "n": 16, "ignore_eos": True}) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i == 2:
                    assert server.metric("meshlm_kv_cache_pages_used") > 0
                    break
        with pytest.raises(httpx.ReadTimeout):  # the same for a whole (non-streamed) response: 16 x 120 tokens
            client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 120, "n": 16, "ignore_eos": True},
                        timeout=0.3)
    deadline = time.monotonic() + 10
    while server.metric("meshlm_kv_cache_pages_used") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("meshlm_kv_cache_pages_used") == 0
    assert server.metric('meshlm_request_success_total{finished_reason="abort"}') >= 2


def test_64_concurrent_streams_get_the_offline_engines_tokens(server, tmp_path_factory):
    from model.hf import load_hf
    from scripts.common import enable_compilation_cache
    from serve.engine import Engine, Request
    from train.tokenizer import ByteTextTokenizer

    prompts = [f"{i} " + "xyz"[i % 3] * (i % 11) for i in range(64)]
    max_tokens = [8 + (i * 7) % 40 for i in range(64)]

    async def one(client, prompt, n):
        text, reasons = "", []
        async for chunk in await client.completions.create(model="tiny", prompt=prompt, max_tokens=n, stream=True,
                                                           temperature=0, extra_body={"ignore_eos": True}):
            text += chunk.choices[0].text
            reasons += [chunk.choices[0].finish_reason] if chunk.choices[0].finish_reason else []
        return text, reasons

    async def all_of_them():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=600)
        return await asyncio.gather(*(one(client, p, n) for p, n in zip(prompts, max_tokens, strict=True)))

    served = asyncio.run(all_of_them())
    enable_compilation_cache(tmp_path_factory.getbasetemp() / "jax-cache")
    tok = ByteTextTokenizer()
    engine = Engine(load_hf(model_dir(str(tmp_path_factory.getbasetemp()))), serve_config())
    offline = engine.generate([Request(tuple(tok.encode(p)), n) for p, n in zip(prompts, max_tokens, strict=True)])
    assert [text for text, _ in served] == [tok.decode(c.token_ids) for c in offline]
    assert all(reasons == ["length"] for _, reasons in served)
    assert server.metric("meshlm_kv_cache_pages_used") == 0
    assert server.metric("meshlm_num_requests_running") == server.metric("meshlm_num_requests_waiting") == 0


def test_401_without_the_key(server):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "a"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError) as info:
        server.client(api_key="wrong").models.list()
    assert info.value.status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200
    assert server.client().completions.create(model="tiny", prompt="a", max_tokens=2).usage.completion_tokens == 2


def test_a_full_queue_gets_503_with_retry_after(server):
    async def one(client):
        # 4 choices a request: 17 requests fill the 64 places before 4 running sequences finish, however slowly
        # a loaded machine sends them
        r = await client.post("/v1/completions", json={"prompt": "q", "max_tokens": 10, "temperature": 0,
                                                       "ignore_eos": True, "n": 4})
        return r.status_code, r.headers.get("retry-after"), r.json()

    async def many():
        async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"},
                                     timeout=300) as client:
            return await asyncio.gather(*(one(client) for _ in range(100)))

    results = asyncio.run(many())
    busy = [r for r in results if r[0] == 503]
    assert busy and all(r[1] == "1" and r[2]["error"]["code"] == "queue_full" for r in busy)
    assert {r[0] for r in results} == {200, 503}
    assert httpx.get(server.url + "/health").status_code == 200


def test_sigterm_drains_then_exits(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json={"prompt": "abc", "max_tokens": 120, "stream": True,
                                                            "ignore_eos": True, "temperature": 0}) as r:
            lines = []
            for line in r.iter_lines():
                if len(lines) == 2:
                    server.proc.send_signal(signal.SIGTERM)
                lines.append(line)
    reasons = [line for line in lines if '"finish_reason": "' in line]
    assert len(reasons) == 1 and ('"abort"' in reasons[0] or '"length"' in reasons[0]) and lines[-2:] == \
        ["data: [DONE]", ""]
    deadline = time.monotonic() + 30
    while server.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.proc.returncode == 0
