"""The speculation policy: the k it chooses per decode-batch bucket from each k's measured rate (its recent steps
past the first of each run, robust to an interrupted step), with every other k probed now and then."""

import pytest

from serve.speculation_policy import SpeculationPolicy, draft_choices


def explore(policy: SpeculationPolicy, bucket: int, steps: dict[int, list]) -> None:
    """Answer the policy's exploration: each k's (tokens, seconds) steps, in the order it asks for them (as steady
    steps: past the policy's settle)."""
    todo = {k: list(s) for k, s in steps.items()}
    while any(todo.values()):
        k = policy.choose(bucket)
        assert todo[k], f"asked for another step of k={k}"
        policy.record(bucket, k, *todo[k].pop(0), run=policy.settle + 1)


def test_draft_choices():
    assert draft_choices(4, adaptive=True) == (4, 2, 0)
    assert draft_choices(3, adaptive=True) == (3, 2, 0)
    assert draft_choices(1, adaptive=True) == (1, 0)
    assert draft_choices(4, adaptive=False) == (4,)


def test_the_policy_keeps_the_fastest_k_and_probes_the_others():
    policy = SpeculationPolicy((4, 2, 0), explore_steps=2, probe_every=10, probe_steps=2, settle=0)
    for k, tokens in ((4, 2), (2, 5), (0, 3)):  # unmeasured: each k in turn, the largest first
        for run in (1, 2):
            assert policy.choose(4) == k
            policy.record(4, k, tokens, 1.0, run)
    choices = [policy.choose(4) for _ in range(40)]
    assert choices.count(2) >= 32 and 4 in choices and 0 in choices  # mostly k = 2, with probes of both others
    assert policy.choose(8) == 4  # another batch size has its own figures


def test_one_interrupted_step_does_not_decide_the_switch():
    """Plain decoding is faster (1,111 against 833 tokens/s) but one of its eight measured steps was interrupted
    (a 30 ms pause in a 0.9 ms step): the policy still decodes plainly. A mean over the steps (the decayed sums
    this replaced) rated plain decoding at about 230 tokens/s and speculated."""
    policy = SpeculationPolicy((4, 0), explore_steps=8)
    plain = [(1, 0.9e-3)] * 8
    plain[5] = (1, 30e-3)
    explore(policy, 1, {4: [(5, 6e-3)] * 8, 0: plain})
    assert policy.rates()[1][0] > policy.rates()[1][4]
    choices = [policy.choose(1) for _ in range(40)]
    assert choices.count(0) >= 36  # plain, but for the probes of speculation


def test_steps_of_different_costs_keep_their_weight():
    """An n-gram step with no draft is cheap and one that verifies 4 drafts costs 2.5 times as much: both are the
    k's real cost, so its rate is all tokens over all seconds (not the median step's)."""
    policy = SpeculationPolicy((4, 0), explore_steps=8)
    explore(policy, 2, {4: [(1, 1e-3), (4, 2.5e-3)] * 4, 0: [(1, 0.8e-3)] * 8})  # 1,429 against 1,250 tokens/s
    assert policy.rates()[2][4] == pytest.approx(20 / 14e-3)
    assert policy.rates()[2][0] == pytest.approx(1 / 0.8e-3)
    assert [policy.choose(2) for _ in range(20)].count(4) >= 17


def test_the_window_follows_a_change_of_cost():
    """The drafts stop being accepted (speculation falls to 1 token a step): within a window of steps the policy
    turns to plain decoding."""
    policy = SpeculationPolicy((4, 0), explore_steps=4, window=8)
    explore(policy, 1, {4: [(5, 5e-3)] * 4, 0: [(1, 2e-3)] * 4})  # speculation 1,000 against plain 500 tokens/s
    steps = 0
    while policy.choose(1) == 4 and steps < 8:
        policy.record(1, 4, 1, 5e-3, run=10 + steps)  # now 200 tokens/s
        steps += 1
    assert 2 < steps < 8  # the first slower steps are outweighed by the window's earlier ones, not all of them
    assert [policy.choose(1) for _ in range(20)].count(0) >= 17


def test_the_first_steps_of_a_run_are_not_its_cost():
    """A probe of plain decoding after speculation: its first steps run slower than its steady ones (new shapes).
    Only the steps past `settle` are recorded, so the probe rates plain decoding at its steady 2,000 tokens/s and
    the policy turns to it (counting the first steps too would give 1,000 tokens/s and keep speculating)."""
    policy = SpeculationPolicy((4, 0), explore_steps=4, settle=4, probe_steps=8)
    for k, seconds in ((4, [4e-3] * 8), (0, [2e-3] * 4 + [0.5e-3] * 4)):  # speculation: 1,250 tokens/s
        for run, s in enumerate(seconds, 1):
            assert policy.choose(1) == k
            policy.record(1, k, 5 if k else 1, s, run)
    assert policy.rates()[1] == {4: pytest.approx(1250), 0: pytest.approx(2000)}
    assert policy.choose(1) == 0


@pytest.mark.parametrize("kwargs, named", [({"choices": (4,)}, "choices"), ({"choices": (4, 4)}, "choices"),
                                           ({"choices": (4, -1)}, "choice"), ({"window": 0}, "window"),
                                           ({"probe_steps": -1}, "probe_steps"), ({"outlier": 0}, "outlier"),
                                           ({"probe_steps": 4, "settle": 4}, "settle"),
                                           ({"probe_steps": 8, "probe_every": 8}, "probe_every"),
                                           ({"margin": -0.1}, "margin")])
def test_bad_settings_are_refused_by_name(kwargs, named):
    with pytest.raises(ValueError, match=named):
        SpeculationPolicy(**{"choices": (4, 0), **kwargs})


def test_a_tie_within_the_margin_decodes_plainly():
    """Speculation measured 3% faster than plain decoding is within the measurement's noise: the policy decodes
    plainly (a batch is never made slower for a gain it cannot show); 10% faster, it speculates."""
    for gain, expected in ((1.03, 0), (1.10, 4)):
        policy = SpeculationPolicy((4, 0), explore_steps=4)
        explore(policy, 1, {4: [(4, 4e-3 / gain)] * 4, 0: [(1, 1e-3)] * 4})
        assert [policy.choose(1) for _ in range(20)].count(expected) >= 17, gain
