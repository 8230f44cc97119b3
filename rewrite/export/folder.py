"""The output-folder protocol: effcompile replaces only what it wrote, one writer at a time, atomically.

1. Every folder effcompile writes carries ``effcompile.json`` (``{"format": "effcompile-output", "version":
   1, "kind": "module" | "train-log"}``). A non-empty folder without it is never replaced or written
   into, ``--force`` or not; a folder of the other kind is refused too.
2. A writer holds ``fcntl.flock`` on ``DIR.lock`` (beside ``DIR``) from its up-front checks to the end, so
   a second writer of the same ``DIR`` stops at once (exit 2) naming the first one's pid. The lock file
   is removed when the holder finishes; one left by a killed run is reused.
3. A module folder is written into ``DIR.partial-<pid>`` (made with the process umask, like any folder)
   and published by swapping it with ``DIR`` in one ``renameat2(RENAME_EXCHANGE)``, then deleting the old
   contents (where the kernel or file system lacks the exchange: ``DIR`` → ``DIR.old-<pid>``, staging →
   ``DIR``, delete the old). A kill at any moment leaves the old or the new ``DIR``; the next writer
   removes ``.partial-`` / ``.old-`` folders whose process is gone, restoring a ``DIR.old-<pid>`` first
   if ``DIR`` itself is missing. A replaced folder keeps its permission bits.
4. Any OSError while writing (disk full, permissions) is one OutputError line; nothing partial stays.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import EffcompileError, OutputError

MARKER = "effcompile.json"
FORMAT = "effcompile-output"
VERSION = 1
MODULE, TRAIN_LOG = "module", "train-log"
_KIND_WORDS = {MODULE: "compiled module (effcompile --out)", TRAIN_LOG: "training run (effcompile train --out)"}
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def read_marker(folder: str | Path) -> dict[str, Any] | None:
    """The marker of a folder effcompile wrote, or None (absent, unreadable or not effcompile's)."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == FORMAT else None


def write_marker(folder: str | Path, kind: str) -> None:
    """Write ``effcompile.json`` (format, version, kind) into ``folder``."""
    (Path(folder) / MARKER).write_text(json.dumps({"format": FORMAT, "version": VERSION, "kind": kind}) + "\n")


def _resolved(out: str | Path) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(out))))


def check_output_dir(out: str | Path, force: bool, kind: str = MODULE, protect: Sequence[str | Path] = ()) -> Path:
    """Check, before any work, that ``out`` can be written as a ``kind`` folder: not a file, under a folder
    that exists or can be made, not the current folder or one holding it or a ``protect`` path, empty or
    absent unless it carries effcompile's marker of the same kind (then only with ``force``; a log folder
    is checked by ``claim_log_dir``), and not being written by another run. Returns the resolved path.
    Raises OutputError."""
    try:
        return _check_output_dir(out, force, kind, protect)
    except OSError as error:  # e.g. a folder on the way that this user cannot read
        raise OutputError(f"--out {out}: {error.strerror or error} ({error.filename}); pass a folder you can "
                          "write") from None


def _check_output_dir(out: str | Path, force: bool, kind: str, protect: Sequence[str | Path]) -> Path:
    path = _resolved(out)
    if path.exists() and not path.is_dir():
        raise OutputError(f"--out {out} is a file; pass a folder path")
    _check_parent(out, path)
    if kind == MODULE:  # a module folder is replaced as a whole; a log folder only gets files added
        cwd = Path.cwd().resolve()
        if path == cwd or path in cwd.parents:
            raise OutputError(f"--out {out} is the current folder or holds it; pass a new folder, e.g. --out build/model")
        for kept in protect:
            kept_path = _resolved(kept)
            if path == kept_path or path in kept_path.parents:
                raise OutputError(f"--out {out} holds {kept}; pass a folder that does not hold your input")
        if path.is_dir() and any(path.iterdir()):
            _check_replaceable(out, path, force, kind)
    _check_unlocked(out, path)
    return path


def _check_parent(out: str | Path, path: Path) -> None:
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"--out {out}: {ancestor} is a file, not a folder; pass a folder path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"--out {out}: cannot create folders in {ancestor} (permission denied); "
                          "pass a folder you can write")


