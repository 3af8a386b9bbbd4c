"""Training with a real tokenizer: a byte-level BPE trained on a tiny text round-trips it exactly; the token cache
is keyed by the tokenizer and holds the `tokenizers` library's own ids; bits per byte come from the bytes the
targets stand for (loss / ln 2 for the byte tokenizer; a hand count of decoded bytes for BPE); a BPE run keeps its
tokenizer, resumes exactly with it after the original file is gone, and generate/serve read it back."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from model.presets import get_preset
from scripts.train_tokenizer import main as train_tokenizer_main
from train.config import RunConfig, TrainConfig
from train.data import load_corpus
from train.run_data import EVAL_SEED, RunData, evaluate_run
from train.run_tokenizer import run_tokenizer, separator_id, token_byte_lengths, training_tokenizer
from train.tokenizer import ByteTextTokenizer

TEXT = ("def add(a, b):\n    return a + b\n\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n"
        "        self.y = y\n\n# unicode: café, naïve, 東京, emoji 🙂\n\tindented\t\ttabs  and   spaces\n")


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text")
    for i in range(12):
        (folder / f"f{i}.py").write_text(TEXT.replace("add", f"add{i}") * (i + 1))
    return folder


@pytest.fixture(scope="module")
def bpe_path(corpus_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tok.json"
    assert train_tokenizer_main(["--data", str(corpus_dir), "--vocab-size", "300", "--out", str(out)]) == 0
    return out


def test_trained_bpe_round_trips_text_exactly_and_has_the_asked_size(bpe_path):
    tok = training_tokenizer(str(bpe_path))
    assert tok.vocab_size == 300
    for text in (TEXT, "  leading spaces\r\nwindows line\n", "\x00\x7f binary-ish \u2028 separators", ""):
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids, skip_special_tokens=False) == text
    assert len(tok.encode(TEXT, add_special_tokens=False)) < len(TEXT.encode()) / 1.5  # it learned merges
    assert tok.backend.id_to_token(separator_id(tok)) == "<|endoftext|>"


def test_token_cache_is_keyed_by_the_tokenizer_and_holds_its_ids(corpus_dir, bpe_path, tmp_path):
    tok = training_tokenizer(str(bpe_path))
    by_bytes = load_corpus(corpus_dir, cache_dir=tmp_path, val_fraction=0.2)
    by_bpe = load_corpus(corpus_dir, cache_dir=tmp_path, val_fraction=0.2, tokenizer=tok)
    assert by_bytes.key != by_bpe.key and len(list(tmp_path.iterdir())) == 2
    files = sorted(corpus_dir.iterdir())
    expected = []
    for f in files:
        expected += tok.backend.encode(f.read_text(), add_special_tokens=False).ids + [separator_id(tok)]
    stream = np.concatenate([by_bpe.train, by_bpe.val]).tolist()
    assert sorted(stream) == sorted(expected)  # the same ids, whatever the train/val split of the files
    again = load_corpus(corpus_dir, cache_dir=tmp_path, val_fraction=0.2, tokenizer=training_tokenizer(str(bpe_path)))
    assert again.key == by_bpe.key and len(list(tmp_path.iterdir())) == 2  # reused, not re-tokenized


def _evaluate_with_constant_loss(data: RunData, loss: float) -> tuple[dict, np.ndarray]:
    cfg = RunConfig(model=get_preset("tiny"), train=TrainConfig(seq_len=16, batch_size=4, eval_batches=3))
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    rows = NamedSharding(mesh, PartitionSpec())
    result = evaluate_run(lambda params, batch: np.float32(loss), {}, data, cfg, rows)
    from train.data import windows_at

    targets = np.concatenate([windows_at(data.corpus.val, seed=EVAL_SEED, step=i, batch_size=4, seq_len=16)[:, 1:]
                              for i in range(3)])
    return result, targets


def test_bits_per_byte_is_loss_over_ln2_for_bytes(corpus_dir, tmp_path):
    tok = ByteTextTokenizer()
    data = RunData(tok, load_corpus(corpus_dir, cache_dir=tmp_path, val_fraction=0.2), token_byte_lengths(tok))
    result, _ = _evaluate_with_constant_loss(data, 2.5)
    assert result["val_loss"] == pytest.approx(2.5)
    assert result["val_bpb"] == pytest.approx(2.5 / math.log(2), rel=1e-6)


def test_bits_per_byte_counts_the_bytes_each_bpe_target_decodes_to(corpus_dir, bpe_path, tmp_path):
    tok = training_tokenizer(str(bpe_path))
    data = RunData(tok, load_corpus(corpus_dir, cache_dir=tmp_path, val_fraction=0.2, tokenizer=tok),
                   token_byte_lengths(tok))
    result, targets = _evaluate_with_constant_loss(data, 2.5)
    sep = separator_id(tok)
    # by hand: the UTF-8 bytes of each target decoded on its own (the text's multi-byte characters are whole
    # tokens or split into byte tokens; count those through the byte-level alphabet), the separator as one byte
    raw = {i: tok.backend.decode([i]) for i in set(targets.ravel().tolist())}
    n_bytes = sum(1 if i == sep else len(raw[i].encode("utf-8")) if "\ufffd" not in raw[i] else
                  len(tok.backend.id_to_token(i)) for i in targets.ravel().tolist())
    assert n_bytes > targets.size  # BPE tokens stand for more than one byte each
    assert result["val_bpb"] == pytest.approx(2.5 * targets.size / (math.log(2) * n_bytes), rel=1e-6)


@pytest.mark.slow  # three short training runs
def test_a_bpe_run_keeps_its_tokenizer_for_resume_and_generate(corpus_dir, bpe_path, tmp_path):
    from scripts.model_source import load_tokenizer_of
    from train.loop import TrainingInterrupted, train
    from train.metrics import read_metrics

    tok_file = tmp_path / "tok.json"
    shutil.copy(bpe_path, tok_file)
    model = dataclasses.replace(get_preset("tiny"), dtype="float32", vocab_size=300)
    cfg = RunConfig(model=model, train=TrainConfig(steps=4, batch_size=2, seq_len=32, eval_every=2, eval_batches=1,
                                                   ckpt_every=2, log_every=1, warmup_steps=1,
                                                   data=str(corpus_dir), tokenizer=str(tok_file),
                                                   val_fraction=0.2))
    whole = tmp_path / "whole"
    train(cfg, whole, devices=jax.devices()[:1])
    part = tmp_path / "part"
    polls = iter(range(1, 10))
    with pytest.raises(TrainingInterrupted):  # stopped (and saved) after step 2
        train(cfg, part, devices=jax.devices()[:1], should_stop=lambda: next(polls) >= 2)
    assert json.loads((part / "config.json").read_text())["train"]["tokenizer"] == str(tok_file)
    tok_file.unlink()  # the run's own copy must be what resume reads
    train(cfg, part, devices=jax.devices()[:1])
    losses = [(r["step"], r.get("loss"), r.get("val_bpb")) for r in read_metrics(whole / "metrics.jsonl")]
    resumed = [(r["step"], r.get("loss"), r.get("val_bpb")) for r in read_metrics(part / "metrics.jsonl")]
    assert resumed == losses
    original = training_tokenizer(str(bpe_path))
    for source in (run_tokenizer(part),
                   load_tokenizer_of(argparse.Namespace(tokenizer=None, run=str(part), hf=None, gguf=None))):
        assert source.encode(TEXT, add_special_tokens=False) == original.encode(TEXT, add_special_tokens=False)
        assert source.eos_ids == (separator_id(original),)  # generation stops at the separator


def test_vocab_size_too_small_for_the_tokenizer_names_both_numbers(corpus_dir, bpe_path, tmp_path):
    from train.loop import train

    cfg = RunConfig(model=get_preset("tiny"), train=TrainConfig(steps=1, batch_size=2, seq_len=32,
                                                                data=str(corpus_dir), tokenizer=str(bpe_path)))
    with pytest.raises(ValueError, match=r"model.vocab_size \(259\) is smaller than the tokenizer's 300 ids"):
        train(cfg, tmp_path / "run", devices=jax.devices()[:1])
