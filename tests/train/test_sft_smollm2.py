"""A short SFT of the reference model, SmolLM2-135M-Instruct (`--init gguf:...`), on tests/data/chat_small.jsonl
with the train CLI's config, on one CPU device: the assistant-token loss of the whole file goes down. The masked loss is
checked first against transformers' own GGUF loading on the same tokens, with labels -100 off the mask.

Tolerance: float32 on both sides (the Q4_1 weights dequantized by the same gguf-py code), 135M parameters and
different matmul orders: 1e-4 relative on a mean over ~100 tokens."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from model.gguf import smollm2_path
from parallel.mesh import MeshConfig
from train.run_tokenizer import training_tokenizer
from train.sft import assistant_mask, read_conversations
from train.sharded import plan_mesh
from train.step import weighted_eval

CHAT_FILE = Path(__file__).parents[1] / "data" / "chat_small.jsonl"
WINDOW = 512


def file_stream(tokenizer) -> tuple[np.ndarray, np.ndarray]:
    pairs = [assistant_mask(tokenizer, c) for c in read_conversations(CHAT_FILE)]
    return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])


def masked_loss(params, graphdef, ids: np.ndarray, weights: np.ndarray) -> float:
    """The assistant-token loss of the whole stream, in consecutive windows of WINDOW + 1 tokens."""
    step = jax.jit(lambda p, t, w: weighted_eval(p, graphdef, t, w))
    total = count = 0.0
    for start in range(0, len(ids) - 1, WINDOW):
        t, w = ids[start:start + WINDOW + 1], weights[start:start + WINDOW + 1]
        loss_sum, n = step(params, jnp.asarray(t[None], jnp.int32), jnp.asarray(w[None], jnp.int32))
        total, count = total + float(loss_sum), count + float(n)
    return total / count


@pytest.mark.slow
def test_sft_of_smollm2_lowers_the_assistant_loss_of_the_chat_file(tmp_path):
    import torch
    import transformers

    from scripts.train import build_config, parse_args
    from train.loop import load_params, train
    from train.run_data import initial_state

    path = smollm2_path()
    argv = ["--init", f"gguf:{path}", "--sft", str(CHAT_FILE), "--steps", "6", "--out", str(tmp_path / "sft"),
            "--set", "train.batch_size=2", "--set", "train.seq_len=128", "--set", "train.lr=1e-4",
            "--set", "train.warmup_steps=1", "--set", "train.eval_every=6", "--set", "train.eval_batches=1",
            "--set", "train.ckpt_every=6", "--set", "model.dtype=float32", "--set", "train.val_fraction=0.2"]
    cfg = build_config(parse_args(argv))
    tokenizer = training_tokenizer(cfg.train.tokenizer)
    ids, weights = file_stream(tokenizer)
    optimizer = optax.adamw(1e-4)
    plan = plan_mesh(cfg.model, MeshConfig(data=1), optimizer, micro_batch=1, seq_len=WINDOW,
                     devices=jax.devices()[:1])
    params = initial_state(plan, optimizer, cfg)["params"]

    # the masked loss against transformers on the first window
    t, w = ids[:WINDOW + 1], weights[:WINDOW + 1]
    ours = masked_loss(params, plan.graphdef, t, w)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    labels = torch.from_numpy(np.where(w > 0, t, -100).astype(np.int64))
    with torch.no_grad():
        reference = float(hf(torch.from_numpy(t.astype(np.int64))[None], labels=labels[None]).loss)
    del hf
    np.testing.assert_allclose(ours, reference, rtol=1e-4)

    before = masked_loss(params, plan.graphdef, ids, weights)
    del params
    train(cfg, tmp_path / "sft", devices=jax.devices()[:1])
    _, model = load_params(tmp_path / "sft")
    from flax import nnx

    graphdef, trained = nnx.split(model)
    after = masked_loss(nnx.to_pure_dict(trained), graphdef, ids, weights)
    assert after < before - 0.05, (before, after)
