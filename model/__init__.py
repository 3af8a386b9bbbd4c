"""What a model IS: configuration, layers, attention, the transformer, and HF weight import/export.

The names below load on first use (PEP 562), so `import model.config` stays light: no layers, no kernels."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"ModelConfig": "model.config", "PRESETS": "model.presets", "get_preset": "model.presets",
            "Transformer": "model.transformer", "create_model": "model.transformer"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
