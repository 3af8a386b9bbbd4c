"""Training text: the embedded default corpus, user text, a token cache, and batches as a pure function of
(seed, step).

The default corpus is the Python standard library's own source: every `*.py` under
`sysconfig.get_paths()["stdlib"]`, test folders included (about 30 MB for CPython 3.11; the tests are real,
varied code and double the data), `site-packages` excluded. It is on every machine that runs meshlm.

Text is tokenized once (by the run's tokenizer, bytes by default; documents separated by its EOS) into uint16
files (uint32 for vocabularies over 65,536) in a cache folder keyed by the files' names, sizes and modification
times and by the tokenizer's fingerprint, and memory-mapped from then on. The train/validation split is by
file, decided by a hash of each file's path, so it is the same on every machine and never leaks a file across.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import sysconfig
import zlib
from pathlib import Path

import numpy as np

from train.run_tokenizer import AnyTokenizer, fingerprint, separator_id
from train.tokenizer import ByteTextTokenizer, TextTokenizer

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Tokenized text split by file: `train` and `val` are flat token arrays (memory-mapped). Chat data for SFT
    (train/sft.py) adds `train_weights` / `val_weights`, the loss weight of each token (1 on assistant tokens)."""

    train: np.ndarray
    val: np.ndarray
    key: str
    n_train_files: int
    n_val_files: int
    train_weights: np.ndarray | None = None
    val_weights: np.ndarray | None = None


def default_corpus_files() -> list[Path]:
    """The standard library's `*.py` files (tests included, third-party packages excluded), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py")
                  if p.is_file() and not EXCLUDED_DIRS.intersection(p.relative_to(root).parts))


def resolve_files(spec: str | os.PathLike | None) -> list[Path]:
    """Files named by `spec`: None = the default corpus; a file; a folder (all files below it, hidden ones
    skipped); or a glob pattern (`**` recursive). Raises FileNotFoundError naming `spec` if it matches nothing."""
    if spec is None:
        files = default_corpus_files()
    else:
        path = Path(spec).expanduser()
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
        else:
            files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if not files:
        raise FileNotFoundError(f"no text files found for --data {str(spec)!r}")
    return files


def is_validation_file(path: Path, val_fraction: float) -> bool:
    """Deterministic file-level split: a stable hash of the file's name and parent picks about val_fraction."""
    name = "/".join(path.parts[-2:]).encode()
    return zlib.crc32(name) / 2**32 < val_fraction


