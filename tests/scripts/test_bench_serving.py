"""scripts.bench_serving --peer hf on a tiny preset (issue 15): Hugging Face transformers' greedy `generate`, an
independent implementation fed the same weights through save_hf, produces the same tokens as the engine for every
request; each request gets exactly its drawn output length from both; the JSON has both servers' rows and the
comparison line; `--set serve.*` reaches the engine."""

import json

from scripts.bench_serving import main, workload

ARGS = ["--preset", "tiny", "--set", "model.dtype=float32", "--set", "model.init_std=0.3", "--requests", "5",
        "--prompt-median", "6", "--output-median", "5", "--servers", "engine", "--peer", "hf", "--max-running", "2",
        "--no-warmup", "--set", "serve.page_size=8", "--set", "serve.token_budget=32"]


def test_engine_and_hf_agree_and_both_rows_are_reported(tmp_path, capsys):
    tokens = tmp_path / "tokens.jsonl"
    assert main(ARGS + ["--tokens-out", str(tokens)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    header, rows, comparison = lines[0], lines[1:-1], lines[-1]
    assert header["serve"]["page_size"] == 8 and header["serve"]["token_budget"] == 32 and header["load_s"] >= 0
    assert [r["server"] for r in rows] == ["engine", "hf"]
    lengths = [m for _, m in workload(5, 64, 0, 6, 5)]  # the tiny preset's context; --seed 0
    engine, hf = rows
    assert engine["output_tokens"] == hf["output_tokens"] == sum(lengths)
    assert hf["generated_tokens"] >= hf["output_tokens"] and hf["batches"] == 3
    assert engine["errors"] == 0 and engine["compiles_in_timed_run"] == 0
    outputs = {}
    for line in tokens.read_text().splitlines():
        record = json.loads(line)
        outputs.setdefault(record["server"], []).append(record["token_ids"])
    assert [len(t) for t in outputs["engine"]] == lengths
    assert outputs["engine"] == outputs["hf"]
    assert comparison["comparison"] == "engine vs hf" and comparison["same_greedy_tokens"] == "5/5"
    assert comparison["ratio"] == round(engine["tokens_per_s"] / hf["tokens_per_s"], 2)
