"""train/data.py: batches as a pure function of (seed, step) cut from the token array, and the corpus loader
against the files' own bytes (documents separated by EOS = 257), split by file, cached by content."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from train.data import batch_at, default_corpus_files, load_corpus

EOS = 257

TOKENS = np.random.default_rng(0).integers(0, 259, size=5000).astype(np.uint16)


# ---------------------------------------------------------------- batch_at

def window_starts(tokens: np.ndarray, rows: np.ndarray) -> list[int]:
    """For each row, the offset where it occurs as a contiguous slice of `tokens` (asserts it occurs)."""
    L1 = rows.shape[1]
    windows = np.lib.stride_tricks.sliding_window_view(tokens.astype(np.int64), L1)  # [n - L1 + 1, L1]
    starts = []
    for row in rows:
        hits = np.flatnonzero((windows == row).all(axis=1))
        assert hits.size >= 1, "row is not a contiguous slice of the tokens"
        starts.append(int(hits[0]))
    return starts


def test_batch_at_is_a_pure_function_of_seed_and_step():
    a = batch_at(TOKENS, seed=3, step=10, batch_size=8, seq_len=32)
    assert a.shape == (8, 33) and a.dtype == np.int32
    np.testing.assert_array_equal(a, batch_at(TOKENS, seed=3, step=10, batch_size=8, seq_len=32))
    batch_at(TOKENS, seed=3, step=9, batch_size=8, seq_len=32)  # drawing other batches in between changes nothing
    np.testing.assert_array_equal(a, batch_at(TOKENS.copy(), seed=3, step=10, batch_size=8, seq_len=32))
    assert not np.array_equal(a, batch_at(TOKENS, seed=3, step=11, batch_size=8, seq_len=32))
    assert not np.array_equal(a, batch_at(TOKENS, seed=4, step=10, batch_size=8, seq_len=32))


def test_batch_rows_are_contiguous_windows():
    for step in range(3):
        batch = batch_at(TOKENS, seed=1, step=step, batch_size=16, seq_len=20)
        window_starts(TOKENS, batch)


def test_batch_offsets_cover_every_window():
    """Small text: over many draws every start 0 .. n - L - 1 appears (including the last full window)."""
    n, L = 20, 4
    tokens = np.arange(n, dtype=np.uint16) * 7 % 251  # all distinct: a window's first token names its start
    seen = set()
    for step in range(20):
        batch = batch_at(tokens, seed=0, step=step, batch_size=64, seq_len=L)
        seen.update(window_starts(tokens, batch))
    assert seen == set(range(n - L))


def test_batch_at_rejects_text_shorter_than_a_window():
    batch_at(TOKENS[:9], seed=0, step=0, batch_size=2, seq_len=8)  # exactly one window fits
    with pytest.raises(ValueError, match="8 tokens"):
        batch_at(TOKENS[:8], seed=0, step=0, batch_size=2, seq_len=8)


# ---------------------------------------------------------------- load_corpus

N_FILES = 40


def make_corpus(root: Path) -> dict[str, bytes]:
    """40 files of random bytes (each starting with its unique name, one empty), plus a .md file, a hidden file
    and a hidden folder. Returns name -> content for the visible files."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(42)
    contents = {}
    for i in range(N_FILES):
        name = f"doc_{i:02d}.txt"
        body = b"" if i == 7 else name.encode() + rng.integers(0, 256, size=int(rng.integers(0, 300)),
                                                               dtype=np.uint8).tobytes()
        contents[name] = body
    contents["notes.md"] = "# notes\nnon-ASCII: é ✓\n".encode()
    for name, body in contents.items():
        (root / name).write_bytes(body)
    (root / ".hidden.txt").write_bytes(b"hidden file")
    (root / ".git").mkdir()
    (root / ".git" / "config").write_bytes(b"hidden folder")
    return contents


def as_documents(tokens: np.ndarray) -> list[bytes]:
    """Split a token array on EOS into byte documents (every document ends with EOS)."""
    tokens = np.asarray(tokens)
    if tokens.size == 0:
        return []
    assert tokens[-1] == EOS
    ends = np.flatnonzero(tokens == EOS)
    docs, start = [], 0
    for end in ends:
        chunk = tokens[start:end]
        assert chunk.max(initial=0) < 256
        docs.append(chunk.astype(np.uint8).tobytes())
        start = end + 1
    return docs


def expected_tokens(contents: list[bytes]) -> np.ndarray:
    out = []
    for body in contents:
        out.extend(body)
        out.append(EOS)
    return np.asarray(out, np.uint16)


