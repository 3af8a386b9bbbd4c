"""`scripts.train_draft_head` end to end on a tiny trained run: it trains a head on a text file, logs metrics,
saves a head that `load_draft_head` reads back for that target, and refuses a bad target or argument with exit
code 2 and a message naming it."""

from __future__ import annotations

import json

import pytest

from model.draft_head import load_draft_head
from scripts.train_draft_head import main
from train.loop import load_params


@pytest.mark.slow
def test_trains_and_saves_a_head_for_a_run(trained_tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MESHLM_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n\n" * 60)
    out = tmp_path / "head"
    assert main(["--target", f"run:{trained_tiny_run}", "--corpus", str(corpus), "--steps", "6", "--out", str(out),
                 "--batch-size", "2", "--seq-len", "16", "--log-every", "3", "--eval-batches", "1"]) == 0
    assert "done: step 6" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6, 6] and "val_agree" in records[-1]
    head, meta = load_draft_head(out, load_params(trained_tiny_run)[1].cfg)
    assert meta["target_source"] == f"run:{trained_tiny_run}" and meta["train"]["steps"] == 6
    assert head.cfg.target.d_model == 64


@pytest.mark.parametrize("argv, message", [
    (["--target", "run:/no/such/run", "--out", "x"], "--target 'run:/no/such/run': '/no/such/run' has no config.json"),
    (["--target", "nonsense", "--out", "x"], "--target 'nonsense': expected hf:DIR, gguf:FILE or run:DIR"),
    (["--target", "run:/x", "--out", "x", "--cls-target", "soft"], "invalid choice: 'soft'"),
])
def test_bad_targets_exit_with_code_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
