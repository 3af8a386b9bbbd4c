"""JAX's persistent compilation cache in scripts.generate (issue 15): a first process writes its compiled steps into
the cache folder it is given, and a second process with the same folder reads them back instead of compiling (JAX's
own cache-hit and cache-miss events, counted in the summary line; no timing is asserted), with the same tokens:
two child processes on a tiny model written as an HF checkpoint. And where the folder is, flag by flag."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.hf import save_hf
from model.presets import get_preset
from model.transformer import create_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    save_hf(create_model(dataclasses.replace(get_preset("tiny"), dtype="float32", init_std=0.1), seed=3), folder)
    (folder / "p.jsonl").write_text(json.dumps({"prompt_ids": [1, 2, 3], "max_new_tokens": 3}) + "\n")
    return folder


def generate(hf_dir, out, *flags):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    result = subprocess.run([sys.executable, "-m", "scripts.generate", "--hf", str(hf_dir), "--prompts",
                             str(hf_dir / "p.jsonl"), "--out", str(out), "--temperature", "0", *flags],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = [line for line in result.stderr.splitlines() if line.startswith("summary: ")]
    return json.loads(summary[0].removeprefix("summary: ")), json.loads(out.read_text())


@pytest.mark.slow
def test_a_second_run_reads_the_first_runs_compiled_steps(hf_dir, tmp_path):
    cache = tmp_path / "cache"
    first, first_result = generate(hf_dir, tmp_path / "1.jsonl", "--compilation-cache", str(cache))
    assert first["compilation_cache"] == str(cache)
    assert first["cache_hits"] == 0 and first["cache_misses"] >= 1
    written = {p.name for p in cache.iterdir()}
    assert len(written) >= first["cache_misses"]  # every compiled step (small ones too) was kept
    second, second_result = generate(hf_dir, tmp_path / "2.jsonl", "--compilation-cache", str(cache))
    assert second["cache_misses"] == 0 and second["cache_hits"] == first["cache_misses"]
    assert {p.name for p in cache.iterdir()} == written  # nothing new to write
    assert second_result["token_ids"] == first_result["token_ids"] and len(first_result["token_ids"]) == 3


@pytest.mark.parametrize("argv, env, expected", [
    ([], None, "~/.cache/meshlm/jax"),
    ([], "/tmp/from-env", "/tmp/from-env"),
    (["--compilation-cache", "/tmp/from-flag"], "/tmp/from-env", "/tmp/from-flag"),
    (["--no-compilation-cache"], "/tmp/from-env", None),
    (["--no-compilation-cache", "--compilation-cache", "/tmp/x"], None, None),
])
def test_where_the_cache_is(argv, env, expected, monkeypatch):
    """The flag beats $MESHLM_COMPILATION_CACHE, which beats ~/.cache/meshlm/jax; --no-compilation-cache beats all."""
    import argparse

    from scripts.common import add_compilation_cache_args, compilation_cache_path

    if env is None:
        monkeypatch.delenv("MESHLM_COMPILATION_CACHE", raising=False)
    else:
        monkeypatch.setenv("MESHLM_COMPILATION_CACHE", env)
    p = argparse.ArgumentParser()
    add_compilation_cache_args(p)
    path = compilation_cache_path(p.parse_args(argv))
    assert path == (None if expected is None else os.path.expanduser(expected))
