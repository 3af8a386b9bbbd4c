"""scripts/generate.py under bad requests and a failing server (issue 16): whatever one request holds, the other
requests of its batch are served, their greedy tokens equal to the naive decoder's, the bad one gets its error in
its own result line (its id the one the error names) and `main` returns 0; a failure of serving itself still writes
every finished result. `main` runs in-process on a tiny random model (`load` replaced: loading is
test_generate_cli's business); one engine per serving config is built and reused, so the step compiles once."""

import dataclasses
import math
import tempfile

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import scripts.generate
import serve.engine
from model.presets import get_preset
from model.transformer import create_model
from scripts.generate import main
from serve.naive import generate
from serve.request_checks import FIELDS
from tests.scripts.generate_batch import generate_batch
from train.tokenizer import ByteTokenizer

CFG = dataclasses.replace(get_preset("tiny"), dtype="float32", init_std=0.1)
FLAGS = ["--run", "unused (load is replaced)", "--decode-impl", "reference", "--page-size", "8", "--max-running", "4",
         "--token-budget", "32", "--temperature", "0"]
GOOD = [{"prompt": "def f(", "max_new_tokens": 5, "id": "good"},  # named by the caller
        {"prompt_ids": [1, 2, 3], "max_new_tokens": 4}]  # named by its place in the batch
EDGES = [None, True, 0, -1, 2**31 - 1, 2**31, 2**32, 2**63, 10**30, 0.5, 1e-320, 3.5e38, math.nan, math.inf,
         -math.inf, "", "10", [], [1, 2], [True], [2**31], [259], {}]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | st.sampled_from(EDGES),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=6)


@pytest.fixture(scope="module")
def model():
    """A tiny random model served through `main` (byte tokenizer, no stop ids) with one engine per config."""
    m, tok, engines, real_engine = create_model(CFG, seed=3), ByteTokenizer(), {}, serve.engine.Engine

    def engine(model, cfg, draft_model=None):
        if cfg not in engines:
            engines[cfg] = real_engine(model, cfg)
        return engines[cfg]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scripts.generate, "load", lambda args: (m, lambda t: tok.encode(t).tolist(), tok.decode, ()))
        mp.setattr(serve.engine, "Engine", engine)
        yield m


@pytest.fixture(scope="module")
def expected(model):
    """The naive decoder's greedy tokens for each GOOD request (one batched call: one compile)."""
    prompts = [ByteTokenizer().encode(r["prompt"]).tolist() if "prompt" in r else r["prompt_ids"] for r in GOOD]
    outputs = generate(model, prompts, max(r["max_new_tokens"] for r in GOOD))
    return [out[:r["max_new_tokens"]] for out, r in zip(outputs, GOOD, strict=True)]


def run_batch(records, folder, *flags):
    """`main` on a JSONL batch of `records`: (return code, result records)."""
    return generate_batch(folder, records, FLAGS + list(flags))


def check_good_served(expected, results, good_at):
    for i, record, tokens in zip(good_at, GOOD, expected, strict=True):
        assert results[i]["error"] is None and results[i]["finish_reason"] == "length", results[i]
        assert results[i]["token_ids"] == tokens
        assert results[i]["id"] == record.get("id", f"req-{i}")


def check_refused_by_its_own_id(result):
    assert result["finish_reason"] == "error" and result["token_ids"] == []
    assert result["error"].startswith(f"request {result['id']!r}: "), result


@settings(max_examples=30, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(fields=st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=5), json_values, min_size=1, max_size=3))
@example(fields={"top_k": 2**31}).via("issue 16")
@example(fields={"id": "\ud800", "prompt": "\udfff"}).via("lone surrogates")
def test_any_json_in_any_field_leaves_the_rest_of_the_batch_served(expected, fields):
    assume(fields.get("id") not in ("good", "req-2"))
    bad = {"prompt": "x", "max_new_tokens": 3, **fields}
    if "prompt_ids" in fields and "prompt" not in fields:
        del bad["prompt"]  # so that the prompt_ids value is the one judged
    with tempfile.TemporaryDirectory() as folder:
        code, results = run_batch([GOOD[0], bad, GOOD[1]], folder)
    assert code == 0 and len(results) == 3
    check_good_served(expected, results, (0, 2))
    if results[1]["error"] is not None:
        check_refused_by_its_own_id(results[1])
        assert results[1]["id"] == (bad["id"] if isinstance(bad.get("id"), str) and bad["id"] else "req-1")
    else:  # the fuzz happened to make a good request: served in full
        assert results[1]["finish_reason"] in ("stop", "length") and results[1]["token_ids"]


