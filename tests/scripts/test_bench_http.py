"""scripts/bench_http.py on a tiny random model: both sides serve every request's tokens, the figures are there,
and the ratio line is printed. Slow (about 60 s on the 2-core CPU: a server start and every step shape compiled
on both sides)."""

import json

import pytest

from scripts.bench_http import main

ARGS = ["--preset", "tiny", "--requests", "6", "--prompt-median", "8", "--output-median", "8", "--decode-impl",
        "reference", "--set", "serve.max_running=2", "--set", "serve.token_budget=32", "--set", "serve.prefill_tile=32"]


@pytest.mark.slow
def test_http_and_in_process_figures(capsys):
    assert main(ARGS + ["--concurrency", "2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    http, local, ratio = rows
    assert (http["side"], local["side"]) == ("http", "in_process")
    assert http["output_tokens"] == local["output_tokens"] > 0 and http["requests"] == local["requests"] == 6
    assert all(http[k]["p50"] is not None for k in ("ttft_ms", "e2e_ms")) and local["itl_ms"]["p90"] is not None
    assert ratio["http_over_in_process"] > 0 and ratio["load"] == "concurrency 2"
