"""Speculative decoding with the target's own multi-token prediction module as the proposer (method "mtp": the
engine runs `model.draft_head.mtp_draft_head(model)` as a draft head). Against independent references: greedy
outputs equal the naive decoder's token for token with staggered arrivals and under forced preemption (for a dense
and an MoE target), and the engine's drafts are those of the cache-free `draft_tokens` recomputed from the target's
full forward; a model without MTP, or a draft model given beside it, is refused by name."""

from __future__ import annotations

import dataclasses
import functools

import pytest

from model.config import MoEConfig
from model.draft_head import mtp_draft_head
from model.transformer import create_model, for_inference
from serve.engine import Engine
from serve.naive import generate
from serve.speculation_config import SpeculativeConfig
from tests.serve.test_engine import (
    CFG,
    MAX_NEW,
    PREEMPTING,
    SERVE,
    assert_preempted_and_served,
    prompts,
    serve_staggered,
)
from tests.serve.test_speculative_engine import K, assert_drafts_of_the_cache_free_head

MTP = SpeculativeConfig(method="mtp", num_tokens=K, adaptive=False)
MTP_CFG = CFG.replace(mtp_depth=1)
MOE_CFG = MTP_CFG.replace(moe=MoEConfig(n_experts=4, top_k=2, dispatch="dropless"))


@functools.cache
def model(moe: bool = False):
    return create_model(MOE_CFG if moe else MTP_CFG, seed=3)


@functools.cache
def naive_outputs(moe: bool = False):
    return [tuple(generate(model(moe), [p], n)[0]) for p, n in zip(prompts(), MAX_NEW, strict=True)]


def engine(moe: bool = False, **serve):
    return Engine(model(moe), dataclasses.replace(SERVE, speculative=MTP, **serve))


@pytest.mark.slow
def test_greedy_mtp_speculation_matches_the_naive_decoder():
    e = engine()
    assert serve_staggered(e) == naive_outputs()
    assert e.allocator.num_free == e.allocator.num_usable
    assert e.speculation.rows > 0 and e.speculation.drafted > 0


@pytest.mark.slow
def test_greedy_mtp_speculation_under_forced_preemption():
    assert_preempted_and_served(engine(**PREEMPTING), naive_outputs())


@pytest.mark.slow
def test_greedy_mtp_speculation_of_an_moe_model():
    """The MTP module of an MoE model has an MoE block; the head runs it (dropless, as the served model)."""
    e = engine(moe=True)
    assert serve_staggered(e) == naive_outputs(moe=True)
    assert e.speculation.drafted > 0


@pytest.mark.slow
def test_the_mtp_proposer_drafts_what_the_cache_free_head_drafts():
    """The engine's MTP head (its paged pool, catching up on the target's stored hidden states) drafts the tokens
    of `draft_tokens` with `mtp_draft_head(model)`, which recomputes the module over the whole sequence from the
    target's own full forward; and the outputs stay the naive decoder's."""
    assert_drafts_of_the_cache_free_head(engine(), model(), mtp_draft_head(for_inference(model())), K)


def test_a_model_without_mtp_or_with_a_draft_model_is_refused_by_name():
    with pytest.raises(ValueError, match="mtp_depth"):
        Engine(create_model(CFG, seed=3), dataclasses.replace(SERVE, speculative=MTP))
    with pytest.raises(ValueError, match="'mtp'.*no draft_model"):
        Engine(model(), dataclasses.replace(SERVE, speculative=MTP), draft_model=model())


@pytest.mark.slow
def test_a_deepseek_v3_shaped_target_drafts_with_its_mtp_module_through_a_latent_pool():
    """MLA target, MLA MTP block: the head's one-layer pool is a latent cache as the target's is; its drafts are
    the cache-free head's and the outputs the naive decoder's."""
    from tests.serve.test_engine import MLA  # noqa: PLC0415

    target = create_model(MTP_CFG.replace(mla=MLA), seed=3)
    e = Engine(target, dataclasses.replace(SERVE, speculative=MTP))
    assert e._drafter.pool.k.shape[-1] == MLA.kv_lora_rank and e._drafter.pool.v.shape[-1] == MLA.qk_rope_head_dim
    assert_drafts_of_the_cache_free_head(e, target, mtp_draft_head(for_inference(target)), K)