def _check_replaceable(out: str | Path, path: Path, force: bool, kind: str) -> None:
    marker = read_marker(path)
    if marker is None:
        even = " even with --force" if force else ""
        raise OutputError(f"--out {out} is not empty and was not written by effcompile (no {MARKER}); refusing to "
                          f"replace it{even}: pass a new folder, or empty it yourself")
    if marker.get("kind") != kind:
        raise OutputError(f"--out {out} holds an effcompile {_KIND_WORDS.get(marker.get('kind'), 'output')}, "
                          f"not a {_KIND_WORDS[kind]}; pass another folder")
    if not force:
        raise OutputError(f"--out {out} exists and is not empty; pass --force to replace it or choose another folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputError(f"--out {out}: cannot replace it (permission denied); pass a folder you can write")


def _lock_path(path: Path) -> Path:
    return path.parent / f"{path.name}.lock"


def _holder(lock: Path) -> str:
    try:
        pid = lock.read_text().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


def _check_unlocked(out: str | Path, path: Path) -> None:
    lock = _lock_path(path)
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OutputError(f"another effcompile run{_holder(lock)} is writing {out}; wait for it to finish or pass "
                          "another folder") from None
    finally:
        os.close(fd)


def _acquire(out: str | Path, path: Path) -> int:
    """Hold the exclusive lock of ``path`` (created with its parents); OutputError if another run holds it."""
    lock = _lock_path(path)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputError(f"another effcompile run{_holder(lock)} is writing {out}; wait for it to finish "
                                  "or pass another folder") from None
            try:  # the previous holder may have removed the file between our open and flock: retry
                same = os.path.samestat(os.fstat(fd), os.stat(lock))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd
    except OSError as error:
        raise OutputError(f"--out {out}: cannot write in {lock.parent} ({error.strerror or error}); "
                          "pass a folder you can write") from None


def _release(fd: int, path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(_lock_path(path))
    os.close(fd)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process holds the lock, so a folder under its pid is left from an earlier attempt
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child not yet reaped by its parent is a zombie: gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def clean_stale(path: Path) -> list[Path]:
    """Remove ``DIR.partial-<pid>`` / ``DIR.old-<pid>`` folders whose process is gone (restoring an old
    ``DIR`` when ``DIR`` is missing); call with the lock held. Returns what was removed or restored."""
    pattern = re.compile(re.escape(path.name) + r"\.(partial|old)-(\d+)")
    handled = []
    for entry in sorted(path.parent.iterdir()) if path.parent.is_dir() else []:
        match = pattern.fullmatch(entry.name)
        if match is None or not entry.is_dir() or entry.is_symlink() or _alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and not path.exists():
            os.rename(entry, path)  # a kill between the two renames of the fallback: the old DIR comes back
        else:
            shutil.rmtree(entry, ignore_errors=True)
        handled.append(entry)
    return handled


def _exchange(first: Path, second: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))


class OutputClaim:
    """The right to write one output folder: checked, locked, stale staging removed. ``staging()`` yields
    the folder to write into and publishes it on success; ``release()`` drops the lock."""

    def __init__(self, out: str | Path, force: bool, kind: str = MODULE, protect: Sequence[str | Path] = ()) -> None:
        self.out, self.force, self.kind = out, force, kind
        self.path = check_output_dir(out, force, kind, protect)
        self._fd: int | None = _acquire(out, self.path)
        try:
            clean_stale(self.path)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        if self._fd is not None:
            _release(self._fd, self.path)
            self._fd = None

    def __enter__(self) -> OutputClaim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """Yield ``DIR.partial-<pid>``; when the block succeeds, add the marker and swap it into ``DIR``.
        On any failure the staging folder is removed and ``DIR`` is untouched; an OSError becomes one
        OutputError line."""
        if self._fd is None:
            raise OutputError(f"--out {self.out}: the claim was released; claim the folder again")
        if self.path.is_dir() and any(self.path.iterdir()):  # it may have appeared since the checks
            _check_replaceable(self.out, self.path, self.force, self.kind)
        staging = self.path.parent / f"{self.path.name}.partial-{os.getpid()}"
        try:
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir()
            yield staging
            write_marker(staging, self.kind)
            self._publish(staging)
        except OSError as error:
            shutil.rmtree(staging, ignore_errors=True)
            where = f" ({error.filename})" if error.filename else ""
            raise OutputError(f"could not write {self.out}: {error.strerror or error}{where}; free space or pass "
                              "another folder (nothing was written)") from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _publish(self, staging: Path) -> None:
        path = self.path
        if not path.exists():
            os.rename(staging, path)
            return
        os.chmod(staging, stat.S_IMODE(path.stat().st_mode))
        if _exchange(staging, path):
            shutil.rmtree(staging, ignore_errors=True)  # now the old folder
            return
        old = path.parent / f"{path.name}.old-{os.getpid()}"
        os.rename(path, old)
        os.rename(staging, path)
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(out: str | Path, force: bool = False, kind: str = MODULE) -> Iterator[Path]:
    """Claim ``out``, yield its staging folder, publish it on success (see ``OutputClaim``). Raises
    OutputError for a folder that cannot be written as asked."""
    with OutputClaim(out, force, kind) as claim, claim.staging() as staging:
        yield staging


@contextlib.contextmanager
def claim_log_dir(out: str | Path, force: bool, resume: bool, run_files: Sequence[str]) -> Iterator[Path]:
    """Hold ``out`` as a training-log folder for the duration of the block: created with its marker if
    absent or empty; an effcompile run folder is continued with ``resume``, started over with ``force``
    (deleting only ``run_files``, the names a run writes: ``effcompile.train.config.RUN_FILES``), else
    refused. A folder effcompile did not write, or a compiled-module folder, is refused. Raises OutputError."""
    path = check_output_dir(out, force, TRAIN_LOG)
    fd = _acquire(out, path)
    try:
        prepare_log_dir(path, force, resume, str(out), run_files=run_files)
        yield path
    finally:
        _release(fd, path)


def prepare_log_dir(path: Path, force: bool = False, resume: bool = False, shown: str | None = None, *,
                    run_files: Sequence[str]) -> None:
    """Make ``path`` a training-log folder (see ``claim_log_dir``) without locking it; used by the trainer
    of the Python API too. Raises OutputError."""
    shown = shown or str(path)
    try:
        if path.is_dir() and any(path.iterdir()):
            marker = read_marker(path)
            if marker is None:
                raise OutputError(f"--out {shown} is not empty and was not written by effcompile train (no {MARKER}); "
                                  "pass a new folder for the run")
            if marker.get("kind") != TRAIN_LOG:
                raise OutputError(f"--out {shown} holds an effcompile {_KIND_WORDS.get(marker.get('kind'), 'output')}; "
                                  "pass a new folder for the run")
            holds_run = any((path / name).exists() for name in run_files)
            if resume or not holds_run:
                return
            if not force:
                raise OutputError(f"--out {shown} already holds a training run; pass --resume to continue it, "
                                  "--force to start over, or another folder")
            for name in run_files:
                target = path / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)
            return
        path.mkdir(parents=True, exist_ok=True)
        write_marker(path, TRAIN_LOG)
    except EffcompileError:
        raise
    except OSError as error:
        raise OutputError(f"--out {shown}: {error.strerror or error}; pass a folder you can write") from None
