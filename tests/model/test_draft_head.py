"""The EAGLE-style draft head (model/draft_head.py) and its training (train/draft_head.py), on tiny random targets.

Drafting (a scan over fixed buffers, one pair written per step at a traced index) is checked against the training
form run on the growing sequence in a Python loop, the head's own features and drafted tokens appended by hand;
float32 throughout, so the two agree to rounding (1e-5). Training is checked by what it must achieve, not by its
code: on a repetitive text the loss falls and the head's token agrees with the target's greedy token far more
often than the target's most frequent token would.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.draft_head import create_draft_head, draft_forward, draft_tokens, load_draft_head, save_draft_head
from model.presets import get_preset
from model.transformer import create_model
from train.draft_head import DraftTrainConfig, fit_draft_head, greedy_acceptance

# A random target with larger weights than an initialised model's: distinct features and peaked next-token
# distributions, and an untied LM head, so its greedy token is not simply a copy of the last token.
TARGET = get_preset("tiny").replace(dtype="float32", tie_embeddings=False, init_std=0.2)


# Jitted once each (modules are pytrees): eager calls compile op by op, slowly on a loaded 2-core machine.
hidden = jax.jit(lambda model, tokens_BxT: model.hidden(tokens_BxT))
logits = jax.jit(lambda model, tokens_BxT: model(tokens_BxT))
batch_form = jax.jit(draft_forward)


@pytest.fixture(scope="module")
def target():
    return create_model(TARGET, seed=3)


@jax.jit
def reference_drafts(head, target, features_TxD, tokens_T1, drafted_Nd):
    """The head's logits at each drafting step by the training form on the whole sequence so far: pairs
    (f_i, x_{i+1}) for the given positions, then (g, drafted token) for each drafted one (a Python loop, the
    sequence growing by one pair a step)."""
    feats, nexts, logits = features_TxD, tokens_T1[1:], []
    for j in range(drafted_Nd.shape[0]):
        g_1xTxD, logits_1xTxV = draft_forward(head, target, feats[None], nexts[None])
        logits.append(logits_1xTxV[0, -1])
        feats = jnp.concatenate([feats, g_1xTxD[0, -1:]])
        nexts = jnp.concatenate([nexts, drafted_Nd[j:j + 1].astype(nexts.dtype)])
    return jnp.stack(logits)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_drafting_equals_the_training_form_run_step_by_step(target, temperature):
    head = create_draft_head(TARGET, seed=1)
    tokens_T1 = jax.random.randint(jax.random.key(0), (12,), 0, TARGET.vocab_size)
    features_TxD = hidden(target, tokens_T1[None, :-1])[0]
    draft = jax.jit(draft_tokens, static_argnames="k")
    drafted_Nd, q_NdxV = draft(head, target, features_TxD, tokens_T1, k=4, temperature=temperature,
                               key=jax.random.key(5))
    ref_logits_NdxV = reference_drafts(head, target, features_TxD, tokens_T1, drafted_Nd)
    if temperature == 0:
        np.testing.assert_array_equal(drafted_Nd, jnp.argmax(ref_logits_NdxV, -1))
        np.testing.assert_array_equal(q_NdxV, jax.nn.one_hot(drafted_Nd, TARGET.vocab_size))
    else:
        np.testing.assert_allclose(q_NdxV, jax.nn.softmax(ref_logits_NdxV / temperature), atol=1e-5)
    # The first drafted token is the training form's prediction at the last given position.
    _, logits_1xTxV = batch_form(head, target, features_TxD[None], tokens_T1[None, 1:])
    np.testing.assert_allclose(ref_logits_NdxV[0], logits_1xTxV[0, -1], rtol=1e-5, atol=1e-5)

    # Padding past `length` changes nothing (a caller buckets lengths).
    padded_drafts, padded_q = draft(head, target, jnp.pad(features_TxD, ((0, 5), (0, 0))),
                                    jnp.pad(tokens_T1, (0, 5), constant_values=7), k=4, temperature=temperature,
                                    key=jax.random.key(5), length=jnp.int32(11))
    np.testing.assert_array_equal(padded_drafts, drafted_Nd)
    np.testing.assert_allclose(padded_q, q_NdxV, atol=1e-5)


@pytest.mark.slow
def test_training_on_a_repetitive_text_learns_the_targets_greedy_tokens(target):
    text = np.frombuffer(b"the quick brown fox jumps over the lazy dog. " * 100, np.uint8).astype(np.int32)
    records = []
    cfg = DraftTrainConfig(steps=80, batch_size=8, seq_len=32, lr=1e-2, warmup_steps=10, log_every=10,
                           eval_batches=2, eval_draft_tokens=0)
    head, last = fit_draft_head(target, text[:4000], cfg, text[4000:], records.append)
    assert records[-1]["loss"] < 0.5 * records[0]["loss"], records
    # Baseline: always proposing the target's most frequent greedy token.
    greedy = np.asarray(jnp.argmax(logits(target, jnp.asarray(text[None, 4000:4200])), -1))
    baseline = np.bincount(greedy.ravel()).max() / greedy.size
    assert last["val_agree"] > max(0.2, 3 * baseline), (last, baseline)

    # greedy_acceptance against the target's greedy continuation by a Python loop on the growing sequences.
    windows_BxT1 = jnp.asarray(np.stack([text[4000 + 7 * i:4020 + 7 * i] for i in range(4)]))
    accepted_B = jax.jit(greedy_acceptance, static_argnames="k")(head, target, windows_BxT1, k=3)
    drafts_BxNd = jax.jit(jax.vmap(lambda x: draft_tokens(head, target, target.hidden(x[None, :-1])[0], x, 3)[0]))(
        windows_BxT1)
    forward = jax.jit(lambda seq_BxS: target(seq_BxS)[:, -1])
    seq_BxS, matches = windows_BxT1, []
    for j in range(3):
        greedy_B = jnp.argmax(forward(seq_BxS), -1)
        matches.append(np.asarray(greedy_B == drafts_BxNd[:, j]))
        seq_BxS = jnp.concatenate([seq_BxS, greedy_B[:, None].astype(seq_BxS.dtype)], axis=1)
    expected_B = np.cumprod(np.stack(matches, 1), axis=1).sum(1)
    np.testing.assert_array_equal(accepted_B, expected_B)
    assert expected_B.max() > 0  # the check saw accepted drafts


def test_a_saved_head_reloads_to_identical_outputs(target, tmp_path):
    head = create_draft_head(TARGET, seed=2)
    tokens_BxT1 = jax.random.randint(jax.random.key(1), (2, 9), 0, TARGET.vocab_size)
    features = hidden(target, tokens_BxT1[:, :-1])
    save_draft_head(head, tmp_path / "head", {"target_source": "run:somewhere"})
    again, meta = load_draft_head(tmp_path / "head", TARGET)
    assert meta["target_source"] == "run:somewhere" and again.cfg == head.cfg
    for a, b in zip(batch_form(head, target, features, tokens_BxT1[:, 1:]),
                    batch_form(again, target, features, tokens_BxT1[:, 1:]), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="vocab_size 259, but this target has vocab_size 300"):
        load_draft_head(tmp_path / "head", TARGET.replace(vocab_size=300))
    with pytest.raises(FileNotFoundError, match="not a saved draft head"):
        load_draft_head(tmp_path)


def test_bad_input_is_refused_naming_it(target):
    head = create_draft_head(TARGET)
    tokens_T1 = jnp.arange(6)
    features_TxD = hidden(target, tokens_T1[None, :-1])[0]
    with pytest.raises(ValueError, match="k \\(tokens to draft\\) must be a positive integer, got 0"):
        draft_tokens(head, target, features_TxD, tokens_T1, 0)
    other = create_model(TARGET.replace(vocab_size=300))
    with pytest.raises(ValueError, match="vocab_size 259, but this target has vocab_size 300"):
        draft_tokens(head, other, features_TxD, tokens_T1, 2)
    with pytest.raises(ValueError, match="tokens must be \\[T \\+ 1\\] = \\[6\\]"):
        draft_tokens(head, target, features_TxD, tokens_T1[:-1], 2)
    with pytest.raises(ValueError, match="needs a key"):
        draft_tokens(head, target, features_TxD, tokens_T1, 2, temperature=1.0)
    with pytest.raises(ValueError, match="draft.cls_target must be one of"):
        DraftTrainConfig(cls_target="soft")
    with pytest.raises(ValueError, match="draft.seq_len must be at least 2"):
        DraftTrainConfig(seq_len=1)
    with pytest.raises(ValueError, match="draft.eval_draft_tokens must be at most draft.seq_len - 2 = 2"):
        DraftTrainConfig(seq_len=4, eval_draft_tokens=3)
    with pytest.raises(ValueError, match="exceeds the target's max_seq_len 64"):
        fit_draft_head(target, np.zeros(1000, np.int32), DraftTrainConfig(seq_len=128))
    assert nnx.state(head)  # the head is a plain nnx module