def _cache_key(files: list[Path], val_fraction: float, tokenizer_key: str = "bytes") -> str:
    tokens = "" if tokenizer_key == "bytes" else f" {tokenizer_key}"  # byte caches keep their old keys
    h = hashlib.sha256(f"v{FORMAT_VERSION} {val_fraction!r}{tokens}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _encoded(files: list[Path], tokenizer: AnyTokenizer, batch: int = 64):
    """Each file's token ids, in order (a real tokenizer encodes `batch` files at a time, in parallel)."""
    if isinstance(tokenizer, ByteTextTokenizer):
        for f in files:
            yield np.frombuffer(f.read_bytes(), dtype=np.uint8)
        return
    assert isinstance(tokenizer, TextTokenizer)
    for i in range(0, len(files), batch):
        texts = [f.read_bytes().decode("utf-8", errors="replace") for f in files[i:i + batch]]
        for encoding in tokenizer.backend.encode_batch(texts, add_special_tokens=False):
            yield np.asarray(encoding.ids)


def _write_tokens(files: list[Path], out: Path, tokenizer: AnyTokenizer | None = None) -> int:
    tokenizer = tokenizer or ByteTextTokenizer()
    dtype = token_dtype(tokenizer.vocab_size)
    eos = np.array([separator_id(tokenizer)], dtype)
    n = 0
    with open(out, "wb") as fh:
        for ids in _encoded(files, tokenizer):
            fh.write(ids.astype(dtype).tobytes())
            fh.write(eos.tobytes())
            n += ids.size + 1
    return n


def default_cache_dir() -> Path:
    return Path(os.environ.get("MESHLM_CACHE_DIR", Path.home() / ".cache" / "meshlm")) / "tokens"


def load_corpus(spec: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None,
                val_fraction: float = 0.01, tokenizer: AnyTokenizer | None = None) -> Corpus:
    """Tokenize (once, cached) with `tokenizer` (default: bytes) and memory-map the text named by `spec` (see
    `resolve_files`).

    A single file cannot be split by file: its last `val_fraction` of tokens becomes the validation split."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    files = resolve_files(spec)
    tokenizer = tokenizer or ByteTextTokenizer()
    key = _cache_key(files, val_fraction, fingerprint(tokenizer))
    dtype = token_dtype(tokenizer.vocab_size)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = folder / key
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        val_files = [f for f in files if is_validation_file(f, val_fraction)]
        train_files = [f for f in files if not is_validation_file(f, val_fraction)]
        if not train_files or not val_files:
            train_files, val_files = files, []
        tmp = folder / f".tmp-{os.getpid()}"
        tmp.mkdir(exist_ok=True)
        n_train = _write_tokens(train_files, tmp / "train.bin", tokenizer)
        n_val = _write_tokens(val_files, tmp / "val.bin", tokenizer)
        meta = {"key": key, "n_train": n_train, "n_val": n_val, "n_train_files": len(train_files),
                "n_val_files": len(val_files), "files": len(files)}
        (tmp / "meta.json").write_text(json.dumps(meta))
        for name in ("train.bin", "val.bin", "meta.json"):  # meta.json last: its presence marks completion
            os.replace(tmp / name, folder / name)
        tmp.rmdir()
        log.info("tokenized %d files into %s (%d train, %d val tokens)", len(files), folder, n_train, n_val)
    meta = json.loads(meta_path.read_text())
    train = np.memmap(folder / "train.bin", dtype=dtype, mode="r", shape=(meta["n_train"],))
    val = (np.memmap(folder / "val.bin", dtype=dtype, mode="r", shape=(meta["n_val"],))
           if meta["n_val"] else np.zeros((0,), dtype))
    if meta["n_val_files"] == 0:
        cut = int(len(train) * (1 - val_fraction))
        train, val = train[:cut], train[cut:]
    return Corpus(train=train, val=val, key=key, n_train_files=meta["n_train_files"],
                  n_val_files=meta["n_val_files"])


def check_corpus(corpus: Corpus, seq_len: int, spec: str | os.PathLike | None = None) -> None:
    """Raise ValueError naming `spec` (the --data argument) if either split of `corpus` is shorter than one window
    of `seq_len + 1` tokens, so that too little text is reported before anything is compiled or written."""
    for name, tokens, hint in (("training", corpus.train, ""),
                               ("validation", corpus.val, "; or, for a single file, a larger train.val_fraction")):
        if len(tokens) < seq_len + 1:
            source = repr(str(spec)) if spec is not None else "(the default corpus)"
            raise ValueError(f"--data {source}: the {name} split has {len(tokens)} tokens, fewer than one window "
                             f"of train.seq_len + 1 = {seq_len + 1}; give more text or a shorter train.seq_len{hint}")


def batch_at(tokens: np.ndarray, *, seed: int, step: int, batch_size: int, seq_len: int) -> np.ndarray:
    """Batch number `step` of the stream named by `seed`: [batch_size, seq_len + 1] int32 windows at offsets
    drawn from a generator seeded by (seed, step) alone, so any step can be reproduced without replaying the
    ones before it (exact resume)."""
    return windows_at(tokens, seed=seed, step=step, batch_size=batch_size, seq_len=seq_len)


def windows_at(tokens: np.ndarray, *, seed: int, step: int, batch_size: int, seq_len: int,
               rows: np.ndarray | None = None) -> np.ndarray:
    """Rows `rows` (default: all) of `batch_at(...)`, reading only those windows: what one host of a
    multi-host run loads."""
    n = len(tokens)
    if n < seq_len + 1:
        raise ValueError(f"the text has {n} tokens, fewer than one window of seq_len + 1 = {seq_len + 1}")
    rng = np.random.Generator(np.random.PCG64([seed, step]))
    starts = rng.integers(0, n - seq_len, size=batch_size)
    if rows is not None:
        starts = starts[np.asarray(rows)]
    return np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)], dtype=np.int32)
