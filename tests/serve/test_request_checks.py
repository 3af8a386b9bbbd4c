"""serve/request_checks.py against the field rules written again here, independently (plain type tests, the
constants restated): for any JSON value in any field the check answers (never raises) and accepts exactly what the
rules allow; a refusal names the field and the value; the issue's exact cases and the edges are pinned."""

import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve.request_checks import FIELDS, field_problem, request_problem

VOCAB = 259
EDGES = [None, True, False, 0, 1, -1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63, -2**63, 10**400, 0.0, -0.0, 0.5, 1.0,
         1.5, 1e-320, 3.4e38, 3.5e38, 1e308, math.nan, math.inf, -math.inf, "", "10", "x", [], [1], [1, 2],
         [True], [2**31], [-1], [259], [258], {}, {"a": 1}]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.sampled_from(EDGES),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=8)


def rule_allows(name, value, vocab=None):
    """The module docstring's table, restated: plain Python types only (JSON's), bools are not integers."""
    def integer(v):
        return type(v) is int

    def finite_number(v):
        return integer(v) or (type(v) is float and math.isfinite(v))

    def token_ids(v):
        return type(v) in (list, tuple) and all(integer(t) and 0 <= t < (vocab or 2**31) for t in v)

    return {
        "id": value is None or (type(value) is str and value != ""),
        "prompt": type(value) is str,
        "prompt_ids": token_ids(value),
        "stop": token_ids(value),
        "max_new_tokens": integer(value) and 1 <= value <= 2**31 - 1,
        "top_k": integer(value) and 0 <= value <= 2**31 - 1,
        "seed": value is None or (integer(value) and 0 <= value < 2**32),
        "temperature": finite_number(value) and 0 <= value <= 3.4028234663852886e38,
        "top_p": finite_number(value) and 0 < value <= 1,
        "min_p": finite_number(value) and 0 <= value <= 1,
        "logprobs": value is None or (integer(value) and 0 <= value <= 20),
    }[name]


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(name=st.sampled_from(FIELDS), value=json_values, vocab=st.sampled_from([None, VOCAB]))
def test_any_json_value_in_any_field_is_judged_by_the_rules(name, value, vocab):
    problem = field_problem(name, value, vocab_size=vocab)
    assert (problem is None) == rule_allows(name, value, vocab), problem
    if problem is not None:
        assert name in problem and len(problem) < 400


@settings(max_examples=200, deadline=None, database=None, derandomize=True)
@given(record=st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), json_values, max_size=5))
def test_any_json_object_gets_an_answer(record):
    problem = request_problem(record, vocab_size=VOCAB, max_seq_len=64)
    assert problem is None or isinstance(problem, str)
    if problem is None:  # then every field the rules know is good, and exactly one prompt is given
        assert set(record) <= set(FIELDS) and ("prompt" in record) != ("prompt_ids" in record)
        assert all(rule_allows(k, v, VOCAB) for k, v in record.items())


@pytest.mark.parametrize("record, message", [
    ({"prompt": "x", "top_k": 2147483648}, "top_k must be <= 2147483647, got 2147483648"),
    ({"prompt": "x", "max_new_tokens": "10"}, "max_new_tokens must be an integer, got '10'"),
    ({"prompt": "x", "stop": 5}, "stop must be a list of token ids, got 5"),
    ({"prompt": "x", "temperature": math.nan}, "temperature must be finite, got nan"),
    ({"prompt": "x", "top_p": math.inf}, "top_p must be finite, got inf"),
    ({"prompt": "x", "max_new_tokens": True}, "max_new_tokens must be an integer, got True"),
    ({"prompt": "x", "seed": 2**32}, "seed must be <= 4294967295, got 4294967296"),
    ({"prompt": "x", "temperature": 10**400}, "temperature must be >= 0 .*, got 1000"),
    ({"prompt": "x", "id": 7}, "id must be a non-empty string, got 7"),
    ({"prompt_ids": [1, True]}, r"prompt_ids\[1\] must be an integer token id, got True"),
    ({"prompt_ids": [1, 259]}, r"token id 259 is outside the vocabulary \[0, 259\) \(prompt_ids\[1\]\)"),
    ({"prompt_ids": []}, "the prompt is empty"),
    ({"prompt_ids": [1] * 10, "max_new_tokens": 55}, r"prompt \(10 tokens\) \+ max_new_tokens \(55\) = 65 exceeds"),
    ({"prompt": "x", "prompt_ids": [1]}, "give exactly one of 'prompt'"),
    ({"prompt": "x", "max_tokens": 3}, "unknown field 'max_tokens'"),
    ([1, 2], "a request must be a JSON object, got"),
])
def test_exact_cases_are_refused_by_name(record, message):
    problem = request_problem(record, vocab_size=VOCAB, max_seq_len=64)
    assert problem is not None
    assert re.search(message, problem), problem


def test_good_requests_and_numpy_scalars_pass_but_numpy_bools_do_not():
    good = {"id": "a", "prompt_ids": [0, 258], "max_new_tokens": 2**31 - 1, "temperature": 3.4e38, "top_k": 2**31 - 1,
            "top_p": 1, "seed": 2**32 - 1, "stop": []}
    assert request_problem(good, vocab_size=VOCAB) is None
    assert request_problem({"prompt": "x", "seed": None, "id": None}) is None
    assert field_problem("max_new_tokens", np.int64(3)) is None and field_problem("top_p", np.float32(0.5)) is None
    assert field_problem("top_k", np.bool_(True)) == "top_k must be an integer, got np.True_"


def test_a_huge_value_is_shown_cut():
    problem = field_problem("prompt", ["x"] * 100_000)
    assert problem.startswith("prompt must be a string, got ['x', ") and len(problem) < 120
