"""One exception family, one exit code per kind of failure, the same classes from the CLI and the API.

| exit | class | meaning |
|---|---|---|
| 2 | ``EffcompileError`` and its user-error subclasses | bad input: one line naming the problem and the fix |
| 1 | ``VerificationError`` (``ToleranceError``) | a numerical check failed: an exact pass changed the numerics, or an approximate one exceeded ``--max-error`` |
| 3 | ``InternalError`` (and any exception that is not an ``EffcompileError``) | a bug in effcompile: "report it" |

Only errors raised on purpose are user errors: an unexpected exception anywhere on the road becomes an
``InternalError`` that names the stage it broke in (``guard``), with the original as its ``__cause__``
(shown with ``--debug``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

REPORT_IT = "this is a bug in effcompile: rerun with --debug for the traceback and report it"


class EffcompileError(Exception):
    """Base of every error effcompile raises on purpose. The message is one line: problem, then fix."""

    exit_code = 2


class SpecError(EffcompileError):
    """The model spec (file, ``hf:`` type, example inputs) is unusable."""


class OptionError(EffcompileError):
    """A pass name, option name or option value is wrong, or passes are in a forbidden order."""


class CaptureError(EffcompileError):
    """Neither capture path could turn the model into a graph."""


class PassError(EffcompileError):
    """A pass could not run on this program (a precondition failed, a budget is unreachable, ...)."""


class ResourceError(EffcompileError):
    """The work does not fit the machine (out of memory): smaller sizes are the fix."""


class VerificationError(EffcompileError):
    """An exact pass changed the model's numerics beyond float32 round-off."""

    exit_code = 1


class ToleranceError(VerificationError):
    """An approximate pass moved the outputs further than the tolerance asked for (``--max-error``)."""


class OutputError(EffcompileError):
    """The output folder cannot be written as asked."""


class UnsafeFolderError(OutputError):
    """A folder to load names something effcompile does not load: a pickle, or a callable, module class or
    type outside the allow-list. Nothing from it was run."""


class ExportError(EffcompileError):
    """The program cannot be exported to ONNX or trained in ONNX Runtime as it stands."""


class PipelineError(EffcompileError):
    """A pipelined program cannot run as asked (world size, inputs the schedule cannot feed, no loss)."""


class InternalError(EffcompileError):
    """A bug in effcompile: an exception nobody raised on purpose, re-raised naming where it happened."""

    exit_code = 3


def first_line(error: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` of ``error``, at most ``limit`` characters of message."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:limit]}" if text and text[0] else type(error).__name__


def is_out_of_memory(error: BaseException) -> bool:
    """True for host or device out-of-memory errors (``MemoryError``, ``torch.OutOfMemoryError``)."""
    return isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError"


def out_of_memory(where: str, error: BaseException) -> ResourceError:
    """The ``ResourceError`` for running out of memory in ``where``: the fix is smaller sizes."""
    return ResourceError(f"{where}: out of memory ({first_line(error, 200)}); use a smaller model, --batch or "
                         "--seq, or a device with more memory")


@contextlib.contextmanager
def guard(where: str) -> Iterator[None]:
    """Run a stage of the road: ``EffcompileError``s pass through, running out of memory becomes a
    ``ResourceError``, any other exception an ``InternalError`` naming ``where`` (e.g. "pass 'sas' (after
    passes: lora)"), chained to the original."""
    try:
        yield
    except EffcompileError:
        raise
    except Exception as error:
        if is_out_of_memory(error):
            raise out_of_memory(where, error) from error
        raise InternalError(f"{where} failed with {first_line(error)}; {REPORT_IT}") from error
