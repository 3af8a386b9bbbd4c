"""scripts/serve.py's command line: a bad engine setting or flag exits 2 naming it before anything loads; a model
that cannot be loaded exits 1 naming why; and (slow) the real SmolLM2-135M-Instruct GGUF answers a chat through
the openai client."""

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from parallel.launch import free_port
from scripts.serve import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("argv, message", [
    (["--hf", "x", "--set", "serve.bogus=1"], "serve.bogus"),
    (["--hf", "x", "--set", "serve.page_size=0"], "page_size"),
    (["--hf", "x", "--max-waiting", "0"], "--max-waiting"),
])
def test_bad_settings_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_a_model_that_does_not_load_exits_1(tmp_path):
    port = free_port()
    r = subprocess.run([sys.executable, "-m", "scripts.serve", "--hf", str(tmp_path / "missing"), "--port",
                        str(port)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 1 and "missing" in r.stderr


@pytest.mark.slow
def test_smollm2_gguf_answers_a_chat(tmp_path):
    import openai

    from model import gguf
    port = free_port()
    log = tmp_path / "server.log"
    proc = subprocess.Popen([sys.executable, "-m", "scripts.serve", "--gguf", str(gguf.smollm2_path()), "--port",
                             str(port), "--set", "serve.max_running=2", "--set", "serve.memory_bytes=100000000"],
                            cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        r = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=12, temperature=0,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert r.choices[0].message.content.strip() and r.choices[0].finish_reason in ("stop", "length")
        assert "Paris" in r.choices[0].message.content
    finally:
        proc.kill()
        proc.wait(30)
