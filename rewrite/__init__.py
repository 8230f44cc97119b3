"""effcompile: capture a transformer as a torch.fx graph, rewrite it with verified passes, export it.

The road: model spec → capture → Program → PassManager → verify → emit. ``compile`` is the front door
(``effcompile.api``); this package only re-exports.
"""

from __future__ import annotations

import logging

from .api import CompileResult, compile, load, save
from .errors import (
    CaptureError,
    EffcompileError,
    InternalError,
    OptionError,
    OutputError,
    PassError,
    ResourceError,
    SpecError,
    ToleranceError,
    UnsafeFolderError,
    VerificationError,
)
from .pass_manager import Pass, PassRecord, register, registry
from .program import Program
from .report import Report
from .spec import ModelSpec

__all__ = ["compile", "CompileResult", "load", "save", "Program", "Pass", "PassRecord", "register", "registry",
           "Report", "ModelSpec", "EffcompileError", "SpecError", "OptionError", "CaptureError", "PassError",
           "VerificationError", "ToleranceError", "InternalError", "ResourceError", "OutputError",
           "UnsafeFolderError"]

logging.getLogger(__name__).addHandler(logging.NullHandler())
