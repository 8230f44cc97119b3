"""Byte-level language-modelling data: the Python standard library's own ``.py`` sources (every machine
has them, nobody here wrote them), or any text file or folder.

1. List the files (sorted by relative path, so the list is the same on every run and machine layout).
2. Shuffle the list with ``random.Random(seed)`` and put ``val_fraction`` of the files (at least one)
   into validation: the split is by file, so no validation text leaks into training.
3. Concatenate each split's bytes (files separated by a blank line) into one ``uint8`` tensor:
   the vocabulary is the 256 byte values.
4. Training batches are windows at positions drawn from a generator seeded by ``(seed, batch index)``:
   batch ``i`` is a pure function of ``i``, so resuming at micro-batch ``i`` replays the same data.
   Validation batches are fixed, evenly spaced windows of the validation split.
"""

from __future__ import annotations

import math
import os
import random
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import SpecError

VOCAB_SIZE = 256
TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".toml", ".json", ".cfg", ".ini", ".c", ".h", ".html")
_SEPARATOR = b"\n\n"
_SKIPPED = {"site-packages", "dist-packages", "__pycache__"}


@dataclass
class Corpus:
    """Two byte streams (``train``, ``validation``; ``uint8`` tensors) and the files each came from
    (paths relative to ``root``)."""

    train: torch.Tensor
    validation: torch.Tensor
    train_files: list[str] = field(default_factory=list)
    validation_files: list[str] = field(default_factory=list)
    root: str = ""
    source: str = ""

    @property
    def vocab_size(self) -> int:
        """Number of token values (bytes)."""
        return VOCAB_SIZE

    def summary(self) -> dict[str, object]:
        """Sizes for logs: files and bytes per split, and where the text came from."""
        return {"source": self.source, "root": self.root, "train_files": len(self.train_files),
                "validation_files": len(self.validation_files), "train_bytes": int(self.train.numel()),
                "validation_bytes": int(self.validation.numel())}


def stdlib_root() -> Path:
    """The folder of the running Python's standard library (``sysconfig.get_paths()["stdlib"]``)."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_files(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files under ``root`` ending in one of ``suffixes``, sorted by relative path; ``site-packages``,
    ``__pycache__`` and hidden folders (installed third-party code, bytecode) are not entered."""
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in _SKIPPED and not d.startswith(".")]
        files.extend(Path(folder) / name for name in names if name.endswith(suffixes))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def load_corpus(source: str | Path = "stdlib", val_fraction: float = 0.05, seed: int = 0,
                max_bytes: int | None = None) -> Corpus:
    """Load a byte-level corpus from ``"stdlib"`` (the standard library's ``.py`` files), a text file
    (the last ``val_fraction`` of its bytes is validation) or a folder of text files
    (split by file). ``max_bytes`` caps the total bytes read (files are taken in the shuffled order, so
    the cap keeps a random, still deterministic subset). Raises SpecError for a missing or empty source.
    """
    if not 0.0 < val_fraction < 1.0:
        raise SpecError(f"validation fraction {val_fraction} must be between 0 and 1; use e.g. 0.05")
    check_source(source)
    if str(source) == "stdlib":
        root, suffixes, name = stdlib_root(), (".py",), "stdlib"
    else:
        root, suffixes, name = Path(source), TEXT_SUFFIXES, str(source)
    if root.is_file():
        return _single_file_corpus(root, val_fraction, max_bytes)
    files = list_files(root, suffixes)
    if len(files) < 2:
        raise SpecError(f"--data {source}: found {len(files)} text files ({', '.join(suffixes)}); "
                        "a folder needs at least 2 so that validation is a separate file")
    order = list(range(len(files)))
    random.Random(seed).shuffle(order)
    n_validation = max(1, round(len(files) * val_fraction))
    validation_ids, train_ids = order[:n_validation], order[n_validation:]
    budget = None if max_bytes is None else (int(max_bytes * val_fraction), max_bytes - int(max_bytes * val_fraction))
    validation, validation_names = _read(files, validation_ids, root, None if budget is None else budget[0])
    train, train_names = _read(files, train_ids, root, None if budget is None else budget[1])
    if validation.numel() == 0 or train.numel() == 0:
        raise SpecError(f"--data {source}: a split is empty (the files hold no bytes); add text files")
    return Corpus(train, validation, train_names, validation_names, str(root), name)


