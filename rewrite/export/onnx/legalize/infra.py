"""A small pass infrastructure for in-place rewrites of an ``onnx.ModelProto``, after onnx-ir's
(``onnx_ir.passes``: ``PassBase``, ``PassResult``, ``Sequential``). onnx-ir's passes work on its own
``ir.Model`` and report only *whether* a model changed, and its ``Sequential`` turns every failure into a
``RuntimeError``; here a rewrite reports *how many* places it changed, and a user error
(``ExportError``: problem and fix) stays one, with where in the sequence it happened appended.

1. A rewrite has a ``name`` (its key in the counts), implements ``call(model) -> int`` (places changed,
   rewriting ``model`` in place) and may check ``requires(model)`` / ``ensures(model)`` around it.
2. ``speed``: a rewrite for speed only (exact up to round-off); ``training_only``: needed for training
   graphs, not inference ones. ``legalize_for_training`` chooses by these.
3. ``Sequential(*rewrites)(model)`` runs them in order and returns the counts per rewrite name (a name
   that runs twice sums).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import onnx

from ....errors import EffcompileError


@dataclass
class RewriteResult:
    """The model (rewritten in place) and how many places each rewrite changed, by rewrite name."""

    model: onnx.ModelProto
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def modified(self) -> bool:
        """True when some rewrite changed something."""
        return any(self.counts.values())


class Rewrite:
    """One named, in-place rewrite of an ONNX model (see the module docstring)."""

    name: ClassVar[str] = ""
    speed: ClassVar[bool] = False
    training_only: ClassVar[bool] = False

    def requires(self, model: onnx.ModelProto) -> None:
        """Raise ExportError if the rewrite cannot run on ``model``."""

    def ensures(self, model: onnx.ModelProto) -> None:
        """Raise an error if the rewrite left ``model`` in a state it should not have."""

    def call(self, model: onnx.ModelProto) -> int:
        """Rewrite ``model`` in place; return how many places changed."""
        raise NotImplementedError

    def __call__(self, model: onnx.ModelProto) -> RewriteResult:
        self.requires(model)
        count = self.call(model)
        self.ensures(model)
        return RewriteResult(model, {self.name: count})

    def __repr__(self) -> str:
        return self.name or type(self).__name__


class Sequential(Rewrite):
    """Run rewrites in order on one model. A failure names the rewrite and those that ran before it: an
    ``EffcompileError`` is raised again as its own class (still a one-line user error), anything else (a
    bug) as a RuntimeError."""

    name = "sequence"

    def __init__(self, *rewrites: Rewrite) -> None:
        self.rewrites = rewrites

    def __call__(self, model: onnx.ModelProto) -> RewriteResult:
        counts: dict[str, int] = {}
        for index, rewrite in enumerate(self.rewrites):
            try:
                result = rewrite(model)
            except Exception as error:
                where = f"when running the '{rewrite}' rewrite after {[str(r) for r in self.rewrites[:index]]}"
                if isinstance(error, EffcompileError):
                    raise type(error)(f"{error} ({where})") from error
                raise RuntimeError(f"ONNX legalisation failed {where}: {type(error).__name__}: {error}") from error
            for name, count in result.counts.items():
                counts[name] = counts.get(name, 0) + count
        return RewriteResult(model, counts)

    def call(self, model: onnx.ModelProto) -> int:
        """Run the sequence; return the total count."""
        return sum(self(model).counts.values())
