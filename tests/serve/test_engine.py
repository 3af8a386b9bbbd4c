"""The continuous-batching engine against the naive decoder (full recomputation, no cache): greedy outputs are
token-for-token identical for mixed prompt lengths and arrival times, with and without forced preemption, with
the Pallas decode kernel (interpret mode) and its reference; pages all come back; stale NaN pages are
unreachable; the step stops compiling; bad requests are rejected by name while the rest are served."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config import MLAConfig, MoEConfig
from model.presets import get_preset
from model.transformer import create_model
from serve.engine import Engine, Request, RequestError, SamplingParams, ServeConfig
from serve.kv_cache import KVCache
from serve.naive import generate

CFG = dataclasses.replace(get_preset("tiny"), dtype="float32", max_seq_len=96, init_std=0.1)
PROMPT_LENGTHS = (5, 17, 1, 33, 9, 24)
MAX_NEW = (12, 7, 20, 5, 16, 10)
# One engine configuration for most tests, so they share its compiled step shapes.
SERVE = ServeConfig(page_size=8, max_running=4, token_budget=32, decode_impl="reference")


@functools.cache
def model():
    return create_model(CFG, seed=3)


def prompts(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CFG.vocab_size, n).tolist() for n in PROMPT_LENGTHS]


@functools.cache
def naive_outputs(seed=0):
    return tuple(tuple(generate(model(), [p], n)[0]) for p, n in zip(prompts(seed), MAX_NEW, strict=True))


def serve_staggered(engine, seed=0):
    """Submit half the requests, run a few steps, submit the rest, run to the end."""
    reqs = [Request(tuple(p), n, request_id=f"r{i}") for i, (p, n) in enumerate(zip(prompts(seed), MAX_NEW,
                                                                                       strict=True))]
    for r in reqs[:3]:
        engine.submit(r)
    for _ in range(4):
        engine.step()
    for r in reqs[3:]:
        engine.submit(r)
    while engine.has_unfinished:
        engine.step()
    return [tuple(engine.completions[r.request_id].token_ids) for r in reqs]


# 12 usable pages of 4 tokens: fewer than the requests need together, so running ones get preempted.
PREEMPTING = dict(page_size=4, num_pages=13, max_running=6, token_budget=24, max_prefill_chunk=16)


def assert_preempted_and_served(engine, expected):
    """`serve_staggered` on an engine short of pages: `expected` tokens, some request preempted, every page back."""
    assert serve_staggered(engine) == list(expected)
    assert sum(c.num_preemptions for c in engine.completions.values()) > 0
    assert engine.allocator.num_free == engine.allocator.num_usable


def test_greedy_matches_the_naive_decoder():
    """With the Pallas decode kernel; the tests below run the reference decode against the same decoder."""
    engine = Engine(model(), ServeConfig(page_size=8, max_running=4, token_budget=32, decode_impl="pallas"))
    assert serve_staggered(engine) == list(naive_outputs())
    assert engine.allocator.num_free == engine.allocator.num_usable
    assert all(c.finish_reason == "length" for c in engine.completions.values())


@pytest.mark.slow
def test_both_layer_loops_match_the_naive_decoder():
    """The scanned layer loop (the default) and the unrolled one give the naive decoder's tokens."""
    for layer_loop in ("scan", "unrolled"):
        engine = Engine(model(), dataclasses.replace(SERVE, layer_loop=layer_loop))
        assert serve_staggered(engine) == list(naive_outputs()), layer_loop


@pytest.mark.parametrize("overlap", [True, False])
def test_forced_preemption_still_matches_and_frees_every_page(overlap):
    assert_preempted_and_served(Engine(model(), dataclasses.replace(SERVE, overlap=overlap, **PREEMPTING)),
                                naive_outputs())


@pytest.mark.parametrize("overlap", [True, False])
def test_stale_nan_pages_are_unreachable(overlap):
    engine = Engine(model(), dataclasses.replace(SERVE, overlap=overlap))
    serve_staggered(engine)
    poison = lambda pool: pool.at[:].set(jnp.nan)  # noqa: E731 -- every page is free now, the null page too
    engine.cache = KVCache(poison(engine.cache.k), poison(engine.cache.v))
    assert serve_staggered(engine, seed=1) == list(naive_outputs(seed=1))


def test_steady_state_does_not_recompile():
    engine = Engine(model(), SERVE)
    serve_staggered(engine)
    compiled = engine.compile_count
    serve_staggered(engine, seed=1)  # the same lengths, other tokens: every shape bucket already seen
    assert engine.compile_count == compiled


