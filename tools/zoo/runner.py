"""Run the zoo: one subprocess per architecture (so a hang or a crash costs one entry, not the run), a
per-architecture timeout and memory cap, results appended to a JSONL file as each architecture finishes
(what a killed child had printed is kept), and reruns that skip what is done.

Lines of the results file (one JSON object each):
- ``{"kind": "build", "arch", "modality", "class_name", "level", "parameters", "command", "tries",
  "seconds"}`` or, when no level built, ``{"kind": "build", "arch", ..., "error"}``;
- ``{"kind": "check", "arch", "modality", "check", "outcome", "message", "seconds", "details"}``;
- ``{"kind": "run", "command", "started", "platform"}`` once per invocation.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .catalog import Arch

MEMORY_LIMIT_BYTES = 8 << 30
_APPEND = threading.Lock()


def load_results(path: Path) -> list[dict[str, Any]]:
    """Every JSON line of ``path`` (none if it does not exist); a torn last line is skipped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def latest(rows: Iterable[dict[str, Any]]) -> tuple[dict[str, dict], dict[tuple[str, str], dict]]:
    """The last build row per architecture and the last check row per (architecture, check)."""
    builds: dict[str, dict] = {}
    checks: dict[tuple[str, str], dict] = {}
    for row in rows:
        if row.get("kind") == "build":
            builds[row["arch"]] = row
        elif row.get("kind") == "check":
            checks[(row["arch"], row["check"])] = row
    return builds, checks


def pending(archs: list[Arch], checks: list[str], path: Path, redo: bool) -> list[tuple[Arch, list[str]]]:
    """The (architecture, checks still to run) pairs: all of them with ``redo``, else those without a
    result yet (an architecture that did not build counts as done)."""
    builds, done = latest(load_results(path))
    work = []
    for arch in archs:
        if not redo and "error" in builds.get(arch.key, {}):
            continue
        todo = checks if redo else [c for c in checks if (arch.key, c) not in done]
        if todo:
            work.append((arch, todo))
    return work


def select_shard(archs: list[Arch], shard: str | None) -> list[Arch]:
    """``shard`` ``k/n``: every n-th architecture starting at the k-th (1-based); None: all."""
    if not shard:
        return archs
    index, _, count = shard.partition("/")
    k, n = int(index), int(count)
    if not 1 <= k <= n:
        raise ValueError(f"--shard {shard}: write k/n with 1 ≤ k ≤ n, e.g. 2/4")
    return archs[k - 1::n]


def _limit_child() -> None:  # runs in the child before exec
    os.nice(10)
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))


def run_one(archs: list[Arch], checks: dict[str, list[str]], path: Path, timeout: float, root: Path) -> list[Arch]:
    """Run each architecture's checks in one child process (``python -m tools.zoo one``), each
    architecture under ``timeout`` seconds (an alarm in the child; the parent kills the child after the
    sum). Appends the child's result lines to ``path``. When the child dies (a native crash, the memory
    cap), the architecture it was on gets a ``failed`` row naming why; returns the architectures it had
    not reached, for another child."""
    all_checks = sorted({c for a in archs for c in checks[a.key]}, key=list(_check_order()).index)
    command = [sys.executable, "-m", "tools.zoo", "one", *(a.key for a in archs), "--checks", ",".join(all_checks),
               "--timeout", str(timeout)]
    with subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          preexec_fn=_limit_child) as child:
        try:
            stdout, stderr = child.communicate(timeout=timeout * len(archs) + 120)
            reason = None if child.returncode == 0 else _exit_reason(child.returncode, stderr)
        except subprocess.TimeoutExpired:
            child.kill()
            stdout, stderr = child.communicate()
            reason = f"timed out after {timeout:.0f} s (the zoo's per-architecture limit; the process was killed)"
    rows = []
    for line in stdout.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("kind") == "timeout":  # timed out between checks: the next pending check takes the blame
            row = {"kind": "check", "arch": row["arch"], "check": "?", "outcome": "failed", "message": row["message"]}
        rows.append(row)
    reached = [a for a in archs if any(r.get("arch") == a.key for r in rows)]
    left = [a for a in archs if a not in reached]
    if reason is not None:
        current = None
        if reached:
            last = reached[-1]
            finished = {r.get("check") for r in rows if r.get("arch") == last.key}
            broken = any(r.get("kind") == "build" and "error" in r for r in rows if r.get("arch") == last.key)
            if not broken and any(c not in finished for c in checks[last.key]):
                current = last
        if current is None and left:
            current = left.pop(0)
        if current is not None:
            _blame(current, rows, checks[current.key], reason)
    rows = [r for r in rows if r.get("check") != "?" and (r.get("kind") != "check" or
                                                          r["check"] in checks.get(r.get("arch", ""), []))]
    with _APPEND, path.open("a") as out:
        out.write("".join(json.dumps(row) + "\n" for row in rows))
    return left


def _blame(arch: Arch, rows: list[dict[str, Any]], checks: list[str], reason: str) -> None:
    """Add the row saying ``arch`` stopped for ``reason``: its build when it had none, else the first of its
    checks without a result."""
    if not any(r.get("kind") == "build" and r.get("arch") == arch.key for r in rows):
        rows.append({"kind": "build", "arch": arch.key, "modality": arch.modality, "class_name": arch.class_name,
                     "error": reason, "seconds": 0.0})
        return
    done = {r.get("check") for r in rows if r.get("arch") == arch.key}
    todo = [c for c in checks if c not in done]
    if todo:
        rows.append({"kind": "check", "arch": arch.key, "modality": arch.modality, "check": todo[0],
                     "outcome": "failed", "message": reason, "seconds": 0.0, "details": {}})


def _check_order() -> tuple[str, ...]:
    from .checks import CHECKS

    return tuple(CHECKS)


def _exit_reason(code: int, stderr: str) -> str:
    if code < 0:
        return f"the process died of signal {-code} (a native crash, or the {MEMORY_LIMIT_BYTES >> 30} GiB memory cap)"
    tail = [line for line in stderr.strip().splitlines() if line.strip()][-1:] or [""]
    return f"the process exited with status {code}: {tail[0][:300]}"


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for package in ("torch", "transformers", "onnxruntime-training-cpu"):
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            continue
    return ", ".join(found)


def run(archs: list[Arch], checks: list[str], path: Path, jobs: int, timeout: float, redo: bool,
        root: Path, per_process: int = 1, progress: Any = print) -> int:
    """Run every pending (architecture, checks) pair: ``per_process`` architectures per child process,
    ``jobs`` children at a time. Returns how many architectures ran."""
    work = pending(archs, checks, path, redo)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _APPEND, path.open("a") as out:
        out.write(json.dumps({"kind": "run", "command": "python -m tools.zoo " + " ".join(sys.argv[1:]),
                              "started": time.strftime("%Y-%m-%d %H:%M"), "versions": _versions(),
                              "platform": platform.platform(), "checks": checks, "architectures": len(work)}) + "\n")
    todo = {arch.key: names for arch, names in work}
    size = max(1, per_process)
    batches = [[a for a, _ in work[i:i + size]] for i in range(0, len(work), size)]

    def one(batch: list[Arch]) -> None:
        while batch:
            started = time.perf_counter()
            left = run_one(batch, todo, path, timeout, root)
            ran = batch[:len(batch) - len(left)]
            progress(f"{', '.join(a.key for a in ran) or batch[0].key}: {time.perf_counter() - started:.0f} s")
            batch = left

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(one, batches))
    return len(work)
