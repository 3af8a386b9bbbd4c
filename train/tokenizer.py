"""A byte-level tokenizer: ids 0-255 are the UTF-8 bytes, then BOS, EOS and PAD. Round-trips any text."""

from __future__ import annotations

import numpy as np


class ByteTokenizer:
    """Bytes as tokens: no vocabulary file, no unknown tokens, every UTF-8 string encodes and decodes exactly."""

    BOS = 256
    EOS = 257
    PAD = 258
    vocab_size = 259

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> np.ndarray:
        """Token ids (uint16) of `text`'s UTF-8 bytes, optionally framed by BOS/EOS."""
        ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)
        parts = ([np.array([self.BOS], np.uint16)] if bos else []) + [ids]
        parts += [np.array([self.EOS], np.uint16)] if eos else []
        return np.concatenate(parts)

    def decode(self, ids: np.ndarray | list[int]) -> str:
        """Text of the byte ids in `ids`; special ids are dropped and invalid UTF-8 is replaced, never raised."""
        arr = np.asarray(ids, dtype=np.int64)
        data = arr[(arr >= 0) & (arr < 256)].astype(np.uint8).tobytes()
        return data.decode("utf-8", errors="replace")

    def decode_bytes(self, ids: np.ndarray | list[int]) -> bytes:
        """The raw bytes of `ids` (special ids dropped): exact inverse of `encode` for any byte string."""
        arr = np.asarray(ids, dtype=np.int64)
        return arr[(arr >= 0) & (arr < 256)].astype(np.uint8).tobytes()