def test_seeded_sampling_does_not_depend_on_the_batch():
    sampling = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, seed=7)
    request = Request(tuple(prompts()[1]), 12, sampling=sampling, request_id="mine")
    alone = Engine(model(), SERVE).generate([request])[0].token_ids
    crowd = [Request(tuple(p), 9, sampling=SamplingParams(temperature=1.0)) for p in prompts(2)] + [request]
    together = Engine(model(), SERVE).generate(crowd)[-1].token_ids
    assert alone == together and len(alone) == 12
    greedy = Engine(model(), SERVE).generate(
        [dataclasses.replace(request, sampling=SamplingParams())])[0].token_ids
    assert alone != greedy  # it really sampled


def test_bad_requests_are_rejected_by_name_and_the_rest_are_served():
    engine = Engine(model(), ServeConfig(page_size=8, num_pages=9, decode_impl="reference"))
    good = Request(tuple(prompts()[0]), MAX_NEW[0], request_id="good")
    bad = {
        "empty": (Request((), 4, request_id="empty"), "the prompt is empty"),
        "vocab": (Request((1, 2, CFG.vocab_size), 4, request_id="vocab"), "token id 259 is outside the vocabulary"),
        "long": (Request((1,) * 90, 10, request_id="long"),
                 r"prompt \(90 tokens\) \+ max_new_tokens \(10\) = 100 exceeds the model's context of 96"),
        "zero": (Request((1, 2), 0, request_id="zero"), "max_new_tokens must be >= 1, got 0"),
        "huge": (Request((1,) * 60, 30, request_id="huge"), "needs 12 pages of 8 tokens but the whole cache has 8"),
        "temp": (Request((1, 2), 3, sampling=SamplingParams(temperature=-1), request_id="temp"),
                 "temperature must be >= 0"),
    }
    for request, message in bad.values():
        with pytest.raises(RequestError, match=f"request '{request.request_id}': {message}"):
            engine.submit(request)
    results = engine.generate([good] + [r for r, _ in bad.values()])
    assert results[0].token_ids == list(naive_outputs()[0]) and results[0].error is None
    assert [r.finish_reason for r in results[1:]] == ["error"] * len(bad)
    assert all(r.request_id in r.error for r in results[1:])


@pytest.mark.parametrize("overlap", [True, False])
def test_streaming_and_stop_tokens(overlap):
    engine = Engine(model(), dataclasses.replace(SERVE, overlap=overlap))
    expected = list(naive_outputs()[2])
    streamed = list(engine.stream(Request(tuple(prompts()[2]), MAX_NEW[2])))
    assert streamed == expected
    stop = expected[4]
    seen = []
    [done] = engine.generate([Request(tuple(prompts()[2]), MAX_NEW[2], stop_ids=(stop,))],
                             on_token=lambda rid, tok: seen.append(tok))
    assert done.token_ids == expected[:expected.index(stop) + 1] == seen and done.finish_reason == "stop"
    assert done.ttft_s > 0 and len(done.token_times_s) == len(done.token_ids)


def test_sample_rows_follows_each_rows_parameters():
    from serve.sampling import sample_rows

    sample_rows = jax.jit(sample_rows)  # one compile for the 31 calls below, not one trace of each op per call

    logits = jax.random.normal(jax.random.key(0), (4, 50)) * 3
    greedy = np.asarray(jnp.argmax(logits, -1))
    args = (jnp.array([1, 2, 3, 4], jnp.uint32), jnp.zeros(4, jnp.int32))
    # temperature 0, top_k 1 and a tiny top_p are all greedy
    out = sample_rows(logits, *args, jnp.array([0.0, 1.0, 1.0, 0.0]), jnp.array([0, 1, 0, 0]),
                      jnp.array([1.0, 1.0, 1e-6, 1.0]))
    np.testing.assert_array_equal(np.asarray(out)[:3], greedy[:3])
    # top_k 3: draws stay within each row's 3 largest logits
    draws = np.stack([np.asarray(sample_rows(logits, jnp.full(4, s, jnp.uint32), jnp.zeros(4, jnp.int32),
                                             jnp.ones(4), jnp.full(4, 3), jnp.ones(4))) for s in range(30)])
    top3 = np.argsort(np.asarray(logits), -1)[:, -3:]
    assert all(set(draws[:, b]) <= set(top3[b]) for b in range(4)) and len(set(draws[:, 0])) > 1


