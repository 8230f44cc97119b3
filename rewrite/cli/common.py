"""What the command-line front ends share: ``--device`` parsing, moving a model spec to a device, logging
set-up, the guarded runner that turns errors into one line and an exit code, and the console.

Exit codes: 0 ok, 1 a numerical check failed (``VerificationError``), 2 bad input (an ``EffcompileError``),
3 a bug (``InternalError`` or any unexpected exception: one line, the traceback with ``--debug``), 130
interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Callable
from typing import Any, NoReturn

from ..errors import REPORT_IT, EffcompileError, OptionError, first_line, is_out_of_memory, out_of_memory

INTERNAL_ERROR = 3
INTERRUPTED = 130


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage error printed as one line (problem and where to look), exit code 2."""

    def error(self, message: str) -> NoReturn:
        """Print ``prog: error: message`` and a pointer to ``--help`` on one line; exit 2."""
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def parse_device(name: str) -> Any:
    """``--device`` as a ``torch.device``; OptionError for a bad name or an absent CUDA device."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise OptionError(f"--device {name!r} is not a device; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError("--device cuda: no CUDA device is available here; use --device cpu")
    return device


def spec_to_device(spec: Any, device: Any, dtype: Any = None) -> Any:
    """Move a ``ModelSpec``'s module (and, with ``dtype``, its parameters' type) and its example input
    tensors to ``device``, in place; returns the spec."""
    import torch
    from torch.utils import _pytree as pytree

    spec.module.to(device=device, dtype=dtype)
    move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    spec.args, spec.kwargs = pytree.tree_map(move, spec.args), pytree.tree_map(move, spec.kwargs)
    return spec


def configure_logging(debug: bool) -> None:
    """effcompile's own log at WARNING (DEBUG with --debug); torch's and transformers' chatter (graph dumps,
    symbolic-shape warnings, deprecations) only with --debug, so errors stay one line."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(name)s: %(message)s")
    if debug:
        return
    for name in ("torch", "transformers", "onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
    try:
        import torch._logging

        torch._logging.set_logs(all=logging.CRITICAL)
    except (ImportError, AttributeError):  # pragma: no cover - older torch
        pass
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def run_guarded(function: Callable[[], int | None], debug: bool) -> int:
    """Call ``function`` and return its exit code. An ``EffcompileError`` prints as one line on stderr and
    returns its ``exit_code`` (2 bad input, 1 a numerical check failed, 3 an ``InternalError``); running
    out of memory is bad input (2); any other exception is a bug: one line saying so and 3. With ``debug``
    every error is re-raised so that the traceback shows. Ctrl-C returns 130."""
    from rich.console import Console
    from rich.markup import escape

    stderr = Console(stderr=True)
    try:
        return int(function() or 0)
    except KeyboardInterrupt:
        stderr.print("effcompile: interrupted")
        return INTERRUPTED
    except Exception as error:
        if debug:
            raise
        code, message = describe_error(error)
        label = "internal error" if code == INTERNAL_ERROR else "error"
        stderr.print(f"[bold red]effcompile: {label}:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
        return code


def describe_error(error: Exception) -> tuple[int, str]:
    """The exit code and the one-line message for ``error`` (see ``effcompile.errors``)."""
    if is_out_of_memory(error):
        error = out_of_memory("effcompile", error)
    if isinstance(error, EffcompileError):
        return error.exit_code, " ".join(str(error).split())
    return INTERNAL_ERROR, f"{first_line(error)}; {REPORT_IT}"


def console(width: int = 160) -> Any:
    """A rich console on stdout. Logs and CI are not terminals: give tables ``width`` columns there
    instead of rich's 80."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else width)


class StageLines:
    """Prints the road's stage reports (``effcompile.progress.Stage``) on stderr: one line per finished
    stage with its elapsed seconds, and, on a terminal, a spinner naming the stage that is running."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False)
        self.status: Any = None

    def __call__(self, stage: Any) -> None:
        if stage.seconds is None:
            if self.console.is_terminal:
                self.stop()
                self.status = self.console.status(f"{stage.name} …")
                self.status.start()
            return
        self.stop()
        from rich.markup import escape

        mark = "[green]✓[/green]" if stage.ok else "[red]✗[/red]"
        detail = f" ({stage.detail})" if stage.detail else ""
        self.console.print(f"{mark} {escape(stage.name + detail)} [dim]{stage.seconds:.1f} s[/dim]", soft_wrap=True)

    def stop(self) -> None:
        """Stop a running spinner (before printing anything else on the terminal)."""
        if self.status is not None:
            self.status.stop()
            self.status = None


def progress_printer(asked: bool, quiet: bool = False) -> StageLines | None:
    """The stage printer to use: on with ``--progress`` (``asked``), else on only when stderr is a terminal
    and the output is not meant for a program (``quiet``: ``--json``)."""
    if asked:
        return StageLines()
    return StageLines() if not quiet and sys.stderr.isatty() else None
