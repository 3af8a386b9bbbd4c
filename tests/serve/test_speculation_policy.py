"""The speculation policy's measurement: a rate per mode from its recent steps, robust to an interrupted step."""

import pytest

from serve.speculation_policy import SpeculationPolicy


def explore(policy: SpeculationPolicy, bucket: int, spec_steps: list, plain_steps: list) -> None:
    """Answer the policy's exploration: each mode's (tokens, seconds) steps, in the order it asks for them."""
    todo = {True: list(spec_steps), False: list(plain_steps)}
    while todo[True] or todo[False]:
        mode = policy.speculate(bucket)
        assert todo[mode], f"asked for another {'speculative' if mode else 'plain'} step"
        policy.record(bucket, mode, *todo[mode].pop(0))


def test_one_interrupted_step_does_not_decide_the_switch():
    """Plain decoding is faster (1,111 against 833 tokens/s) but one of its eight measured steps was interrupted
    (a 30 ms pause in a 0.9 ms step): the policy still decodes plainly. A mean over the steps (the decayed sums
    this replaced) rated plain decoding at about 230 tokens/s and speculated."""
    policy = SpeculationPolicy(explore_steps=8)
    plain = [(1, 0.9e-3)] * 8
    plain[5] = (1, 30e-3)
    explore(policy, 1, [(5, 6e-3)] * 8, plain)
    assert policy.rates()[1][False] > policy.rates()[1][True]
    choices = [policy.speculate(1) for _ in range(40)]
    assert choices.count(False) >= 36  # plain, but for the probes of speculation


def test_steps_of_different_costs_keep_their_weight():
    """An n-gram step with no draft is cheap and one that verifies 4 drafts costs 2.5 times as much: both are the
    mode's real cost, so its rate is all tokens over all seconds (not the median step's)."""
    policy = SpeculationPolicy(explore_steps=8)
    spec = [(1, 1e-3), (4, 2.5e-3)] * 4  # 5 tokens in 3.5 ms a pair: 1,429 tokens/s
    explore(policy, 2, spec, [(1, 0.8e-3)] * 8)  # plain: 1,250 tokens/s
    assert policy.rates()[2][True] == pytest.approx(20 / 14e-3)
    assert policy.rates()[2][False] == pytest.approx(1 / 0.8e-3)
    assert [policy.speculate(2) for _ in range(20)].count(True) >= 17


def test_the_window_follows_a_change_of_cost():
    """The drafts stop being accepted (speculation falls to 1 token a step): within a window of steps the policy
    turns to plain decoding."""
    policy = SpeculationPolicy(explore_steps=4, window=8)
    explore(policy, 1, [(5, 5e-3)] * 4, [(1, 2e-3)] * 4)  # speculation 1,000 against plain 500 tokens/s
    steps = 0
    while policy.speculate(1) and steps < 8:
        policy.record(1, True, 1, 5e-3)  # now 200 tokens/s
        steps += 1
    assert 2 < steps < 8  # the first slower steps are outweighed by the window's earlier ones, not all of them
    assert [policy.speculate(1) for _ in range(20)].count(False) >= 17


@pytest.mark.parametrize("kwargs", [{"window": 0}, {"probe_steps": -1}, {"outlier": 0}])
def test_bad_settings_are_refused_by_name(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SpeculationPolicy(**kwargs)
