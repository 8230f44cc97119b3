"""What the command-line front ends share: ``--device`` parsing, moving a model spec to a device, logging
set-up, the guarded runner that turns errors into one line and an exit code, and the console.

Exit codes: 0 ok, 1 verification failed, 2 bad input (an ``EffcompileError``), 3 a bug (one line, the
traceback with ``--debug``), 130 interrupted.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable
from typing import Any

from ..errors import EffcompileError, OptionError

INTERNAL_ERROR = 3
INTERRUPTED = 130


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
    """Call ``function`` and return its exit code; an ``EffcompileError`` prints as one line on stderr and
    returns its ``exit_code``, any other exception (a bug) as one line and 3 — both re-raised with
    ``debug`` so that the traceback shows. Ctrl-C returns 130."""
    from rich.console import Console

    stderr = Console(stderr=True)
    try:
        return int(function() or 0)
    except EffcompileError as error:
        if debug:
            raise
        stderr.print(f"[bold red]effcompile: error:[/bold red] {error}", highlight=False, soft_wrap=True)
        return error.exit_code
    except KeyboardInterrupt:
        stderr.print("effcompile: interrupted")
        return INTERRUPTED
    except Exception as error:  # a bug: one line unless --debug
        if debug:
            raise
        message = str(error).splitlines()[0] if str(error) else ""
        stderr.print(f"[bold red]effcompile: internal error:[/bold red] {type(error).__name__}: {message[:300]} "
                     "(rerun with --debug for the traceback)", highlight=False, soft_wrap=True)
        return INTERNAL_ERROR


def console(width: int = 160) -> Any:
    """A rich console on stdout. Logs and CI are not terminals: give tables ``width`` columns there
    instead of rich's 80."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else width)
