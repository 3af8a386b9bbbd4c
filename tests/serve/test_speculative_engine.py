"""Speculative decoding inside the engine, against independent references: greedy outputs equal the naive decoder's
token for token for every proposer, with staggered arrivals, forced preemption and prefix caching; the target as its
own draft accepts every drafted token; a stop token inside an accepted run ends the request there; log-probabilities
are the plain engine's; and sampled requests keep the target's distribution (chi-square against the distribution
computed from the model's own full forward, with a draft model that disagrees with it)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from model.draft_head import create_draft_head, draft_tokens
from model.transformer import create_model
from serve.engine import Engine, Request, SamplingParams
from serve.naive import generate
from serve.speculation_config import SpeculativeConfig
from serve.speculation_policy import SpeculationPolicy
from tests.serve.test_engine import (
    CFG,
    PREEMPTING,
    SERVE,
    assert_preempted_and_served,
    model,
    naive_outputs,
    prompts,
    serve_staggered,
)

K = 3
NGRAM = SpeculativeConfig(method="ngram", num_tokens=K, adaptive=False)
DRAFT = SpeculativeConfig(method="draft", num_tokens=K, adaptive=False)
HEAD = SpeculativeConfig(method="head", num_tokens=K, adaptive=False)


@functools.cache
def other_draft():
    """A draft model that is not the target: one layer, other weights."""
    return create_model(dataclasses.replace(CFG, n_layers=1), seed=5)


def engine(spec, draft=None, **serve):
    return Engine(model(), dataclasses.replace(SERVE, speculative=spec, **serve), draft_model=draft)


@pytest.mark.parametrize("proposer", ["ngram", *(pytest.param(p, marks=pytest.mark.slow)
                                                   for p in ("self", "other", "head"))])
def test_greedy_speculation_matches_the_naive_decoder(proposer):
    spec, draft = {"ngram": (NGRAM, None), "self": (DRAFT, model()), "other": (DRAFT, other_draft()),
                   "head": (HEAD, create_draft_head(CFG, seed=1))}[proposer]
    e = engine(spec, draft)
    assert serve_staggered(e) == list(naive_outputs())
    assert e.allocator.num_free == e.allocator.num_usable
    assert e.speculation.rows > 0
    if proposer == "self":  # the target as its own draft: every drafted token is accepted
        assert e.speculation.drafted > 0 and e.speculation.accepted == e.speculation.drafted
        assert e.speculation.accepted_at[K - 1] > 0


@pytest.mark.slow
@pytest.mark.parametrize("proposer", ["ngram", "self"])
def test_speculation_under_forced_preemption(proposer):
    spec, draft = {"ngram": (NGRAM, None), "self": (DRAFT, model())}[proposer]
    assert_preempted_and_served(engine(spec, draft, **PREEMPTING), naive_outputs())


@pytest.mark.slow
def test_speculation_with_prefix_cache_hits():
    """Requests sharing a long prefix, one after the other: later ones start on the cached pages (whose draft K/V
    the draft recomputes) and still decode the naive decoder's tokens."""
    rng = np.random.default_rng(7)
    shared = rng.integers(0, CFG.vocab_size, 40).tolist()
    prompts = [shared + rng.integers(0, CFG.vocab_size, n).tolist() for n in (3, 9, 1)]
    e = engine(DRAFT, other_draft())
    outs = []
    for i, p in enumerate(prompts):
        rid = e.submit(Request(tuple(p), 10, request_id=f"p{i}"))
        while e.has_unfinished:
            e.step()
        outs.append(e.completions[rid].token_ids)
    assert sum(c.num_cached_tokens for c in e.completions.values()) >= 64
    assert outs == generate(model(), prompts, 10)