@pytest.mark.slow
def test_an_moe_model_is_served_dropless_and_matches_the_naive_decoder():
    """A capacity-dispatch MoE model is served with dropless dispatch (a token's output must not depend on its
    batch-mates); the engine's greedy outputs equal the naive decoder's, which recomputes whole sequences."""
    cfg = dataclasses.replace(CFG, moe=MoEConfig(n_experts=4, top_k=2, capacity_factor=0.5))
    moe_model = create_model(cfg, seed=3)
    engine = Engine(moe_model, SERVE)
    assert engine.model_cfg.moe.dispatch == "dropless"
    # Three requests at once (batch-mates for every token), fewer step shapes to compile than the staggered six.
    pairs = list(zip(prompts()[:3], MAX_NEW[:3], strict=True))
    served = engine.generate([Request(tuple(p), n) for p, n in pairs])
    assert [c.token_ids for c in served] == [generate(moe_model, [p], n)[0] for p, n in pairs]


MLA = MLAConfig(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
DEEPSEEK_MOE = MoEConfig(n_experts=4, top_k=2, first_dense_layers=1, router="sigmoid", n_shared_experts=1,
                         routed_scaling_factor=2.5)


@pytest.mark.parametrize("change", [{"mla": MLA},
                                    pytest.param({"mla": dataclasses.replace(MLA, q_lora_rank=12)},
                                                 marks=pytest.mark.slow),
                                    pytest.param({"moe": DEEPSEEK_MOE}, marks=pytest.mark.slow),
                                    pytest.param({"mla": MLA, "moe": DEEPSEEK_MOE}, marks=pytest.mark.slow)],
                         ids=["mla", "mla-q-lora", "dense-first-layers", "deepseek-v3-shaped"])
def test_deepseek_v3_pieces_are_served_and_match_the_naive_decoder(change):
    """MLA through the latent paged cache (absorbed decode and prefill) and MoE models with dense first layers
    (two layer stacks in the step): the engine's greedy tokens equal the naive decoder's, which recomputes whole
    sequences with the unabsorbed model. Three requests at once, prompts spanning several pages."""
    target = create_model(dataclasses.replace(CFG, **change), seed=3)
    engine = Engine(target, SERVE)
    pairs = list(zip(prompts()[:3], MAX_NEW[:3], strict=True))
    served = engine.generate([Request(tuple(p), n) for p, n in pairs])
    assert [c.token_ids for c in served] == [generate(target, [p], n)[0] for p, n in pairs]
    assert engine.allocator.num_free == engine.allocator.num_usable


@pytest.mark.slow
@pytest.mark.parametrize("layer_loop", ["scan", "unrolled"])
def test_mla_with_the_pallas_latent_kernel_preemption_and_staggered_arrivals(layer_loop):
    """The latent decode kernel (Pallas, interpret mode here), both layer loops, a cache small enough that
    running requests are preempted and recomputed: still the naive decoder's tokens."""
    target = create_model(dataclasses.replace(CFG, mla=MLA), seed=3)
    engine = Engine(target, ServeConfig(page_size=4, num_pages=13, max_running=4, token_budget=32,
                                        decode_impl="pallas", layer_loop=layer_loop))
    assert_preempted_and_served(engine, [tuple(generate(target, [p], n)[0])
                                         for p, n in zip(prompts(), MAX_NEW, strict=True)])


def test_step_cost_follows_live_tokens_not_the_context():
    """The same requests on the same weights declared with a 96- and a 1,536-token context (the same cache size):
    the steps compile to the same FLOPs and bytes, because block tables are as wide as the longest live row."""
    costs = []
    for max_seq_len in (96, 1536):
        engine = Engine(create_model(dataclasses.replace(CFG, max_seq_len=max_seq_len), seed=3),
                        dataclasses.replace(SERVE, num_pages=40, min_context_bucket=8))
        engine.generate([Request(tuple(p), 3) for p in prompts()[:2]])
        cost = engine.last_step_cost()
        costs.append((cost["flops"], cost["bytes accessed"], engine.layout.shape_of(engine.last_step[0])))
    assert costs[0] == costs[1]
    assert costs[0][2][2] < 96 // SERVE.page_size  # a block table narrower than even the short context


def test_compiled_shapes_stay_within_the_bucket_set():
    engine = Engine(model(), SERVE)
    serve_staggered(engine)
    assert engine.shapes_seen and engine.shapes_seen <= set(engine.step_shapes())
    assert len(engine.step_shapes()) <= 40


def test_overlap_reads_each_steps_tokens_back_one_step_later():
    """With overlap the first step launches the prefill and returns nothing; each later step returns the token the
    step before it sampled, while its own is in flight (the decode's input taken from the device)."""
    request = Request(tuple(prompts()[0]), MAX_NEW[0])
    engine = Engine(model(), SERVE)
    engine.submit(request)
    assert engine.step() == [] and engine.has_unfinished and engine.completions["req-0"].token_ids == []
    events = []
    while engine.has_unfinished:
        events.append(engine.step())
    assert [e for step in events for _, e in step] == list(naive_outputs()[0])
    assert all(len(step) == 1 for step in events) and engine.host_s > 0 and engine.wait_s > 0
    sync = Engine(model(), dataclasses.replace(SERVE, overlap=False))
    sync.submit(request)
    assert sync.step() == [("req-0", naive_outputs()[0][0])]


def test_aborting_a_request_with_a_token_in_flight_drops_it_and_frees_its_pages():
    engine = Engine(model(), SERVE)
    engine.submit(Request(tuple(prompts()[1]), MAX_NEW[1], request_id="a"))
    engine.submit(Request(tuple(prompts()[2]), MAX_NEW[2], request_id="b"))
    for _ in range(3):
        engine.step()
    engine.abort("a")
    while engine.has_unfinished:
        engine.step()
    a, b = engine.completions["a"], engine.completions["b"]
    assert a.finish_reason == "aborted" and a.token_ids == list(naive_outputs()[1][:len(a.token_ids)])
    assert b.token_ids == list(naive_outputs()[2]) and engine.allocator.num_free == engine.allocator.num_usable


def test_min_p_keeps_only_ids_near_the_top():
    """min_p 0.2 at temperature 1: every draw's probability is at least 0.2 x the top id's (computed here in
    numpy); min_p 1 keeps only the top id."""
    from serve.sampling import sample_rows

    sample_rows = jax.jit(sample_rows)
    logits = jax.random.normal(jax.random.key(1), (4, 50)) * 2
    probs = np.asarray(jax.nn.softmax(logits, -1))
    ones, zeros = jnp.ones(4), jnp.zeros(4, jnp.int32)
    draws = np.stack([np.asarray(sample_rows(logits, jnp.full(4, s, jnp.uint32), zeros, ones, zeros, ones,
                                             jnp.full(4, 0.2))) for s in range(40)])
    kept = probs >= 0.2 * probs.max(-1, keepdims=True)
    assert all(kept[b, draws[:, b]].all() for b in range(4))
    assert any(len(set(draws[:, b])) > 1 for b in range(4))  # it still samples
    top = sample_rows(logits, jnp.arange(4, dtype=jnp.uint32), zeros, ones, zeros, ones, jnp.ones(4))
    np.testing.assert_array_equal(np.asarray(top), np.asarray(jnp.argmax(logits, -1)))


def test_logprobs_equal_the_models_own_log_softmax():
    """Each output token's log-probability and its top-5 alternatives equal log_softmax of the model's logits over
    the whole sequence (one plain forward, no cache), at fp32 precision; a request without logprobs gets none."""
    p, n = prompts()[1], 6
    engine = Engine(model(), SERVE)
    with_lp, without = engine.generate([Request(tuple(p), n, logprobs=5), Request(tuple(p), n)])
    assert without.state.output_logprobs == []
    tokens = with_lp.token_ids
    logits = model()(jnp.asarray([p + tokens[:-1]]))[0, len(p) - 1:]
    expected = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), -1))
    assert len(with_lp.state.output_logprobs) == n
    for i, (lp, top) in enumerate(with_lp.state.output_logprobs):
        np.testing.assert_allclose(lp, expected[i, tokens[i]], atol=1e-4)
        ids = [t for t, _ in top]
        assert ids == list(np.argsort(-expected[i])[:5]) and ids[0] == tokens[i]  # greedy: the top id
        np.testing.assert_allclose([v for _, v in top], expected[i, ids], atol=1e-4)


def test_forget_drops_only_finished_requests():
    engine = Engine(model(), SERVE)
    rid = engine.submit(Request(tuple(prompts()[0]), 3))
    with pytest.raises(ValueError, match="not finished"):
        engine.forget(rid)
    while engine.has_unfinished:
        engine.step()
    assert engine.forget(rid).token_ids == list(naive_outputs()[0][:3])
    assert engine.forget(rid) is None and rid not in engine.completions
    assert engine.submit(Request(tuple(prompts()[0]), 3, request_id=rid)) == rid  # the id is free again
