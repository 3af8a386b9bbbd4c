"""Prefix caching: the allocator's cache of full pages by content, and the engine serving requests that share a
prefix against the naive decoder (full recomputation, no cache), with the shared pages shown to be read."""

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
import pytest

from model.presets import get_preset
from model.transformer import create_model
from serve.block_allocator import BlockAllocator, NoFreePages, block_keys
from serve.engine import Engine, Request, ServeConfig
from serve.kv_cache import KVCache
from serve.naive import generate
from serve.scheduler import SchedulerConfig

CFG = dataclasses.replace(get_preset("tiny"), dtype="float32", max_seq_len=96, init_std=0.1)
PAGE = 8


def test_block_keys_name_a_block_and_everything_before_it():
    a = block_keys([1, 2, 3, 4, 5, 6, 7], 3)  # two full blocks; the partial third has no key
    assert len(a) == 2 and a == block_keys([1, 2, 3, 4, 5, 6], 3)
    b = block_keys([9, 2, 3, 4, 5, 6], 3)
    assert a[0] != b[0] and a[1] != b[1]  # same second block, other prefix: another key
    assert block_keys([1, 2], 3) == []


def test_freed_pages_stay_findable_until_reallocated_least_recently_freed_first():
    pool = BlockAllocator(5)  # pages 1-4
    keys = block_keys(list(range(8)), 4)
    p1, p2 = pool.allocate(2)
    pool.register(p1, keys[0])
    pool.register(p2, keys[1])
    assert pool.lookup(keys) == [p1, p2] and pool.refcount(p1) == 2  # shared while in use
    pool.free([p1, p2, p1, p2])
    assert pool.num_free == 4 and pool.num_cached == 2
    assert pool.lookup(keys) == [p1, p2] and pool.num_free == 2 and pool.refcount(p2) == 1  # off the free list
    pool.free([p2, p1])  # p2 freed first: it goes first
    others = pool.allocate(2)
    assert p1 not in others and p2 not in others  # never-cached pages 3 and 4 were freed longer ago
    assert pool.allocate(1) == [p2] and pool.num_cached == 1  # new contents for p2: its block is evicted
    assert pool.lookup(keys) == [p1]  # only the first block is left
    with pytest.raises(NoFreePages):
        pool.allocate(1)
    with pytest.raises(ValueError, match="page 3 is not allocated"):
        BlockAllocator(5).register(3, keys[0])


@functools.cache
def model():
    return create_model(CFG, seed=3)


@functools.cache
def naive_cached(prompt: tuple, n: int) -> list[int]:
    return generate(model(), [list(prompt)], n)[0]


def naive(prompt, n):
    return naive_cached(tuple(prompt), n)


PREFIX = np.random.default_rng(7).integers(0, CFG.vocab_size, 21).tolist()  # 2 full pages of 8, and 5 tokens


def shared_prefix_requests():
    rng = np.random.default_rng(8)
    suffixes = [rng.integers(0, CFG.vocab_size, n).tolist() for n in (6, 1, 14, 3)]
    return [Request(tuple(PREFIX + s), n, request_id=f"r{i}")
            for i, (s, n) in enumerate(zip(suffixes, (9, 12, 5, 7), strict=True))]


def serve(engine, requests):
    for r in requests:
        engine.submit(r)
    while engine.has_unfinished:
        engine.step()
    return [engine.completions[r.request_id] for r in requests]


@pytest.mark.parametrize("num_pages", [None, 9])  # 9: 8 usable pages of 8 tokens, too few for all at once
def test_requests_sharing_a_prefix_reuse_its_pages_and_match_the_naive_decoder(num_pages):
    engine = Engine(model(), ServeConfig(page_size=PAGE, num_pages=num_pages, max_running=4, token_budget=32,
                                         decode_impl="reference"))
    first, *rest = shared_prefix_requests()
    done = serve(engine, [first])  # alone: nothing cached yet
    done += serve(engine, rest)  # together: the prefix's two full pages are found
    for r, c in zip([first, *rest], done, strict=True):
        assert c.token_ids == naive(list(r.prompt_ids), r.max_new_tokens), r.request_id
    assert done[0].num_cached_tokens == 0
    assert [c.num_cached_tokens for c in done[1:]] == [16, 16, 16]
    again = serve(engine, [dataclasses.replace(first, request_id="again")])[0]  # 27 tokens: 3 pages cached
    # under pressure the first request's own third page was evicted by the others' while they ran
    assert again.num_cached_tokens == (24 if num_pages is None else 16)
    assert again.token_ids == done[0].token_ids
    assert engine.allocator.num_free == engine.allocator.num_usable