@pytest.mark.parametrize("field, value, message", [
    ("top_k", 2147483648, "top_k must be <= 2147483647, got 2147483648"),
    ("max_new_tokens", "10", "max_new_tokens must be an integer, got '10'"),
    ("stop", 5, "stop must be a list of token ids, got 5"),
])
def test_the_issues_bad_fields_lose_nothing(expected, tmp_path, field, value, message):
    bad = {"prompt": "y = ", "max_new_tokens": 3, field: value}
    code, results = run_batch([GOOD[0], bad, GOOD[1]], tmp_path)
    assert code == 0 and len(results) == 3
    check_good_served(expected, results, (0, 2))
    check_refused_by_its_own_id(results[1])
    assert results[1]["id"] == "req-1" and f"{tmp_path / 'p.jsonl'}:2: {message}" in results[1]["error"]


def test_an_engine_refusal_names_the_id_of_its_result(expected, tmp_path):
    """Token 999 is outside the vocabulary: only the engine knows (the model's vocabulary), and its error must
    name the request as the result does (it said 'req-1' of the result 'req-2')."""
    code, results = run_batch([GOOD[0], {"prompt_ids": [1, 999], "max_new_tokens": 2}, GOOD[1]], tmp_path)
    assert code == 0
    check_good_served(expected, results, (0, 2))
    check_refused_by_its_own_id(results[1])
    assert results[1]["id"] == "req-1" and "token id 999 is outside the vocabulary" in results[1]["error"]


def test_engine_generate_names_a_refused_request_as_its_error_does(model, expected):
    engine = serve.engine.Engine(model, serve.engine.ServeConfig(page_size=8, max_running=4, token_budget=32,
                                                                 decode_impl="reference"))
    ok = serve.engine.Request(tuple(GOOD[1]["prompt_ids"]), GOOD[1]["max_new_tokens"])
    results = engine.generate([ok, serve.engine.Request((1, 2), 0), ok])
    assert [r.error is None for r in results] == [True, False, True]
    assert results[1].error.startswith(f"request {results[1].request_id!r}: max_new_tokens must be >= 1")
    assert results[0].token_ids == results[2].token_ids == expected[1]


@pytest.mark.parametrize("flag, value", [("--temperature", "nan"), ("--top-p", "inf"), ("--top-k", "2147483648"),
                                         ("--max-new-tokens", "0")])
def test_a_bad_default_on_the_command_line_exits_2_naming_it(model, flag, value, capsys):
    with pytest.raises(SystemExit) as info:
        main(FLAGS + ["--prompt", "x", "--max-new-tokens", "2", flag, value])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"error: {flag}: " in err and f"got {value}" in err


def test_a_failure_of_serving_still_writes_every_finished_result(model, expected, tmp_path, monkeypatch):
    """The engine breaks at its 12th step (a device error, a bug): the two short requests have finished by then
    and are written, the long one is reported unfinished, and the exit code is 1."""
    engine = serve.engine.Engine(model, serve.engine.ServeConfig(page_size=8, max_running=4, token_budget=32,
                                                                 decode_impl="reference"))  # the shared one
    real_step, steps = engine.step, []

    def failing_step():
        steps.append(1)
        if len(steps) == 12:
            raise RuntimeError("the device is on fire")
        return real_step()

    monkeypatch.setattr(engine, "step", failing_step)
    monkeypatch.setattr(serve.engine, "Engine", lambda model, cfg, draft_model=None: engine)
    long = {"prompt_ids": [5, 6], "max_new_tokens": 40, "id": "long"}
    try:
        code, results = run_batch([GOOD[0], long, GOOD[1]], tmp_path)
    finally:  # leave the shared engine idle for the other tests
        monkeypatch.undo()
        for rid, done in list(engine.completions.items()):
            if not done.finished:
                engine.abort(rid)
    assert code == 1 and len(steps) == 12
    check_good_served(expected, results, (0, 2))
    assert results[1]["id"] == "long" and results[1]["finish_reason"] == "error"
    assert "not finished: generation stopped (RuntimeError('the device is on fire'))" in results[1]["error"]
    assert not (tmp_path / "out.jsonl.partial").exists()
