"""The serving engine's settings on a command line: every `ServeConfig` field as `--set serve.FIELD=value`, a few
shorthands (`--page-size`, `--max-running`, `--token-budget`, `--kv-pages`, `--decode-impl`), and speculative
decoding (`--speculative ngram|mtp|draft:SOURCE|head:DIR`, `--num-speculative-tokens K`, `--fixed-speculative-tokens`:
a SpeculativeConfig and the draft model or head).

There is one set of defaults, `ServeConfig`'s own: a flag not given leaves its field alone. Values are parsed by the
field's declared type (int, float, bool, str, or an optional of those, where `none`/`null` is None); a shorthand is
the same as its `--set`, and a later `--set` of the same field wins. A bad field name or value is a `ValueError`
naming it, which the scripts turn into exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from scripts.common import fail
from train.config import parse_value

SHORTHANDS = {"page_size": "--page-size", "max_running": "--max-running", "token_budget": "--token-budget",
              "num_pages": "--kv-pages", "decode_impl": "--decode-impl"}


OWN_FLAGS = {"speculative": "--speculative and --num-speculative-tokens"}  # fields that are not one scalar
SPECULATIVE_FLAGS = ("--speculative", "--num-speculative-tokens", "--fixed-speculative-tokens")


def serve_fields() -> dict[str, Any]:
    """ServeConfig's scalar field names (those `--set` reaches) -> their declared types (resolved), in declaration
    order."""
    from serve.engine import ServeConfig

    hints = typing.get_type_hints(ServeConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(ServeConfig) if f.name not in OWN_FLAGS}


def serve_default(name: str) -> Any:
    """ServeConfig's default for field `name` (for help texts and for scripts that need it before a config)."""
    from serve.engine import ServeConfig

    return {f.name: f.default for f in dataclasses.fields(ServeConfig)}[name]


def decode_impls() -> tuple[str, ...]:
    """The choices of serve.decode_impl, as the engine checks them."""
    from serve.ragged_attention import DECODE_IMPLS

    return tuple(DECODE_IMPLS)


def add_serve_args(p: argparse.ArgumentParser, *, other_sections: str = "") -> None:
    """`--set` (serve.FIELD=VALUE; plus `other_sections`, e.g. "model", if the script reads those too) and the
    shorthands, all defaulting to None (= ServeConfig's default)."""
    sections = "serve" + (f" or {other_sections}" if other_sections else "")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help=f"override a setting ({sections}); repeatable; serve fields: {', '.join(serve_fields())}")
    p.add_argument("--page-size", type=int, help=f"= --set serve.page_size (default {serve_default('page_size')})")
    p.add_argument("--max-running", type=int,
                   help=f"sequences decoded together at most: = --set serve.max_running "
                        f"(default {serve_default('max_running')})")
    p.add_argument("--token-budget", type=int,
                   help=f"tokens per engine step at most: = --set serve.token_budget "
                        f"(default {serve_default('token_budget')})")
    p.add_argument("--kv-pages", type=int,
                   help="KV cache pages: = --set serve.num_pages (default: enough for --max-running full contexts, "
                        "up to 2 GiB)")
    p.add_argument("--decode-impl", choices=decode_impls(),
                   help=f"= --set serve.decode_impl (default {serve_default('decode_impl')})")
    p.add_argument("--speculative", metavar="ngram|mtp|draft:SOURCE|head:DIR",
                   help="speculative decoding: 'ngram' (prompt lookup), 'mtp' (the model's own multi-token "
                        "prediction module drafting: a model trained with --set model.mtp_depth=1 or more), "
                        "'draft:SOURCE', a smaller model with the same vocabulary drafting (SOURCE: a meshlm run "
                        "directory, hf:DIR or gguf:FILE), or 'head:DIR', a draft head trained on this model by "
                        "scripts/train_draft_head.py")
    p.add_argument("--num-speculative-tokens", type=int, metavar="K",
                   help="tokens drafted per decode step with --speculative, at most (default "
                        f"{speculative_default_tokens()}; the measured policy may draft about half, or none)")
    p.add_argument("--fixed-speculative-tokens", action="store_true", default=None,
                   help="draft K tokens at every decode step: the measured policy, which chooses K, about K / 2 or "
                        "none per batch size by tokens/s, off")


def speculative_default_tokens() -> int:
    from serve.speculation_config import SpeculativeConfig

    return SpeculativeConfig().num_tokens


