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


def run_one(arch: Arch, checks: list[str], path: Path, timeout: float, root: Path) -> None:
    """Run ``checks`` on ``arch`` in a child process (``python -m tools.zoo one``), appending each result
    line to ``path`` as it arrives; on a timeout or crash, the checks left get a ``failed`` row naming it."""
    command = [sys.executable, "-m", "tools.zoo", "one", arch.key, "--checks", ",".join(checks)]
    started = time.perf_counter()
    seen: set[str] = set()
    built = False
    with subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          preexec_fn=_limit_child) as child:
        try:
            stdout, stderr = child.communicate(timeout=timeout)
            reason = None if child.returncode == 0 else _exit_reason(child.returncode, stderr)
        except subprocess.TimeoutExpired:
            child.kill()
            stdout, stderr = child.communicate()
            reason = f"timed out after {timeout:.0f} s (the zoo's per-architecture limit)"
    rows = []
    for line in stdout.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows.append(row)
        seen.add(row.get("check", ""))
        built = built or row.get("kind") == "build"
    if reason is not None:
        if not built:
            rows.append({"kind": "build", "arch": arch.key, "modality": arch.modality, "class_name": arch.class_name,
                         "error": reason, "seconds": round(time.perf_counter() - started, 1)})
        elif not any("error" in r for r in rows if r.get("kind") == "build"):
            for check in checks:
                if check not in seen:
                    rows.append({"kind": "check", "arch": arch.key, "modality": arch.modality, "check": check,
                                 "outcome": "failed", "message": reason, "seconds": 0.0, "details": {}})
                    break  # the check that was running; the rest are left for a rerun
    with _APPEND, path.open("a") as out:
        out.write("".join(json.dumps(row) + "\n" for row in rows))


def _exit_reason(code: int, stderr: str) -> str:
    if code < 0:
        return f"the process died of signal {-code} (a native crash, or the {MEMORY_LIMIT_BYTES >> 30} GiB memory cap)"
    tail = [line for line in stderr.strip().splitlines() if line.strip()][-1:] or [""]
    return f"the process exited with status {code}: {tail[0][:300]}"


def run(archs: list[Arch], checks: list[str], path: Path, jobs: int, timeout: float, redo: bool,
        root: Path, progress: Any = print) -> int:
    """Run every pending (architecture, checks) pair, ``jobs`` children at a time. Returns how many
    architectures ran."""
    work = pending(archs, checks, path, redo)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as out:
        out.write(json.dumps({"kind": "run", "command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%d %H:%M"),
                              "platform": platform.platform(), "checks": checks, "architectures": len(work)}) + "\n")

    def one(item: tuple[Arch, list[str]]) -> None:
        arch, todo = item
        started = time.perf_counter()
        run_one(arch, todo, path, timeout, root)
        progress(f"{arch.key}: {len(todo)} check(s) in {time.perf_counter() - started:.0f} s")

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(one, work))
    return len(work)
