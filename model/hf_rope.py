"""RoPE in a Hugging Face config.json: `rope_theta` and the scaling, in and out.

transformers 4.x reads a top-level `rope_theta` and a `rope_scaling` dict ({"type" or "rope_type": ..., ...});
transformers 5 one `rope_parameters` dict that holds rope_theta too, and takes `rope_scaling` over it when a
config has both. Unscaled ("default") RoPE and YaRN ("yarn": DeepSeek-V3, Qwen's long-context configs) load into
`ModelConfig.rope_theta` / `rope_scaling`, with transformers' defaults for absent fields; any other type, a
partial rotary factor or an explicit YaRN attention_factor is refused by name.
"""

from __future__ import annotations

from typing import Any

from model.config import ModelConfig, RopeScaling

KEYS = ("rope_scaling", "rope_parameters")
YARN_KEYS = ("rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast",
             "beta_slow", "mscale", "mscale_all_dim", "truncate", "attention_factor", "partial_rotary_factor")


def rope_from_hf(hf_config: dict) -> tuple[float, RopeScaling]:
    """(rope_theta, RopeScaling) of a config.json dict; ValueError naming the key for what does not load."""
    scalings = {}
    for key in KEYS:
        rope = hf_config.get(key)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise ValueError(f"HF config {key} must be a dict or null, got {rope!r}")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"HF config {key} has partial_rotary_factor {rope['partial_rotary_factor']!r}; "
                             "only full rotary embeddings (1.0) are supported")
        scalings[key] = _scaling(hf_config, key, rope)
    if hf_config.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"HF config partial_rotary_factor {hf_config['partial_rotary_factor']!r} is not supported")
    if len(set(scalings.values())) > 1 and all(s.enabled for s in scalings.values()):
        raise ValueError(f"HF config rope_scaling and rope_parameters disagree: {hf_config['rope_scaling']!r} "
                         f"vs {hf_config['rope_parameters']!r}")
    scaling = next((s for s in scalings.values() if s.enabled), RopeScaling())
    params = hf_config.get("rope_parameters") or {}
    theta = params.get("rope_theta", hf_config.get("rope_theta"))
    return (float(theta) if theta is not None else 10000.0), scaling


def _scaling(hf_config: dict, key: str, rope: dict) -> RopeScaling:
    """The RopeScaling of one rope dict (transformers' defaults for absent YaRN fields)."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return RopeScaling()
    if kind != "yarn":
        raise ValueError(f"HF config {key} has rope_type {kind!r}; only unscaled 'default' RoPE and 'yarn' are "
                         f"supported")
    unknown = sorted(set(rope) - set(YARN_KEYS))
    if unknown:
        raise ValueError(f"HF config {key} (yarn) has keys {unknown} that are not supported; known keys are "
                         f"{list(YARN_KEYS)}")
    if rope.get("attention_factor") is not None:
        raise ValueError(f"HF config {key} has attention_factor {rope['attention_factor']!r}; only the factor "
                         f"YaRN derives from factor, mscale and mscale_all_dim is supported")
    original = rope.get("original_max_position_embeddings") or hf_config.get(
        "original_max_position_embeddings") or hf_config.get("max_position_embeddings")
    factor = rope.get("factor")
    if factor is None and original:  # transformers: the ratio of the context lengths
        factor = hf_config.get("max_position_embeddings", original) / original
    fields = {name: _number(rope.get(name) or default)  # transformers: null or 0 is the default
              for name, default in (("beta_fast", 32), ("beta_slow", 1), ("mscale", 0), ("mscale_all_dim", 0))}
    try:
        return RopeScaling(kind="yarn", factor=_number(factor), original_max_position_embeddings=original,
                           truncate=rope.get("truncate", True), **fields)
    except ValueError as e:
        raise ValueError(f"HF config {key} (yarn): {e}") from None


def _number(value: Any) -> Any:
    """An int as a float (config.json writes 40 for 40.0); anything else as it is, for RopeScaling to check."""
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def rope_to_hf(cfg: ModelConfig) -> dict:
    """The config.json keys of `cfg`'s RoPE: both spellings, as transformers 4.x and 5 read them."""
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    out: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_parameters": params}
    s = cfg.rope_scaling
    if s.kind == "yarn":
        scaling: dict[str, Any] = {"rope_type": "yarn", "factor": s.factor,
                                   "original_max_position_embeddings": s.original_max_position_embeddings,
                                   "beta_fast": s.beta_fast, "beta_slow": s.beta_slow}
        scaling.update({name: getattr(s, name) for name in ("mscale", "mscale_all_dim") if getattr(s, name)})
        if not s.truncate:
            scaling["truncate"] = False
        params.update(scaling)
        out["rope_scaling"] = scaling
    return out