def speculative_config(args: argparse.Namespace):
    """The SpeculativeConfig of --speculative and --num-speculative-tokens (None without --speculative); raises
    ValueError naming a bad value."""
    from serve.speculation_config import SpeculativeConfig

    spec = getattr(args, "speculative", None)
    k = getattr(args, "num_speculative_tokens", None)
    fixed = getattr(args, "fixed_speculative_tokens", None)
    if spec is None:
        for flag, value in (("--num-speculative-tokens", k), ("--fixed-speculative-tokens", fixed)):
            if value is not None:
                raise ValueError(f"{flag} needs --speculative")
        return None
    method, _, source = spec.partition(":")
    if (method in ("ngram", "mtp")) != (source == "") or method not in ("ngram", "mtp", "draft", "head"):
        raise ValueError(f"--speculative {spec!r}: expected 'ngram', 'mtp' (the model's own multi-token prediction "
                         "module), 'draft:SOURCE' (a run directory, hf:DIR or gguf:FILE) or 'head:DIR' (a draft "
                         "head from scripts/train_draft_head.py)")
    return SpeculativeConfig(method=method, adaptive=not fixed, **({} if k is None else {"num_tokens": k}))


def load_draft_model(args: argparse.Namespace, target_cfg=None):
    """The draft model of --speculative draft:SOURCE, or the draft head of head:DIR (checked against the target's
    `target_cfg` when given); None otherwise (with `mtp`, after checking that `target_cfg` has an MTP module).
    Raises FileNotFoundError or ValueError naming the source."""
    spec = getattr(args, "speculative", None) or ""
    if spec == "mtp" and target_cfg is not None and not target_cfg.mtp_depth:
        raise ValueError("--speculative mtp needs a model trained with multi-token prediction (model.mtp_depth >= 1), "
                         "but this model has model.mtp_depth 0")
    if spec.startswith("head:"):
        from model.draft_head import load_draft_head

        return load_draft_head(spec.partition(":")[2], target_cfg)[0]
    if not spec.startswith("draft:"):
        return None
    source = spec.partition(":")[2]
    kind, _, path = source.partition(":")
    if kind == "hf":
        from model.hf import load_hf

        return load_hf(path)
    if kind == "gguf":
        from model.gguf import load_gguf

        return load_gguf(path)
    from train.loop import load_params

    return load_params(source)[1]


def split_overrides(items: list[str], sections: tuple[str, ...] = ("serve",)) -> dict[str, list[str]]:
    """`--set` items grouped by section; raises ValueError naming an item without `section.field=` or of a section
    this script does not read."""
    groups: dict[str, list[str]] = {s: [] for s in sections}
    for item in items:
        key, sep, _ = item.partition("=")
        section, dot, field = key.strip().partition(".")
        if not sep or not dot or not field:
            raise ValueError(f"--set {item!r}: expected SECTION.FIELD=VALUE, e.g. serve.page_size=8")
        if section not in groups:
            raise ValueError(f"--set {item!r}: unknown section {section!r}; this command reads "
                             f"{', '.join(s + '.*' for s in sections)}")
        groups[section].append(item)
    return groups


def serve_changes(args: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
    """The ServeConfig fields the command line sets: shorthands first, then the `serve.*` overrides in order.
    Raises ValueError naming an unknown field or a value of the wrong type."""
    fields = serve_fields()
    changes: dict[str, Any] = {}
    for name, flag in SHORTHANDS.items():
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is not None and name in fields:
            changes[name] = value
    for item in overrides:
        key, _, text = item.partition("=")
        name = key.strip().partition(".")[2]
        if name in OWN_FLAGS:
            raise ValueError(f"--set {item!r}: serve.{name} is set with {OWN_FLAGS[name]}")
        if name not in fields:
            raise ValueError(f"--set {item!r}: unknown field serve.{name}; the serve fields are {', '.join(fields)}")
        changes[name] = parse_value(text, fields[name], key.strip())
    return changes


def serve_argv(args: argparse.Namespace) -> list[str]:
    """This command line's serve settings as arguments for another serving command: its `--set` items, then the
    shorthands it gave."""
    argv = [a for item in args.overrides for a in ("--set", item)]
    for flag in (*SHORTHANDS.values(), *SPECULATIVE_FLAGS):
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is True:
            argv.append(flag)
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def serve_config(args: argparse.Namespace, overrides: list[str], **base: Any):
    """The ServeConfig of the command line: `base` (a script's own settings, e.g. a benchmark's memory) under the
    command line's changes; validated by ServeConfig itself (its ValueError names field and value)."""
    from serve.engine import ServeConfig

    user = serve_changes(args, overrides)
    spec = speculative_config(args)
    if spec is not None:
        user["speculative"] = spec
    memory = ("num_pages", "memory_bytes", "memory_fraction")
    if any(user.get(k) is not None for k in memory):  # the user's cache size replaces the script's
        base = {k: v for k, v in base.items() if k not in memory}
    return ServeConfig(**{**base, **user})


def serve_config_or_exit(args: argparse.Namespace):
    """The ServeConfig of a command line that reads only `serve.*` overrides; a bad one exits 2 naming it."""
    try:
        return serve_config(args, split_overrides(args.overrides)["serve"])
    except ValueError as e:
        fail(str(e))