def test_a_prompt_of_whole_pages_still_computes_its_last_token():
    engine = Engine(model(), ServeConfig(page_size=PAGE, max_running=2, token_budget=32, decode_impl="reference"))
    prompt = PREFIX[:16]  # exactly two pages
    a, b = (serve(engine, [Request(tuple(prompt), 6, request_id=i)])[0] for i in ("a", "b"))
    assert b.num_cached_tokens == 8  # the second page holds the last token, whose logits give the first output
    assert a.token_ids == b.token_ids == naive(prompt, 6)
    engine.reset_prefix_cache()
    c = serve(engine, [Request(tuple(prompt), 6, request_id="c")])[0]
    assert c.num_cached_tokens == 0 and c.token_ids == a.token_ids


def test_cached_pages_are_what_the_engine_reads():
    """Poison every free page after the first request: the next one, sharing its prefix, now reads NaN K/V from
    the cached pages and its output changes; with prefix caching off it matches the naive decoder."""
    first, second = shared_prefix_requests()[:2]
    outputs = {}
    for caching in (True, False):
        engine = Engine(model(), ServeConfig(page_size=PAGE, max_running=2, token_budget=32,
                                             decode_impl="reference", prefix_caching=caching))
        serve(engine, [first])
        poison = lambda pool: pool.at[:].set(jnp.nan)  # noqa: E731 -- no page is in use now
        engine.cache = KVCache(poison(engine.cache.k), poison(engine.cache.v))
        outputs[caching] = serve(engine, [second])[0].token_ids
    assert outputs[False] == naive(list(second.prompt_ids), second.max_new_tokens)
    assert outputs[True] != outputs[False]


def test_bad_prefix_caching_values_are_refused_by_name():
    with pytest.raises(ValueError, match="serve.prefix_caching must be true or false, got 'yes'"):
        ServeConfig(prefix_caching="yes")
    with pytest.raises(ValueError, match="scheduler.prefix_caching must be true or false, got 1"):
        SchedulerConfig(prefix_caching=1)


def test_scheduler_shares_computed_full_pages_and_undoes_a_failed_admission():
    from serve.request import RequestState as Seq
    from serve.scheduler import Scheduler

    sched = Scheduler(SchedulerConfig(page_size=4, max_running=4, token_budget=64, prefix_caching=True),
                      BlockAllocator(6))  # 5 usable pages of 4 tokens
    prefix = [1, 2, 3, 4, 5, 6, 7, 8]
    a = Seq("a", prefix + [9, 10], 4)
    sched.add(a)
    (chunk,) = sched.schedule().chunks
    assert (chunk.start, chunk.length) == (0, 10)
    sched.after_step(chunk)  # two full pages computed: cached
    sched.sampled(a)
    sched.update_from_output([(a, 99)], now=0.0)
    b = Seq("b", prefix + [11, 12, 13], 1)
    sched.add(b)
    chunks = sched.schedule().chunks
    assert [(c.seq.request_id, c.start, c.length) for c in chunks] == [("a", 10, 1), ("b", 8, 3)]
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert b.num_cached_tokens == 8 and sched.allocator.refcount(a.block_table[0]) == 2
    for c in chunks:
        sched.after_step(c)
    c_seq = Seq("c", prefix + list(range(20, 29)), 1)  # 17 tokens: 2 cached pages + 3 new, but only 1 is free
    sched.add(c_seq)
    assert sched.schedule().chunks == () and sched.waiting == (c_seq,)
    assert c_seq.block_table == [] and c_seq.num_computed == 0  # the looked-up pages were handed back
    assert sched.allocator.refcount(a.block_table[0]) == 2
    sched.finish(a, "length")
    sched.finish(b, "length")
    (chunk,) = sched.schedule().chunks  # now c fits, on the cached prefix
    assert (chunk.start, chunk.length) == (8, 9) and c_seq.num_cached_tokens == 8