def split_names(corpus, contents: dict[str, bytes]) -> tuple[list[str], list[str]]:
    """Which files went to train and val, and checks that each split is exactly its files' bytes + EOS, in
    sorted-name order."""
    by_body = {body: name for name, body in contents.items()}
    assert len(by_body) == len(contents)  # contents are unique, so a document names its file
    names = []
    for tokens in (corpus.train, corpus.val):
        split = [by_body[doc] for doc in as_documents(tokens)]
        assert split == sorted(split)
        np.testing.assert_array_equal(np.asarray(tokens), expected_tokens([contents[n] for n in split]))
        names.append(split)
    return names[0], names[1]


@pytest.fixture
def corpus_dir(tmp_path):
    root = tmp_path / "data" / "corpus"
    return root, make_corpus(root)


def test_folder_corpus_is_the_files_bytes_split_by_file(corpus_dir, tmp_path):
    root, contents = corpus_dir
    corpus = load_corpus(root, cache_dir=tmp_path / "cache", val_fraction=0.25)
    assert corpus.train.dtype == np.uint16
    train, val = split_names(corpus, contents)
    assert train and val
    assert set(train).isdisjoint(val)
    assert set(train) | set(val) == set(contents)  # hidden files and folders are skipped
    assert (corpus.n_train_files, corpus.n_val_files) == (len(train), len(val))
    # about a quarter of 41 files (binomial: 3 sigma is about +-8)
    assert 2 <= len(val) <= 18


def test_split_is_deterministic_and_independent_of_location(corpus_dir, tmp_path):
    root, contents = corpus_dir
    first = split_names(load_corpus(root, cache_dir=tmp_path / "c1", val_fraction=0.25), contents)
    again = split_names(load_corpus(root, cache_dir=tmp_path / "c2", val_fraction=0.25), contents)
    assert first == again
    moved = tmp_path / "elsewhere" / "deeper" / "corpus"
    shutil.copytree(root, moved)
    assert split_names(load_corpus(moved, cache_dir=tmp_path / "c3", val_fraction=0.25), contents) == first


def test_cache_is_reused_and_invalidated(corpus_dir, tmp_path):
    root, contents = corpus_dir
    cache = tmp_path / "cache"
    first = load_corpus(root, cache_dir=cache, val_fraction=0.25)
    train_bin = cache / first.key / "train.bin"
    assert train_bin.is_file()
    stamp = train_bin.stat().st_mtime_ns
    second = load_corpus(root, cache_dir=cache, val_fraction=0.25)
    assert second.key == first.key
    assert train_bin.stat().st_mtime_ns == stamp  # not rewritten
    np.testing.assert_array_equal(second.train, first.train)

    contents["doc_03.txt"] = contents["doc_03.txt"] + b"appended text"
    (root / "doc_03.txt").write_bytes(contents["doc_03.txt"])
    third = load_corpus(root, cache_dir=cache, val_fraction=0.25)
    assert third.key != first.key
    split_names(third, contents)  # the new bytes, not the cached ones


def test_single_file_falls_back_to_a_tail_split(tmp_path):
    path = tmp_path / "one.txt"
    body = np.random.default_rng(5).integers(0, 256, size=999, dtype=np.uint8).tobytes()
    path.write_bytes(body)
    corpus = load_corpus(path, cache_dir=tmp_path / "cache", val_fraction=0.1)
    expected = expected_tokens([body])  # 1000 tokens
    assert (len(corpus.train), len(corpus.val)) == (900, 100)
    np.testing.assert_array_equal(np.concatenate([corpus.train, corpus.val]), expected)


def test_glob_pattern_selects_matching_files(corpus_dir, tmp_path):
    root, contents = corpus_dir
    txt = {name: body for name, body in contents.items() if name.endswith(".txt")}
    corpus = load_corpus(str(root / "*.txt"), cache_dir=tmp_path / "cache", val_fraction=0.25)
    train, val = split_names(corpus, txt)
    assert set(train) | set(val) == set(txt)
    recursive = load_corpus(str(root.parent / "**" / "*.md"), cache_dir=tmp_path / "cache", val_fraction=0.25)
    np.testing.assert_array_equal(np.concatenate([recursive.train, recursive.val]),
                                  expected_tokens([contents["notes.md"]]))


def test_missing_path_raises_naming_it(tmp_path):
    missing = tmp_path / "no" / "such" / "texts"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_corpus(missing, cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match=re.escape("*.nothing")):
        load_corpus(str(tmp_path / "*.nothing"), cache_dir=tmp_path / "cache")


def test_bad_val_fraction(corpus_dir, tmp_path):
    with pytest.raises(ValueError, match="val_fraction"):
        load_corpus(corpus_dir[0], cache_dir=tmp_path / "cache", val_fraction=1.0)


def test_default_corpus_is_the_standard_library():
    files = default_corpus_files()
    assert len(files) > 100
    assert all(f.suffix == ".py" for f in files)
    assert not any(part in ("site-packages", "dist-packages") for f in files for part in f.parts)
    assert files == sorted(files)
    assert any(f.name == "os.py" for f in files)
    assert sum(os.path.getsize(f) for f in files) > 10 * 2**20
