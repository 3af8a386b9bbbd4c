"""scripts/evaluate.py end to end against independent references: transformers' own `labels=` loss on the same
windows of a tiny random HF llama (with a BPE tokenizer trained here), transformers' log-softmax summed over each
choice's tokens, a model whose logits are set by hand (forced answers), a meshlm run's model run whole by hand,
SmolLM2's GGUF file through transformers' GGUF loader (slow), and the one-line errors.

Tolerances: float32 on both sides (XLA against torch's CPU kernels, different summation orders), through 2 layers
and a 300-way log-softmax: losses agree to ~1e-7 relative, so 1e-5 (the house fp32 tolerance) has headroom while a
shifted target, a wrong window or a dropped token moves the loss by far more. SmolLM2 (30 layers, 49k vocabulary):
1e-4, as the brief asks (its logits agree to ~1e-5 of their scale, tests/model/test_gguf.py)."""

from __future__ import annotations

import json
import math
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from scripts.evaluate import main

DATA = Path(__file__).parents[1] / "data"
TEXT = ("Evaluation reads a text, cuts it into windows and asks the model how likely each token is. " * 3 +
        "Bits per byte make byte and BPE tokenizers comparable: nats over bytes, divided by ln 2. "
        "A caf\u00e9 na\u00efve r\u00e9sum\u00e9 costs more bytes than characters.\n")


def _train_bpe(path: Path, vocab_size: int = 300) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [TEXT] + [line for f in DATA.glob("*.jsonl") for line in f.read_text().splitlines()]
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(path / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """(directory of a tiny random llama saved by transformers with a BPE tokenizer.json, the torch model,
    the `tokenizers` tokenizer)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    directory = tmp_path_factory.mktemp("hf")
    _train_bpe(directory)
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    config = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                      max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
                                      attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))  # a peaked, not uniform, next-token distribution
    model.save_pretrained(directory)
    return directory, model, tok


def _hf_windows_loss(model, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """(summed nats, tokens) by the Hugging Face perplexity guide's loop, with transformers' own `labels=` loss."""
    import torch

    ids_t = torch.tensor([ids])
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        trg_len = end - prev_end
        input_ids = ids_t[:, begin:end]
        labels = input_ids.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=labels).loss.item()
        n = int((labels[:, 1:] != -100).sum())
        nll, count, prev_end = nll + loss * n, count + n, end
        if end == len(ids):
            break
    return nll, count


def _run(capsys, *args: str) -> dict:
    main([*args, "--json"])
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("seq_len,stride", [(16, None), (64, None), (16, 5)])
def test_text_metrics_equal_transformers_on_the_same_windows(hf_dir, tmp_path, capsys, seq_len, stride):
    directory, model, tok = hf_dir
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    ids = tok.encode(TEXT).ids
    assert len(ids) > 64  # several windows even at the model's whole context
    args = ["--hf", str(directory), "--data", str(tmp_path / "text.txt"), "--seq-len", str(seq_len)]
    got = _run(capsys, *args, *(["--stride", str(stride)] if stride else []), "--batch-size", "3")
    nll, count = _hf_windows_loss(model, ids, seq_len, stride or seq_len - 1)
    assert got["tokens"] == count == len(ids) - 1 and got["bytes"] == len(TEXT.encode("utf-8"))
    assert got["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(nll / len(TEXT.encode("utf-8")) / math.log(2), rel=1e-5)


def test_multiple_choice_loglikelihoods_equal_transformers(hf_dir, capsys):
    import torch

    directory, model, tok = hf_dir
    got = _run(capsys, "--hf", str(directory), "--data", str(DATA / "choices_tiny.jsonl"))
    items = [json.loads(line) for line in (DATA / "choices_tiny.jsonl").read_text().splitlines()]
    assert got["items"] == len(items) == len(got["predictions"]) == 3
    correct = 0
    for item, pred in zip(items, got["predictions"], strict=True):
        want = []
        for choice in item["choices"]:
            ctx = tok.encode(item["context"]).ids
            whole = tok.encode(item["context"] + choice).ids
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1).numpy()
            want.append(sum(logp[t - 1, whole[t]] for t in range(len(ctx), len(whole))))
        np.testing.assert_allclose(pred["loglikelihoods"], want, rtol=1e-5)
        assert pred["pred"] == int(np.argmax(want))
        correct += int(np.argmax(want)) == item["answer"]
    assert got["acc"] == pytest.approx(correct / 3)


def test_run_matches_its_model_run_by_hand(trained_tiny_run, tmp_path, capsys):
    """A tiny meshlm run (tests/scripts/conftest.py): evaluate --run against the restored model's log-softmax over
    the whole text (one window: the text is shorter than the context), summed here."""
    import jax.numpy as jnp

    from train.loop import load_params

    text = "def add(a, b):\n    return a + b\n"
    (tmp_path / "t.py").write_text(text)
    got = _run(capsys, "--run", str(trained_tiny_run), "--data", str(tmp_path / "t.py"))
    ids = list(text.encode())  # the byte tokenizer: no BOS
    model = load_params(trained_tiny_run)[1]
    logits = np.asarray(model(jnp.asarray([ids])), np.float64)[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    nll = -sum(logp[t - 1, ids[t]] for t in range(1, len(ids)))
    assert got["seq_len"] == 64 and got["tokens"] == len(ids) - 1 and got["bytes"] == len(ids)
    assert got["loss"] == pytest.approx(nll / (len(ids) - 1), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(nll / len(ids) / math.log(2), rel=1e-5)


def _error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as e:
        main(list(args))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_errors_are_one_line(hf_dir, tmp_path, capsys):
    hf = ["--hf", str(hf_dir[0])]
    assert "no such file, folder or glob match" in _error(capsys, *hf, "--data", str(tmp_path / "none.txt"))
    (tmp_path / "empty.txt").write_text("")
    assert "no text to evaluate" in _error(capsys, *hf, "--data", str(tmp_path / "empty.txt"))
    (tmp_path / "bad.jsonl").write_text('{"context": "a", "choices": ["b", "c"], "answer": 0}\n'
                                        '{"context": "a", "answer": 0}\n')
    assert "bad.jsonl:2: missing key 'choices'" in _error(capsys, *hf, "--data", str(tmp_path / "bad.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"context": "a", "choices": ["b", "c"], "answer": 5}\n')
    assert "bad.jsonl:1: 'answer' must be an index" in _error(capsys, *hf, "--data", str(tmp_path / "bad.jsonl"))
    (tmp_path / "t.txt").write_text(TEXT)
    assert "--seq-len 65 is beyond the model's context of 64" in _error(
        capsys, *hf, "--data", str(tmp_path / "t.txt"), "--seq-len", "65")
    assert "--stride 16 must be at most" in _error(
        capsys, *hf, "--data", str(tmp_path / "t.txt"), "--seq-len", "16", "--stride", "16")


def test_max_tokens_evaluates_a_prefix(hf_dir, tmp_path, capsys):
    directory, model, tok = hf_dir
    (tmp_path / "t.txt").write_text(TEXT)
    got = _run(capsys, "--hf", str(directory), "--data", str(tmp_path / "t.txt"), "--max-tokens", "20")
    ids = tok.encode(TEXT).ids[:20]
    nll, count = _hf_windows_loss(model, ids, 64, 63)
    assert got["tokens"] == count == 19 and got["bytes"] == len(tok.decode(ids).encode("utf-8"))
    assert got["loss"] == pytest.approx(nll / count, rel=1e-5)


PARAGRAPH = ("The Eiffel Tower was completed in 1889 for the World's Fair in Paris. It is made of wrought iron and "
             "was, for forty years, the tallest structure in the world. Today it is one of the most visited "
             "monuments anywhere, and its lights sparkle every evening for five minutes on the hour.")


@pytest.mark.slow
def test_smollm2_gguf_loss_equals_transformers_gguf_loader(tmp_path, capsys):
    """transformers' GGUF loader as tests/model/test_gguf.py drives it (`load_gguf_checkpoint`, what
    `from_pretrained(gguf_file=...)` runs, without the accelerate package that entry point demands)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from model.gguf import smollm2_path
    from tests.model.test_gguf import _transformers_model

    path = smollm2_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = _transformers_model(path)
    ids = torch.tensor([tokenizer(PARAGRAPH)["input_ids"]])
    with torch.no_grad():
        want = model(ids, labels=ids).loss.item()
    (tmp_path / "p.txt").write_text(PARAGRAPH)
    got = _run(capsys, "--gguf", str(path), "--data", str(tmp_path / "p.txt"), "--seq-len", "256")
    assert got["tokens"] == ids.shape[1] - 1
    assert got["loss"] == pytest.approx(want, rel=1e-4)


