"""Supervised fine-tuning: the assistant mask against the assistant turns' own tokens, the weighted loss against
numpy on the model's logits (and gradient accumulation against one full batch), and the chat file's packing.

Tolerances: float32 logits against a float64 numpy log-softmax over 259 terms: 1e-5 relative.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from model.gguf import smollm2_path
from model.presets import get_preset
from model.transformer import create_model
from train.config import TrainConfig
from train.optimizer import lr_schedule
from train.run_tokenizer import training_tokenizer
from train.sft import assistant_mask, load_chat_corpus, read_conversations
from train.step import init_train_state, make_train_step, weighted_eval
from train.tokenizer import ByteTextTokenizer

CHAT_FILE = Path(__file__).parents[1] / "data" / "chat_small.jsonl"
CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "2 + 2 = 4."}]


def runs_of_ones(ids: np.ndarray, weights: np.ndarray) -> list[list[int]]:
    runs, current = [], []
    for i, w in zip(ids.tolist(), weights.tolist(), strict=True):
        if w:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return training_tokenizer(f"gguf:{smollm2_path()}")


def test_mask_covers_exactly_the_assistant_turns_and_their_end_of_turn_token(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids, weights = assistant_mask(tok, CONVERSATION)
    assert ids.tolist() == tok.encode_chat(CONVERSATION, add_generation_prompt=False)  # the whole rendering
    im_end = tok.backend.token_to_id("<|im_end|>")
    expected = [tok.encode(m["content"], add_special_tokens=False) + [im_end]
                for m in CONVERSATION if m["role"] == "assistant"]
    assert runs_of_ones(ids, weights) == expected
    assert int(weights.sum()) == sum(len(e) for e in expected)


def test_mask_with_the_byte_tokenizer_covers_the_reply_bytes():
    ids, weights = assistant_mask(ByteTextTokenizer(), CONVERSATION[1:3])
    # the byte template writes "assistant: <content>" and its generation prompt ends at "assistant:"
    assert bytes(runs_of_ones(ids, weights)[0]).decode() == " Hello! How can I help?"


def test_chat_file_is_read_and_packed(smollm2_tokenizer):
    conversations = read_conversations(CHAT_FILE)
    assert len(conversations) >= 30
    corpus = load_chat_corpus(CHAT_FILE, smollm2_tokenizer, val_fraction=0.1)
    ids = np.concatenate([assistant_mask(smollm2_tokenizer, c)[0] for c in conversations])
    assert len(corpus.train) + len(corpus.val) == len(ids)
    assert corpus.train_weights.shape == corpus.train.shape and corpus.val_weights.shape == corpus.val.shape
    assert 0 < corpus.train_weights.mean() < 1


def test_bad_chat_lines_are_named(tmp_path):
    bad = tmp_path / "chat.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": [{"role": "user"}]}\n')
    with pytest.raises(ValueError, match=r"chat.jsonl:2: messages\[0\].content"):
        read_conversations(bad)


CFG = get_preset("tiny").replace(dtype="float32")


def np_token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return -np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def test_weighted_loss_is_the_weighted_mean_of_numpy_token_losses():
    model = create_model(CFG, seed=0)
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (2, 17)).astype(np.int32)
    weights = (rng.random((2, 17)) < 0.4).astype(np.int32)
    loss_sum, weight = weighted_eval(params, graphdef, jnp.asarray(tokens), jnp.asarray(weights))
    nll = np_token_nll(np.asarray(model(jnp.asarray(tokens[:, :-1]))), tokens[:, 1:])
    assert float(weight) == weights[:, 1:].sum()
    np.testing.assert_allclose(float(loss_sum), (nll * weights[:, 1:]).sum(), rtol=1e-5)


@pytest.mark.slow
def test_weighted_step_over_micro_batches_is_the_weighted_mean_of_the_whole_batch():
    """Two micro-batches with very different numbers of assistant tokens: the accumulated step's loss and update
    equal one step over the whole batch (a mean of per-micro-batch means would not)."""
    model = create_model(CFG, seed=0)
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)
    optimizer = optax.sgd(0.1)
    schedule = lr_schedule(TrainConfig(steps=10, warmup_steps=0))
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 256, (4, 17)).astype(np.int32)
    weights = np.zeros((4, 17), np.int32)
    weights[0, 3:] = 1
    weights[3, 15:] = 1
    nll = np_token_nll(np.asarray(model(jnp.asarray(tokens[:, :-1]))), tokens[:, 1:])
    step = make_train_step(graphdef, optimizer, schedule)  # donates the state: each call gets its own copy

    def fresh():
        return init_train_state(jax.tree.map(jnp.copy, params), optimizer)

    whole_state, whole = step(fresh(), (tokens[None], weights[None]))
    split_state, split = step(fresh(), (tokens.reshape(2, 2, 17), weights.reshape(2, 2, 17)))
    expected = (nll * weights[:, 1:]).sum() / weights[:, 1:].sum()
    np.testing.assert_allclose(float(whole["loss"]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(split["loss"]), expected, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(split_state["params"]["embed"]), np.asarray(whole_state["params"]["embed"]),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.slow  # two short training runs
def test_sft_run_on_eight_devices_equals_one_device(tmp_path):
    """The weighted step and evaluation through the sharded loop: the same losses on a data x fsdp x tensor mesh
    of 8 devices as on one (float32; different reduction orders: 1e-5 relative)."""
    import dataclasses

    from parallel.mesh import MeshConfig
    from train.config import RunConfig
    from train.loop import train
    from train.metrics import read_metrics

    cfg = RunConfig(model=CFG, train=TrainConfig(steps=3, batch_size=8, seq_len=64, warmup_steps=1, eval_every=3,
                                                 eval_batches=1, ckpt_every=3, log_every=1, data=str(CHAT_FILE),
                                                 sft=True, val_fraction=0.2))
    records = {}
    for name, mesh, devices in (("one", MeshConfig(data=1), jax.devices()[:1]),
                                ("eight", MeshConfig(data=2, fsdp=2, tensor=2), jax.devices())):
        train(dataclasses.replace(cfg, mesh=mesh), tmp_path / name, devices=devices)
        records[name] = [(r["step"], r.get("loss"), r.get("val_loss"), r.get("val_bpb"))
                         for r in read_metrics(tmp_path / name / "metrics.jsonl")]
    assert [r[0] for r in records["one"]] == [1, 2, 3, 3]
    for a, b in zip(records["one"], records["eight"], strict=True):
        np.testing.assert_allclose([x for x in a if x is not None], [x for x in b if x is not None], rtol=1e-5)
