"""The byte-level corpus: deterministic file split, by-index batches, text files and folders, errors."""

from __future__ import annotations

import pytest
import torch

from effcompile.errors import SpecError
from effcompile.train.data import Batches, load_corpus, stdlib_root

MAX_BYTES = 200_000


@pytest.fixture(scope="module")
def corpus():
    return load_corpus("stdlib", seed=0, max_bytes=MAX_BYTES)


def test_stdlib_corpus_is_deterministic(corpus):
    again = load_corpus("stdlib", seed=0, max_bytes=MAX_BYTES)
    assert torch.equal(corpus.train, again.train) and torch.equal(corpus.validation, again.validation)
    assert corpus.train_files == again.train_files and corpus.validation_files == again.validation_files


def test_stdlib_split_is_by_file_and_seeded(corpus):
    assert corpus.root == str(stdlib_root())
    assert corpus.train_files and corpus.validation_files
    assert not set(corpus.train_files) & set(corpus.validation_files)
    assert all(name.endswith(".py") and "site-packages" not in name
               for name in corpus.train_files + corpus.validation_files)
    assert corpus.train.dtype == torch.uint8 and corpus.vocab_size == 256
    assert corpus.train.numel() + corpus.validation.numel() <= MAX_BYTES
    other = load_corpus("stdlib", seed=1, max_bytes=MAX_BYTES)
    assert other.validation_files != corpus.validation_files


def test_batches_are_a_function_of_their_index(corpus):
    batches = Batches(corpus.train, batch=3, seq=16, seed=0)
    first = batches.batch(5)
    assert first.shape == (3, 16) and first.dtype == torch.int64
    assert int(first.max()) < 256 and int(first.min()) >= 0
    assert torch.equal(first, Batches(corpus.train, 3, 16, seed=0).batch(5))
    assert not torch.equal(first, batches.batch(6))
    assert not torch.equal(first, Batches(corpus.train, 3, 16, seed=1).batch(5))
    assert torch.equal(next(iter(batches)), batches.batch(0))
    # A window is a contiguous slice of the stream.
    stream = bytes(corpus.train.tolist())
    assert bytes(first[0].tolist()) in stream


def test_fixed_validation_batches(corpus):
    batches = Batches(corpus.validation, batch=2, seq=8)
    fixed = batches.fixed(4)
    assert len(fixed) == 4 and all(b.shape == (2, 8) for b in fixed)
    assert all(torch.equal(a, b) for a, b in zip(fixed, batches.fixed(4)))
    assert torch.equal(fixed[0][0], corpus.validation[:8].long())
    assert torch.equal(fixed[-1][-1], corpus.validation[-8:].long())


def test_text_file_and_folder(tmp_path):
    text = tmp_path / "book.txt"
    text.write_bytes(b"abcdefghij" * 100)
    single = load_corpus(text, val_fraction=0.1)
    assert single.train.numel() == 900 and single.validation.numel() == 100
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(10):
        (folder / f"{i}.md").write_text(f"document {i}\n" * 20)
    (folder / "image.png").write_bytes(b"\x89PNG")
    split = load_corpus(folder, val_fraction=0.2, seed=3)
    assert len(split.validation_files) == 2 and len(split.train_files) == 8
    assert split.summary()["train_files"] == 8
    assert load_corpus(folder, val_fraction=0.2, seed=3).validation_files == split.validation_files


def test_errors(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_corpus(tmp_path / "missing")
    (tmp_path / "only.txt").write_text("x" * 100)
    with pytest.raises(SpecError, match="at least 2"):
        load_corpus(tmp_path)
    with pytest.raises(SpecError, match="between 0 and 1"):
        load_corpus("stdlib", val_fraction=1.5)
    with pytest.raises(SpecError, match="fewer than --seq"):
        Batches(torch.zeros(10, dtype=torch.uint8), batch=1, seq=32)
