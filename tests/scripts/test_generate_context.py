"""scripts/generate.py's output budget, streaming, exit code and timing report (issue 15), in-process on a tiny
random model (64-token context, byte tokenizer, no stop ids, so every request runs to its budget):
- no --max-new-tokens: a request generates up to the context; the command line's value that would overflow is
  clamped to the room its prompt leaves, with a warning in its result; a request's own overflowing value is its error;
- --stream prints each request's text in input order, equal to the decode of its tokens;
- the exit code is 1 when every request failed;
- stderr's summary has the load and compile times.
The tokens are checked against the naive decoder."""

import dataclasses
import json

import pytest

import scripts.generate
from model.presets import get_preset
from model.transformer import create_model
from serve.naive import generate
from tests.scripts.generate_batch import generate_batch
from train.tokenizer import ByteTokenizer

CFG = dataclasses.replace(get_preset("tiny"), dtype="float32", init_std=0.1)  # max_seq_len 64
LONG = list(range(10, 70))  # 60 tokens: 4 left in the context
SHORT = [1, 2, 3]
FLAGS = ["--run", "unused (load is replaced)", "--temperature", "0", "--page-size", "8", "--max-running", "4",
         "--token-budget", "64"]


@pytest.fixture(scope="module")
def model():
    m, tok = create_model(CFG, seed=3), ByteTokenizer()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scripts.generate, "load", lambda args: (m, lambda t: tok.encode(t).tolist(), tok.decode, ()))
        yield m


def run(tmp_path, records, *flags):
    return generate_batch(tmp_path, records, FLAGS + list(flags))


def summary_of(err):
    lines = [line for line in err.splitlines() if line.startswith("summary: ")]
    assert len(lines) == 1, err
    return json.loads(lines[0].removeprefix("summary: "))


def test_up_to_the_context_by_default_and_an_explicit_overflow_is_an_error(model, tmp_path, capsys):
    code, results = run(tmp_path, [{"prompt_ids": LONG}, {"prompt_ids": LONG, "max_new_tokens": 10},
                                   {"prompt_ids": SHORT, "max_new_tokens": 5}])
    assert code == 0
    long, overflow, short = results
    assert long["token_ids"] == generate(model, [LONG], 4)[0] and long["finish_reason"] == "length"
    assert long["warning"] is None and long["error"] is None
    assert overflow["finish_reason"] == "error" and overflow["token_ids"] == []
    assert "prompt (60 tokens) + max_new_tokens (10) = 70 exceeds the model's context of 64" in overflow["error"]
    assert short["token_ids"] == generate(model, [SHORT], 5)[0]
    summary = summary_of(capsys.readouterr().err)
    assert summary["errors"] == 1 and summary["output_tokens"] == 9
    for key in ("load_s", "compile_s", "serve_s"):
        assert isinstance(summary[key], float) and summary[key] >= 0
    assert summary["first_token_s"] > 0  # since this process (pytest's) started
    assert summary["compilation_cache"] is not None  # on by default (in a temporary folder: tests/scripts/conftest.py)


def test_the_command_lines_value_is_clamped_with_a_warning_and_streamed(model, tmp_path, capsys):
    code, results = run(tmp_path, [{"prompt_ids": LONG, "id": "long"}, {"prompt": "héllo"}], "--max-new-tokens",
                        "10", "--stream")
    assert code == 0
    long, short = results
    assert long["token_ids"] == generate(model, [LONG], 4)[0]
    assert long["warning"] == ("max_new_tokens clamped from 10 to 4: prompt (60 tokens) + 10 would exceed the "
                               "model's context of 64")
    prompt = ByteTokenizer().encode("héllo").tolist()
    assert short["token_ids"] == generate(model, [prompt], 10)[0] and short["warning"] is None
    captured = capsys.readouterr()
    assert "warning: request 'long': max_new_tokens clamped from 10 to 4" in captured.err
    decode = ByteTokenizer().decode
    bar = "=" * 72 + "\n"
    assert captured.out == (bar + decode(LONG) + decode(long["token_ids"]) + "\n"
                            + bar + "héllo" + decode(short["token_ids"]) + "\n" + bar)


def test_every_request_failed_is_exit_code_1(model, tmp_path, capsys):
    code, results = run(tmp_path, [{"prompt_ids": LONG, "max_new_tokens": 5}, {"prompt_ids": [1, 999]}])
    assert code == 1 and [r["finish_reason"] for r in results] == ["error", "error"]
    assert "error: every request failed (2 of 2)" in capsys.readouterr().err