def check_source(source: str | Path) -> None:
    """Raise SpecError unless ``source`` is ``stdlib`` or an existing file or folder."""
    if str(source) != "stdlib" and not Path(source).exists():
        raise SpecError(f"--data {source} does not exist; pass stdlib, a text file or a folder of text files")


def _read(files: list[Path], ids: list[int], root: Path, budget: int | None) -> tuple[torch.Tensor, list[str]]:
    chunks: list[bytes] = []
    names: list[str] = []
    total = 0
    for index in ids:
        if budget is not None and total >= budget:
            break
        data = files[index].read_bytes()
        if budget is not None:
            data = data[: budget - total]
        if not data:
            continue
        chunks.append(data)
        names.append(files[index].relative_to(root).as_posix())
        total += len(data) + len(_SEPARATOR)
    blob = _SEPARATOR.join(chunks)
    if not blob:
        return torch.empty(0, dtype=torch.uint8), names
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone(), names


def minimum_bytes(seq: int, val_fraction: float) -> int:
    """The smallest ``max_bytes`` that leaves one window of ``seq`` tokens (plus its next-token target and
    one spare byte) in both the training and the validation split."""
    needed = seq + 2

    def smallest_split(total: int) -> int:  # a folder splits the budget as below, a single file by its cut
        validation, cut = int(total * val_fraction), int(total * (1 - val_fraction))
        return min(validation, total - validation, cut, total - cut)

    total = max(math.ceil(needed / val_fraction), math.ceil(needed / (1 - val_fraction)))
    while smallest_split(total) < needed:
        total += 1
    return total


def check_max_bytes(max_bytes: int | None, seq: int, val_fraction: float) -> None:
    """Raise SpecError when ``max_bytes`` is too small for one (batch, seq) window in each split, naming
    the minimum."""
    if max_bytes is None:
        return
    least = minimum_bytes(seq, val_fraction)
    if max_bytes < least:
        raise SpecError(f"--max-bytes {max_bytes} is too small for one batch: training and validation each need "
                        f"{seq + 2} bytes at --seq {seq}, so --max-bytes must be ≥ {least} (at --val-fraction "
                        f"{val_fraction:g})")


def _single_file_corpus(path: Path, val_fraction: float, max_bytes: int | None) -> Corpus:
    blob = path.read_bytes()[:max_bytes]
    cut = int(len(blob) * (1 - val_fraction))
    if cut == 0 or cut == len(blob):
        raise SpecError(f"--data {path}: {len(blob)} bytes are too few to split into train and validation")
    data = torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone()
    return Corpus(data[:cut].clone(), data[cut:].clone(), [path.name], [path.name], str(path.parent), str(path))


class Batches:
    """Deterministic (batch, seq) windows of ``int64`` byte tokens from one split.

    ``batch(i)`` draws window starts from a generator seeded by ``seed * 1_000_003 + i``: any batch can be
    reproduced from its index alone, which is all a checkpoint needs to resume the data stream.
    """

    def __init__(self, stream: torch.Tensor, batch: int, seq: int, seed: int = 0) -> None:
        if stream.numel() <= seq + 1:
            raise SpecError(f"the data split has {stream.numel()} bytes, fewer than --seq {seq} + 1; "
                            "use more data or a shorter --seq")
        if batch < 1 or seq < 2:
            raise SpecError(f"batch {batch} and seq {seq} must be ≥ 1 and ≥ 2")
        self.stream = stream
        self.batch_size = batch
        self.seq = seq
        self.seed = seed

    def batch(self, index: int) -> torch.Tensor:
        """The ``index``-th training batch: a (batch, seq) int64 tensor of byte values."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        starts = torch.randint(0, self.stream.numel() - self.seq, (self.batch_size,), generator=generator)
        return self._windows(starts)

    def fixed(self, count: int) -> list[torch.Tensor]:
        """``count`` batches of evenly spaced windows covering the split (for validation)."""
        total = count * self.batch_size
        last = self.stream.numel() - self.seq
        starts = torch.linspace(0, last, total).long()
        return [self._windows(starts[i * self.batch_size:(i + 1) * self.batch_size]) for i in range(count)]

    def _windows(self, starts: torch.Tensor) -> torch.Tensor:
        offsets = torch.arange(self.seq)
        return self.stream[starts[:, None] + offsets[None, :]].long()

    def __iter__(self) -> Iterator[torch.Tensor]:
        index = 0
        while True:
            yield self.batch(index)
            index += 1
