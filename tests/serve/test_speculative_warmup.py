"""An engine's warm-up covers speculative decoding: after `Engine.warmup(max_context)`, serving staggered requests of
varied prompt lengths, and then the same prompts one at a time (each one's first drafting catches up its whole
prompt), compiles nothing new -- neither the target's steps (plain and verifying) nor the proposer's catch-up and
drafting -- with a draft model and with a draft head; and the greedy outputs are still the naive decoder's (the
reference: full recomputation, no cache), so the warm-up's all-padding steps left every sequence's K/V alone."""

from __future__ import annotations

import dataclasses

import pytest

from model.draft_head import create_draft_head
from serve.draft_model import catch_up_batch
from serve.engine import Engine, Request, SamplingParams
from serve.request import RequestState
from serve.scheduler import ScheduledChunk
from serve.speculation_config import SpeculativeConfig
from serve.step_batch import StepLayout
from tests.serve.test_engine import CFG, MAX_NEW, SERVE, model, naive_outputs, prompts, serve_staggered
from tests.serve.test_speculative_engine import other_draft

K = 3
# block tables of 4, 8 or 12 pages (a 32-token minimum over 8-token pages); no request here outgrows 48 tokens, so a
# warm-up to 48 tokens covers widths 4 and 8 (serving meets both) and leaves 12 to compile when first needed
WARM_SERVE = dataclasses.replace(SERVE, min_context_bucket=32)
MAX_CONTEXT = 48


def proposer(name: str) -> tuple[SpeculativeConfig, object]:
    """The speculative configuration and draft of a proposer with its own cache."""
    if name == "draft":  # another model, so some drafts are rejected and the catch-up widths vary
        return SpeculativeConfig(method="draft", num_tokens=K, adaptive=False), other_draft()
    return SpeculativeConfig(method="head", num_tokens=K, adaptive=False), create_draft_head(CFG, seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["draft", "head"])
def test_after_warmup_speculative_serving_compiles_nothing_and_matches_the_naive_decoder(name):
    spec, draft = proposer(name)
    engine = Engine(model(), dataclasses.replace(WARM_SERVE, speculative=spec), draft_model=draft)
    assert max(len(p) + n for p, n in zip(prompts(), MAX_NEW, strict=True)) <= MAX_CONTEXT
    engine.warmup(MAX_CONTEXT)
    assert engine.layout.widths(8) == [4, 8]
    target, drafter = engine.compile_count, engine._drafter.compile_count
    assert serve_staggered(engine) == list(naive_outputs())
    one_at_a_time = [tuple(engine.generate([Request(tuple(p), n)])[0].token_ids)
                     for p, n in zip(prompts(), MAX_NEW, strict=True)]
    assert one_at_a_time == list(naive_outputs())
    assert engine.speculation.rows > 0
    assert (engine.compile_count, engine._drafter.compile_count) == (target, drafter)


def test_a_long_catch_up_fills_at_most_max_tiles_per_step_then_one_decode_row_each():
    """A catch-up's older tokens go to prefill steps of at most `max_tiles` tiles (a row longer than that continues
    in the next one, in order), and each row's last `width` tokens to one decode row of the target's Bd rows."""
    layout = StepLayout(page_size=8, max_decode_rows=4, tile=4, min_pages=2, max_pages=8)
    seqs = []
    for n in (30, 3):
        seq = RequestState(f"s{n}", list(range(1, n + 1)), 4, sampling=SamplingParams(seed=0))
        seq.block_table = list(range(1 + 4 * len(seqs), 5 + 4 * len(seqs)))
        seqs.append(seq)
    chunks = [ScheduledChunk(seq, seq.num_tokens - 1, 1) for seq in seqs]
    catch_up = catch_up_batch(chunks, [0, 1], layout, 2, 2, max_tiles=3)
    # row 0's 28 older tokens: 7 tiles of 4, in steps of 3, 3 and 1 tiles (bucketed to 4, 4 and 1)
    assert [f.tile_tables_NtxW.shape[0] for f in catch_up.fills] == [4, 4, 1]
    positions = [p for f in catch_up.fills for p in f.positions_T.tolist() if p >= 0]
    assert positions == list(range(28))
    step = catch_up.step
    assert step.decode_tables_BxW.shape[0] == 2 and step.tile_tables_NtxW.shape[0] == 0
    assert step.positions_T.tolist() == [28, 29, 1, 2]
    assert step.tokens_T.tolist() == [29, 30, 2, 3]
    assert catch_up.row_slots.tolist() == [1, 3]  # each row's last token
