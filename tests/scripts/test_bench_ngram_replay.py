"""scripts/bench_ngram_replay: the replay's accepted drafts per step, counted by hand on outputs that copy the
prompt, never recur, or copy part of it."""

from __future__ import annotations

from scripts.bench_ngram_replay import ceiling, replay
from serve.ngram import NgramConfig

K4 = NgramConfig(max_n=3, min_n=1, num_tokens=4)
PROMPT = list(range(100, 140)) + [7]  # 40 distinct tokens, then one that does not recur


def test_an_output_copying_the_prompt_accepts_k_a_step_after_its_first_token():
    # step 1: `7` never occurred before, no drafts, the target emits 100; from then on the last token (then the
    # last three) occur once in the prompt and the 4 tokens after them are the output's next 4: 39 tokens in 7
    # full steps of 5 and a last step that may accept only 3 (its own token is the output's last)
    assert replay(PROMPT, PROMPT[:40], K4) == [0] + [4] * 7 + [3]


def test_an_output_of_new_tokens_accepts_nothing():
    assert replay(PROMPT, list(range(500, 520)), K4) == [0] * 20


def test_the_ceiling_is_tokens_per_step_and_the_shares_by_position():
    # copy 5 prompt tokens, then 3 new ones: step 1 emits 100 (no drafts), step 2 accepts 101-104 and the target
    # adds 900, then 900 and 901 have never occurred (steps 3 and 4 accept nothing): 8 tokens in 4 steps
    output = PROMPT[:5] + [900, 901, 902]
    assert replay(PROMPT, output, K4) == [0, 4, 0, 0]
    row = ceiling([(PROMPT, output)], K4)
    assert row["mean_accepted_length"] == 2.0
    assert row["accepted_at_position"] == [0.25, 0.25, 0.25, 0.25]
