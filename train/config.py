"""`TrainConfig` and `RunConfig` (model + train + mesh), with `--set section.field=value` overrides."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any

from model.checks import check_float32, check_interval, check_ints, check_number, check_numbers
from model.config import ModelConfig
from parallel.mesh import MeshConfig

SECTIONS = ("model", "train", "mesh")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How a run trains. `batch_size` is the global batch in sequences per optimizer step, split into
    `grad_accum` micro-batches; the cosine schedule decays from `lr` to `lr * min_lr_ratio` over `steps`, and
    `extend_steps` more steps (`--extend`) continue a run at that final rate, so `steps` (the schedule) need not
    change to train longer.
    `tokenizer` names the tokenizer the text is read with ("bytes", a tokenizer.json, "hf:DIR", "gguf:FILE"; a
    run keeps its own copy, train/run_tokenizer.py); `init` the pretrained weights a fresh run starts from
    ("hf:DIR", "gguf:FILE", "run:DIR[@STEP]"; train/pretrained.py); `sft` makes `data` a JSONL of chat
    conversations trained on their assistant tokens only (train/sft.py)."""

    steps: int = 500
    extend_steps: int = 0
    batch_size: int = 32
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    seed: int = 0
    data_seed: int = 1
    data: str | None = None
    tokenizer: str = "bytes"
    init: str | None = None
    sft: bool = False
    val_fraction: float = 0.01
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 10

    def __post_init__(self) -> None:
        check_ints("train.", self, ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches",
                                    "keep_checkpoints", "log_every", "eval_every", "ckpt_every"))
        check_ints("train.", self, ("warmup_steps", "seed", "data_seed", "extend_steps"), minimum=0)
        if self.batch_size % self.grad_accum:
            raise ValueError(f"train.batch_size ({self.batch_size}) must be a multiple of train.grad_accum "
                             f"({self.grad_accum})")
        for name in ("lr", "eps", "clip_norm", "min_lr_ratio", "beta1", "beta2", "weight_decay", "val_fraction"):
            check_float32(f"train.{name}", getattr(self, name), " (in float32, as the optimizer uses it)")
        check_numbers("train.", self, ("lr", "eps", "clip_norm"))
        for name in ("min_lr_ratio", "beta1", "beta2"):
            check_interval(f"train.{name}", getattr(self, name), 0, 1)
        check_number("train.weight_decay", self.weight_decay, strict=False)
        check_interval("train.val_fraction", self.val_fraction, 0, 1, open_low=True, open_high=True)
        if self.init is not None and not self.init.startswith(("hf:", "gguf:", "run:")):
            raise ValueError(f"train.init {self.init!r}: expected hf:DIR, gguf:FILE or run:DIR[@STEP]")
        if self.sft and self.data is None:
            raise ValueError("train.sft needs train.data: a JSONL file of {\"messages\": [...]} conversations")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that defines a training run; written to `config.json` in the run directory. `mesh` says how
    the run is spread over devices (default: data parallel over all of them); it does not change the math, so
    a run may resume on a different mesh."""

    model: ModelConfig
    train: TrainConfig
    mesh: MeshConfig = MeshConfig(data=-1)

    def __post_init__(self) -> None:
        if self.train.seq_len > self.model.max_seq_len:
            raise ValueError(f"train.seq_len ({self.train.seq_len}) exceeds model.max_seq_len "
                             f"({self.model.max_seq_len})")
        if self.model.loss_chunks and self.train.seq_len % self.model.loss_chunks:
            raise ValueError(f"train.seq_len ({self.train.seq_len}) must be a multiple of model.loss_chunks "
                             f"({self.model.loss_chunks})")

    def to_dict(self) -> dict[str, Any]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        unknown = sorted(set(values) - set(SECTIONS))
        if unknown:
            raise ValueError(f"unknown config sections {unknown}; known sections are {list(SECTIONS)}")
        for name, kind in (("train", TrainConfig), ("mesh", MeshConfig)):
            bad = sorted(set(values.get(name, {})) - {f.name for f in dataclasses.fields(kind)})
            if bad:
                raise ValueError(f"unknown {name} config keys {bad}")
        mesh = MeshConfig(**values["mesh"]) if "mesh" in values else cls.mesh
        return cls(model=ModelConfig.from_dict(values.get("model", {})), train=TrainConfig(**values.get("train", {})),
                   mesh=mesh)


def parse_value(text: str, annotation: Any, key: str) -> Any:
    """`text` as a value of the declared type `annotation` (int, float, bool, str, or optional of those): the one
    parser of every `--set section.field=value` (train, model, mesh here; serve in scripts/serve_flags.py)."""
    hint, optional = annotation, False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = len(args) < len(typing.get_args(hint)), args[0]
    text = text.strip()
    if optional and text.lower() in ("none", "null", ""):
        return None
    try:
        if hint is bool:
            if text.lower() in ("true", "1", "yes", "on"):
                return True
            if text.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if hint is int:
            return int(text)
        if hint is float:
            return float(text)
        return text  # str, or a type the config's own validation checks
    except ValueError:
        kind = hint.__name__ + (" or none" if optional else "")
        raise ValueError(f"--set {key}={text}: expected a value of type {kind}") from None


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply `section.field=value` strings, e.g. `train.lr=3e-4`, `model.n_layers=4` or `mesh.fsdp=4`; values are
    parsed as the field's type and the result is validated. Raises ValueError naming the bad key or value."""
    sections = {name: getattr(cfg, name) for name in SECTIONS}
    changes: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for item in overrides:
        key, sep, text = item.partition("=")
        section, dot, field = key.strip().partition(".")
        if not sep or not dot:
            raise ValueError(f"--set {item!r}: expected section.field=value, e.g. train.lr=3e-4")
        if section not in sections:
            raise ValueError(f"--set {item!r}: unknown section {section!r}; use one of {', '.join(SECTIONS)}")
        field, dot, subfield = field.partition(".")
        hints = typing.get_type_hints(type(sections[section]))
        if field not in hints or bool(dot) != dataclasses.is_dataclass(hints[field]):
            raise ValueError(f"--set {item!r}: unknown key {key!r}; {section} keys are {sorted(hints)}")
        if not dot:
            changes[section][field] = parse_value(text.strip(), hints[field], key)
            continue
        nested = changes[section].get(field, getattr(sections[section], field))  # e.g. model.moe.n_experts
        sub_hints = typing.get_type_hints(type(nested))
        if subfield not in sub_hints:
            raise ValueError(f"--set {item!r}: unknown key {key!r}; {section}.{field} keys are {sorted(sub_hints)}")
        changes[section][field] = dataclasses.replace(
            nested, **{subfield: parse_value(text.strip(), sub_hints[subfield], key)})
    return RunConfig(**{name: dataclasses.replace(sections[name], **changes[name]) for name in SECTIONS})