def test_a_stop_token_inside_an_accepted_run_ends_the_request():
    rng = np.random.default_rng(3)
    for _ in range(50):  # a prompt whose greedy output brings a new token after a few repeated ones
        prompt = rng.integers(0, CFG.vocab_size, 6).tolist()
        plain = generate(model(), [prompt], 16)[0]
        fresh = [t for i, t in enumerate(plain) if i >= 4 and t not in plain[:i]]
        if fresh:
            break
    stop = fresh[0]
    e = engine(DRAFT, model())
    [done] = e.generate([Request(tuple(prompt), 16, stop_ids=(stop,))])
    assert done.token_ids == plain[:plain.index(stop) + 1]
    assert done.finish_reason == "stop"
    assert e.speculation.accepted > 0
    assert e.allocator.num_free == e.allocator.num_usable


def test_log_probabilities_are_the_plain_engines():
    reqs = [Request((3, 4, 5, 6, 7), 8, logprobs=3, request_id="a"), Request((40, 41), 6, logprobs=2,
                                                                             request_id="b")]
    plain = Engine(model(), SERVE).generate(reqs)
    spec = engine(DRAFT, model()).generate(reqs)
    for a, b in zip(plain, spec, strict=True):
        assert a.token_ids == b.token_ids
        assert len(b.state.output_logprobs) == len(b.token_ids)
        for (lp_a, top_a), (lp_b, top_b) in zip(a.state.output_logprobs, b.state.output_logprobs, strict=True):
            assert lp_b == pytest.approx(lp_a, abs=1e-4)
            assert [i for i, _ in top_b] == [i for i, _ in top_a]


def _top_k_probs(logits: np.ndarray, k: int) -> np.ndarray:
    """softmax over the k largest logits (temperature 1), zero elsewhere."""
    logits = logits.astype(np.float64)
    keep = np.argsort(logits)[-k:]
    p = np.zeros_like(logits)
    p[keep] = np.exp(logits[keep] - logits[keep].max())
    return p / p.sum()


@pytest.mark.slow
def test_sampled_speculation_keeps_the_target_distribution():
    """400 seeded requests of one prompt, top-k 4 at temperature 1, drafted by a model that disagrees with the
    target: the 2nd and 3rd output tokens (verified, not prefill-sampled) follow the target's own distribution."""
    prompt, top_k, n = [11, 22, 33, 44, 55], 4, 400
    full = lambda tokens: np.asarray(model()(jax.numpy.asarray([tokens]))[0, -1])  # noqa: E731
    p1 = _top_k_probs(full(prompt), top_k)
    p2 = {t1: _top_k_probs(full(prompt + [t1]), top_k) for t1 in np.flatnonzero(p1)}
    marginal2 = sum(p1[t1] * p for t1, p in p2.items())
    marginal3 = sum(p1[t1] * p2[t1][t2] * _top_k_probs(full(prompt + [t1, t2]), top_k)
                    for t1 in p2 for t2 in np.flatnonzero(p2[t1]))
    e = engine(DRAFT, other_draft())
    reqs = [Request(tuple(prompt), 3, sampling=SamplingParams(temperature=1.0, top_k=top_k, seed=1000 + i))
            for i in range(n)]
    outs = np.array([c.token_ids for c in e.generate(reqs)])
    assert e.speculation.rows > 0 and e.speculation.accepted < e.speculation.drafted  # rejections happened
    for position, expected in ((1, marginal2), (2, marginal3)):
        support = np.flatnonzero(expected > 0)
        counts = np.bincount(outs[:, position], minlength=CFG.vocab_size)
        assert counts[expected == 0].sum() == 0  # nothing outside the target's top-k support
        big = expected[support] * n >= 5  # chi-square bins: the small-expectation ones merged into one
        observed = np.append(counts[support][big], counts[support][~big].sum())
        wanted = np.append(expected[support][big], expected[support][~big].sum()) * n
        keep = wanted > 0
        assert stats.chisquare(observed[keep], wanted[keep]).pvalue > 1e-3, position


