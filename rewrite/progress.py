"""Stage reports: the road (capture, analysis, each pass, verification, save, export) tells a callback
when a stage starts and when it ends, with its elapsed time; it also logs each finished stage at INFO.
The core never prints: the command line turns the reports into status lines (``effcompile.cli.common``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """One report: ``name`` ("capture", "analysis", "pass lora", "verify lora", "save", "export onnx"),
    ``detail`` (what it found, e.g. the capture path), ``seconds`` (None when the stage starts, its elapsed
    wall time in seconds when it ends) and ``ok`` (False when it ended with an exception)."""

    name: str
    detail: str = ""
    seconds: float | None = None
    ok: bool = True


#: What receives stage reports (``compile(..., progress=...)``).
Progress = Callable[[Stage], None]


class StageNote:
    """What the code inside a stage may add to its end report (``note.detail = "export"``)."""

    def __init__(self) -> None:
        self.detail = ""


@contextlib.contextmanager
def stage(progress: Progress | None, name: str) -> Iterator[StageNote]:
    """Report ``name`` starting to ``progress`` (if any), run the block, report it finished (or failed)
    with its elapsed seconds; exceptions propagate unchanged."""
    note = StageNote()
    started = time.perf_counter()
    if progress is not None:
        progress(Stage(name))
    try:
        yield note
    except BaseException:
        if progress is not None:
            progress(Stage(name, note.detail, time.perf_counter() - started, ok=False))
        raise
    seconds = time.perf_counter() - started
    log.info("%s%s: %.2f s", name, f" ({note.detail})" if note.detail else "", seconds)
    if progress is not None:
        progress(Stage(name, note.detail, seconds))
