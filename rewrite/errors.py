"""One exception family: user errors print as one line and exit 2; anything else is a bug."""

from __future__ import annotations


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


class VerificationError(EffcompileError):
    """An exact pass changed the model's numerics beyond float32 round-off."""

    exit_code = 1


class OutputError(EffcompileError):
    """The output folder cannot be written as asked."""


class UnsafeFolderError(OutputError):
    """A folder to load names something effcompile does not load: a pickle, or a callable, module class or
    type outside the allow-list. Nothing from it was run."""


class ExportError(EffcompileError):
    """The program cannot be exported to ONNX or trained in ONNX Runtime as it stands."""


class PipelineError(EffcompileError):
    """A pipelined program cannot run as asked (world size, inputs the schedule cannot feed, no loss)."""