def _next_byte_model():
    """A bigram model whose logits are set by hand: with every block's weights zero the residual stream is the
    token's embedding, which is one-hot (scaled by 1000 so RMSNorm's eps is negligible), and the LM head gives the
    byte after the current one a logit of 10 and every other token 0."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from model import create_model, get_preset

    vocab, d = 259, 260
    cfg = get_preset("tiny").replace(vocab_size=vocab, d_model=d, n_layers=1, dtype="float32",
                                     tie_embeddings=False)
    model = create_model(cfg)
    blocks = nnx.state(model.blocks, nnx.Param)
    nnx.update(model.blocks, jax.tree.map(jnp.zeros_like, blocks))
    model.embed[...] = jnp.asarray(np.eye(vocab, d) * 1000.0, jnp.float32)
    head = np.zeros((d, vocab), np.float32)
    head[np.arange(vocab - 1), np.arange(1, vocab)] = 10.0 / math.sqrt(d)  # RMSNorm makes the one-hot sqrt(d)
    model.lm_head[...] = jnp.asarray(head)
    return model


def test_multiple_choice_answers_forced_by_a_model_whose_logits_are_set_by_hand(tmp_path, capsys):
    """tests/data/choices_forced.jsonl through `--hf DIR --tokenizer bytes`: each choice's log-likelihood is
    (favoured steps) * log p_next + (others) * log p_other, computed here from the logits alone."""
    from model.hf import save_hf

    save_hf(_next_byte_model(), tmp_path / "bigram")
    got = _run(capsys, "--hf", str(tmp_path / "bigram"), "--tokenizer", "bytes",
               "--data", str(DATA / "choices_forced.jsonl"))
    log_z = math.log(math.exp(10.0) + 258)
    items = [json.loads(line) for line in (DATA / "choices_forced.jsonl").read_text().splitlines()]
    for item, pred in zip(items, got["predictions"], strict=True):
        want = []
        for choice in item["choices"]:
            text = item["context"] + choice
            want.append(sum((10.0 if ord(b) == ord(a) + 1 else 0.0) - log_z for a, b in pairwise(text)))
        # float32 log-softmax over logits of 10: ~1e-6 absolute per token (a favoured step's is only -0.0117)
        np.testing.assert_allclose(pred["loglikelihoods"], want, rtol=1e-5, atol=1e-5)
        assert pred["pred"] == pred["pred_norm"] == item["answer"]
    assert got["acc"] == got["acc_norm"] == 1.0
