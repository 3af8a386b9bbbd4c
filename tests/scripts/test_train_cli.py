"""scripts/train.py's argument handling: bad keys and values exit with code 2 and a message naming them."""

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.subprocesses import child_env, run_module, tail


def run(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return run_module("scripts.train", "--out", str(tmp_path / "run"), *args, env=child_env(JAX_PLATFORMS="cpu"))


@pytest.mark.parametrize("args, message", [
    (["--set", "train.foo=1"], "unknown key 'train.foo'"),
    (["--set", "optim.lr=1"], "unknown section 'optim'"),
    (["--set", "train.lr=fast"], "train.lr=fast: expected a value of type float"),
    (["--set", "model.n_kv_heads=3"], r"model.n_heads \(4\) must be a multiple of model.n_kv_heads \(3\)"),
    (["--set", "train.seq_len=4096"], r"train.seq_len \(4096\) exceeds model.max_seq_len \(64\)"),
    (["--set", "nonsense"], "expected section.field=value"),
    (["--set", "model.moe.experts=4"], r"unknown key 'model.moe.experts'; model.moe keys are \['aux_loss_weight'"),
    (["--set", "model.moe.n_experts=4", "--set", "model.moe.top_k=5"],
     r"model.moe.top_k must be between 1 and model.moe.n_experts \(4\), got 5"),
    (["--preset", "huge"], "unknown preset 'huge'"),
    # Bad layouts fail before anything compiles (the tests run with 8 fake CPU devices), naming the numbers.
    (["--mesh", "data=3"], r"mesh axes multiply to 3 \(data=3\) but there are 8 devices"),
    (["--mesh", "data=2,tensor=4"], r"model.n_kv_heads \(2\) must be divisible by mesh.tensor \(4\)"),
    (["--mesh", "fsdp=8", "--set", "train.batch_size=4"], r"micro-step \(4 sequences.*\(8\)"),
    (["--mesh", "data=2,pipe=4"], "unknown axis 'pipe'"),
    (["--coordinator", "localhost:1234"], r"\['coordinator'\] given but \['num_processes', 'process_id'\] missing"),
])
def test_bad_settings_exit_2_naming_the_problem(args, message, tmp_path):
    result = run("--preset", "tiny", *args, tmp_path=tmp_path)
    assert result.returncode == 2, tail(result.stderr)
    assert re.search(message, result.stderr), tail(result.stderr)
    assert not (tmp_path / "run").exists()  # nothing written for a run that never started


def test_missing_data_path_exits_2(tmp_path):
    result = run("--preset", "tiny", "--steps", "1", "--data", str(tmp_path / "nope"), tmp_path=tmp_path)
    assert result.returncode == 2, tail(result.stderr)
    assert "no text files found for --data" in result.stderr and "nope" in result.stderr


@pytest.mark.slow  # a whole run in child processes: make test-slow (CI runs it)
def test_an_moe_model_trains_and_logs_its_router_loss(tmp_path):
    result = run("--preset", "tiny", "--steps", "2", "--set", "model.moe.n_experts=4", "--set", "train.log_every=1",
                 "--set", "train.eval_batches=1", tmp_path=tmp_path)
    assert result.returncode == 0, tail(result.stderr)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["router_loss"] > 0 for r in records if "loss" in r] == [True, True]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["moe"]["n_experts"] == 4
