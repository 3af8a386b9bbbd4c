"""scripts/serve_flags.py: every ServeConfig field is reachable with `--set serve.FIELD=value`, parsed by its
declared type; the shorthands are the same settings; nothing given means ServeConfig's own defaults; bad names and
values exit 2 naming them (through scripts.generate and scripts.bench_serving). The expected values are written
out here, not derived from the parser."""

import argparse
import dataclasses
import typing

import pytest

import scripts.bench_serving
import scripts.generate
from scripts.serve_flags import add_serve_args, serve_argv, serve_config
from serve.engine import ServeConfig
from serve.forward import LAYER_LOOPS
from serve.ragged_attention import DECODE_IMPLS


def parsed(*argv):
    p = argparse.ArgumentParser()
    add_serve_args(p)
    args = p.parse_args(list(argv))
    return serve_config(args, [item for item in args.overrides])


def text_of(value):
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def a_different_value(name, value, hint):
    """A valid value of field `name` other than its default, of its declared type."""
    if name == "decode_impl":
        return next(x for x in DECODE_IMPLS if x != value)
    if name == "layer_loop":
        return next(x for x in LAYER_LOOPS if x != value)
    if name in ("num_pages", "memory_bytes"):
        return 7
    if name == "memory_fraction":
        return 0.5
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value * 2 if value else 3  # powers of two stay powers of two (page sizes, tiles, buckets)
    if isinstance(value, float):
        return value / 2
    if value is None:  # an optional int (e.g. max_prefill_chunk)
        return 40
    raise AssertionError(f"no test value for serve.{name} ({hint}); add one")


def test_nothing_given_is_serveconfigs_own_defaults():
    assert parsed() == ServeConfig()


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(ServeConfig) if f.name != "speculative"])
def test_every_field_is_reachable_and_parsed_by_its_type(field):
    hint = typing.get_type_hints(ServeConfig)[field]
    default = getattr(ServeConfig(), field)
    value = a_different_value(field, default, hint)
    cfg = parsed("--set", f"serve.{field}={text_of(value)}")
    assert getattr(cfg, field) == value and type(getattr(cfg, field)) is type(value)
    assert dataclasses.replace(cfg, **{field: default}) == ServeConfig()  # nothing else changed


def test_speculative_decoding_has_its_own_flags():
    from serve.speculation_config import SpeculativeConfig

    assert parsed("--speculative", "ngram", "--num-speculative-tokens", "3").speculative == SpeculativeConfig(
        method="ngram", num_tokens=3)
    assert parsed("--speculative", "draft:runs/tiny").speculative == SpeculativeConfig(method="draft")
    assert parsed("--speculative", "head:heads/h").speculative == SpeculativeConfig(method="head")
    assert parsed("--speculative", "ngram", "--fixed-speculative-tokens").speculative == SpeculativeConfig(
        method="ngram", adaptive=False)
    for argv, message in ((["--speculative", "eagle"], "expected 'ngram'"), (["--speculative", "draft:"], "draft"),
                          (["--num-speculative-tokens", "3"], "needs --speculative"),
                          (["--fixed-speculative-tokens"], "--fixed-speculative-tokens needs --speculative"),
                          (["--speculative", "ngram", "--num-speculative-tokens", "0"], "num_tokens"),
                          (["--set", "serve.speculative=ngram"], "--speculative and --num-speculative-tokens")):
        with pytest.raises(ValueError, match=message):
            parsed(*argv)



def test_speculative_mtp_needs_no_source_and_a_model_with_mtp():
    from model.presets import get_preset
    from scripts.serve_flags import load_draft_model
    from serve.speculation_config import SpeculativeConfig

    assert parsed("--speculative", "mtp").speculative == SpeculativeConfig(method="mtp")
    with pytest.raises(ValueError, match="expected 'ngram', 'mtp'"):
        parsed("--speculative", "mtp:runs/tiny")
    p = argparse.ArgumentParser()
    add_serve_args(p)
    args = p.parse_args(["--speculative", "mtp"])
    assert load_draft_model(args, get_preset("tiny").replace(mtp_depth=1)) is None  # the engine builds the head
    with pytest.raises(ValueError, match="mtp_depth 0"):
        load_draft_model(args, get_preset("tiny"))

def test_shorthands_are_the_same_settings_and_a_later_set_wins():
    impl = DECODE_IMPLS[-1]
    assert parsed("--page-size", "8", "--max-running", "3", "--token-budget", "64", "--kv-pages", "50",
                  "--decode-impl", impl) == ServeConfig(page_size=8, max_running=3, token_budget=64, num_pages=50,
                                                        decode_impl=impl)
    assert parsed("--page-size", "8", "--set", "serve.page_size=4").page_size == 4
    assert parsed("--set", "serve.max_prefill_chunk=none").max_prefill_chunk is None
    assert parsed("--set", "serve.prefix_caching=off").prefix_caching is False


def test_serve_argv_hands_the_same_settings_on():
    p = argparse.ArgumentParser()
    add_serve_args(p)
    args = p.parse_args(["--kv-pages", "50", "--set", "serve.page_size=4", "--max-running", "3"])
    argv = serve_argv(args)
    assert argv == ["--set", "serve.page_size=4", "--max-running", "3", "--kv-pages", "50"]
    assert parsed(*argv) == ServeConfig(page_size=4, max_running=3, num_pages=50)
    assert serve_argv(p.parse_args([])) == []
    spec = ["--speculative", "ngram", "--num-speculative-tokens", "2", "--fixed-speculative-tokens"]
    assert serve_argv(p.parse_args(spec)) == spec


@pytest.mark.parametrize("main", [scripts.generate.main, scripts.bench_serving.main])
@pytest.mark.parametrize("item, message", [
    ("serve.page_sise=8", "unknown field serve.page_sise"),
    ("serve.page_size=eight", "serve.page_size=eight: expected a value of type int"),
    ("serve.page_size=0", "serve.page_size must be a positive integer, got 0"),
    ("serve.prefix_caching=maybe", "serve.prefix_caching=maybe: expected a value of type bool"),
    ("serve.decode_impl=cuda", "serve.decode_impl must be one of"),
    ("serve.memory_fraction=half", "serve.memory_fraction=half: expected a value of type float or none"),
    ("server.page_size=8", "unknown section 'server'"),
    ("page_size=8", "expected SECTION.FIELD=VALUE"),
])
def test_a_bad_field_or_value_exits_2_naming_it(main, item, message, capsys, tmp_path):
    source = ["--run", str(tmp_path)] if main is scripts.generate.main else ["--preset", "tiny"]
    with pytest.raises(SystemExit) as info:
        main(source + ["--set", item, "--no-compilation-cache"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err, err
