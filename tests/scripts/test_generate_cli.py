"""scripts/generate.py on a freshly trained tiny run: a JSONL batch with per-request settings and a bad request
gives one result line per request in order (the bad one with its error); greedy results are the same through the
engine and through static batching, and equal the naive decoder's."""

import dataclasses
import json

import jax
import pytest

from model.presets import get_preset
from parallel.mesh import MeshConfig
from scripts.generate import main
from serve.naive import generate
from train.config import RunConfig, TrainConfig
from train.loop import load_params, train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = RunConfig(model=dataclasses.replace(get_preset("tiny"), dtype="float32"),
                    train=TrainConfig(steps=2, batch_size=2, seq_len=32, eval_every=2, eval_batches=1, ckpt_every=2),
                    mesh=MeshConfig(data=1))
    train(cfg, out, devices=jax.devices()[:1])
    return out


def test_jsonl_batch_through_engine_and_static(run_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "def f(", "max_new_tokens": 6, "temperature": 0, "id": "a"},
        {"prompt_ids": [1, 2, 3], "max_new_tokens": 4, "temperature": 0},
        {"prompt_ids": [1, 999], "max_new_tokens": 4, "id": "bad"},
        {"prompt": "x = ", "max_new_tokens": 5, "temperature": 0.9, "top_k": 20, "seed": 3},
    ]) + "\n")
    results = {}
    for mode in ("engine", "static"):
        out = tmp_path / f"{mode}.jsonl"
        args = ["--run", str(run_dir), "--prompts", str(prompts), "--out", str(out), "--decode-impl", "reference"]
        assert main(args + (["--static"] if mode == "static" else [])) == 0
        results[mode] = [json.loads(line) for line in out.read_text().splitlines()]
    engine, static = results["engine"], results["static"]
    assert [r["id"] for r in engine][:1] == ["a"] and len(engine) == 4
    assert engine[2]["finish_reason"] == "error" and "token id 999 is outside the vocabulary" in engine[2]["error"]
    assert [r["token_ids"] for r in engine[:2]] == [r["token_ids"] for r in static[:2]]
    assert engine[3]["token_ids"] == static[3]["token_ids"]  # seeded sampling: same stream in both servers
    _, model = load_params(run_dir)
    assert engine[1]["token_ids"] == generate(model, [[1, 2, 3]], 4)[0]
    assert {"id", "text", "token_ids", "finish_reason", "error", "ttft_s", "tokens_per_s",
            "cached_tokens"} <= set(engine[0])


def test_bad_prompts_file_line_is_named(run_dir, tmp_path, capsys):
    """A line that is not a JSON object is no request at all: the file is refused before anything runs. (A JSON
    object with bad fields is a request with an error result of its own: tests/scripts/test_generate_faults.py.)"""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "ok"}\n["a", 1]\n')
    with pytest.raises(SystemExit) as info:
        main(["--run", str(run_dir), "--prompts", str(prompts)])
    assert info.value.code == 2 and f"{prompts}:2: expected a JSON object" in capsys.readouterr().err