@pytest.mark.parametrize("proposer", ["ngram", *(pytest.param(p, marks=pytest.mark.slow) for p in ("other", "head"))])
def test_the_engine_switches_k_and_measures_each_in_steady_state_only(proposer):
    """The adaptive engine drafts each k of its choices (3, 2 and 0 here) in turn, and the output stays the naive
    decoder's whatever k each step drafts (a draft model's cache and a head's pool catch up after steps of any k).
    With overlap a step's time holds the device time of the step before it, and the first steps after a change of
    shapes run slower, so the policy records only steps that follow `settle` measurable steps of the same k (not
    the first steps after a switch, a prefill or a compile)."""
    spec, draft = {"ngram": (NGRAM, None), "other": (DRAFT, other_draft()),
                   "head": (HEAD, create_draft_head(CFG, seed=1))}[proposer]
    e = engine(dataclasses.replace(spec, adaptive=True), draft)
    assert e.draft_choices == (K, 2, 0)
    e.policy = SpeculationPolicy(e.draft_choices, explore_steps=2, probe_every=10, probe_steps=4, settle=2)
    modes, recorded = [], []
    record, lookahead = e.policy.record, e._lookahead

    def spy_lookahead():
        k = lookahead()
        modes.append(k)
        return k

    def spy_record(bucket, k, tokens, seconds, run):
        if run > e.policy.settle:
            recorded.append((len(modes) - 1, k))
        record(bucket, k, tokens, seconds, run)

    e._lookahead, e.policy.record = spy_lookahead, spy_record
    prompt = prompts()[3]
    expected = generate(model(), [prompt], 40)[0]
    for i in range(3):  # one request at a time, long enough for steps that compile nothing
        assert e.generate([Request(tuple(prompt), 40, request_id=f"s{i}")])[0].token_ids == expected
    assert {k for _, k in recorded} == set(e.draft_choices)
    for i, k in recorded:
        assert i >= 2 and modes[i - 2:i + 1] == [k] * 3, (i, modes[max(0, i - 3):i + 1])
    switches = [i for i in range(1, len(modes)) if modes[i] != modes[i - 1]]
    assert switches and not {i for i, _ in recorded} & {s + d for s in switches for d in (0, 1)}


@pytest.mark.slow
def test_the_head_proposer_drafts_what_the_cache_free_head_drafts():
    """The engine's draft head (its paged pool, catching up lazily on the target's stored hidden states) drafts the
    tokens of model/draft_head.py `draft_tokens`, which recomputes the head over the whole sequence from the
    target's own full forward; and the outputs stay the naive decoder's."""
    head = create_draft_head(CFG, seed=1)
    assert_drafts_of_the_cache_free_head(engine(HEAD, head), model(), head, K)


def assert_drafts_of_the_cache_free_head(e, target, head, k):
    """Serve two requests on engine `e` (target `target`, proposer `head`), recording every draft: each equals
    `draft_tokens` of the head recomputed from the target's full forward over the sequence so far, and the
    outputs are the naive decoder's."""
    calls = []
    original = e._drafter.draft

    def recording(decodes, inputs):
        drafts, q = original(decodes, inputs)
        calls.append(([list(c.seq.all_ids) for c in decodes], np.asarray(drafts)))
        return drafts, q

    e._drafter.draft = recording
    ps = prompts()[:2]
    done = e.generate([Request(tuple(p), 10) for p in ps])
    assert [c.token_ids for c in done] == generate(target, ps, 10)
    assert len(calls) >= 3
    padded = max(len(ids) for ids_of_rows, _ in calls for ids in ids_of_rows)
    for ids_of_rows, drafts in calls:
        for b, ids in enumerate(ids_of_rows):
            ids_T1 = jnp.asarray(ids + [0] * (padded - len(ids)), jnp.int32)
            reference = _cache_free_drafts(head, target, ids_T1, len(ids) - 1, k)
            assert drafts[b].tolist() == np.asarray(reference).tolist(), (b, len(ids))


@functools.partial(nnx.jit, static_argnums=4)
def _cache_free_drafts(head, target, ids_T1, n, k):
    """`draft_tokens` of the head over the target's full forward on tokens x_0..x_n (features f_0..f_{n-1}); the
    tokens past n are padding, which a causal model's features before n do not see, so one compile serves every n."""
    features_TxD = target.hidden(ids_T1[None, :-1])[0]
    return draft_tokens(head, target, features_TxD, ids_T1, k, length=n)[0]
