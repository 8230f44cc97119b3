"""The candidates ``auto`` considers: stacks of registered passes with options, built from the registry.

1. Each pass contributes a list of option sets ("choices"): its own ``auto_choices(context)`` when the pass
   class defines one (a pass declares its search space), else the table below for the passes whose
   trade-offs ``auto`` knows (``amp``, ``fuse``, ``sas``, ``lowrank``, ``remat``). Every option name is checked
   against the pass's ``Config`` fields, and every value against the field's allowed values (a ``Literal``),
   so a pass that lacks an option (``remat.offload`` on an older build) simply contributes fewer choices.
2. A pass that changes what the model computes (``exact = False``) contributes only when its name is in
   ``allow``; ``amp`` in bf16 (float32 master weights) always does, ``amp`` in float8 only with ``float8``.
3. The stacks are every combination of at most one choice per pass (``remat`` apart: it is added to a stack
   only when that stack does not fit in memory), in the order the passes declare (``valid_order``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from effcompile.pass_manager import Pass, valid_order

#: Option sets as hashable tuples: (pass name, ((option, value), ...)).
Step = tuple[str, tuple[tuple[str, Any], ...]]

#: Approximate "passes" that are options of another pass: name → (pass, option, value).
APPROXIMATE_OPTIONS = {"float8": ("amp", "dtype", "float8")}


@dataclass(frozen=True)
class SpaceContext:
    """What the choices depend on: the device kind, the sequence length of the example inputs, the
    approximations allowed, and the ``auto`` options that shape the space."""

    device: str
    seq_len: int | None
    allow: frozenset[str]
    sas_patterns: tuple[str, ...] = ("local",)
    sas_densities: tuple[float, ...] = (0.25, 0.5)
    remat_budgets: tuple[float, ...] = (0.5, 0.25)
    float8_gain: bool = False


@dataclass
class Candidate:
    """One stack and how to run it, and what the search learnt about it (seconds per training step, bytes)."""

    steps: tuple[Step, ...]
    compile: bool = False
    approximate: bool = False
    status: str = "candidate"
    reason: str = ""
    predicted_seconds: float | None = None
    predicted_bytes: int | None = None
    measured_seconds: float | None = None
    measured_min_seconds: float | None = None
    measured_max_seconds: float | None = None
    measured_bytes: int | None = None
    memory_source: str = ""
    steps_timed: int = 0
    first_step_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> tuple[str, ...]:
        """The pass names, in order."""
        return tuple(name for name, _ in self.steps)

    @property
    def options(self) -> dict[str, dict[str, Any]]:
        """``{pass: {option: value}}`` of the stack."""
        return {name: dict(items) for name, items in self.steps}

    @property
    def label(self) -> str:
        """A short human name: ``sas(local, window=1152)+fuse+amp(bfloat16)+compile``."""
        shown = [(name, [(k, v) for k, v in items if k not in QUIET_OPTIONS]) for name, items in self.steps]
        parts = [name + (f"({', '.join(_short(k, v) for k, v in items)})" if items else "") for name, items in shown]
        return "+".join(parts or ["captured"]) + ("+compile" if self.compile else "")

    def twin(self, compile: bool) -> Candidate:
        """The same stack run the other way (eager / compiled), not yet evaluated."""
        return Candidate(self.steps, compile, self.approximate)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the stack, its options, predictions, measurements, status and reason."""
        return {"label": self.label, "passes": list(self.names), "options": self.options, "compile": self.compile,
                "approximate": self.approximate, "status": self.status, "reason": self.reason,
                "predicted_step_seconds": _round(self.predicted_seconds),
                "predicted_memory_bytes": self.predicted_bytes,
                "measured_step_seconds": _round(self.measured_seconds),
                "measured_min_step_seconds": _round(self.measured_min_seconds),
                "measured_max_step_seconds": _round(self.measured_max_seconds),
                "measured_memory_bytes": self.measured_bytes, "memory_source": self.memory_source,
                "steps_timed": self.steps_timed, "first_step_seconds": _round(self.first_step_seconds), **self.extra}


def _round(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.6g}")


#: Options ``auto`` sets for speed of the search that do not change the rewritten program (left out of labels).
QUIET_OPTIONS = {"compare_autocast"}


def _short(option: str, value: Any) -> str:
    return str(value) if option in ("dtype", "pattern", "policy") else f"{option}={value}"


def make_step(name: str, options: Mapping[str, Any]) -> Step:
    """A hashable step from a pass name and its options."""
    return name, tuple(sorted(options.items()))


# ------------------------------------------------------------------------------------------- discovery

def config_fields(cls: type[Pass]) -> dict[str, Any]:
    """The pass's options: name → type annotation."""
    hints = typing.get_type_hints(cls.Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls.Config)}


def accepts(cls: type[Pass], option: str, value: Any) -> bool:
    """True when ``cls.Config`` has ``option`` and, if it is a ``Literal`` (or a union holding one), ``value``
    is among its allowed values."""
    fields = config_fields(cls)
    if option not in fields:
        return False
    literals = _literal_values(fields[option])
    return literals is None or value in literals


def _literal_values(annotation: Any) -> set[Any] | None:
    if typing.get_origin(annotation) is Literal:
        return set(typing.get_args(annotation))
    members = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    found = [v for m in members if (v := _literal_values(m)) is not None]
    if found and all(typing.get_origin(m) is Literal for m in members):
        return set().union(*found)
    return None


def _filtered(cls: type[Pass], choices: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Choices whose every option the pass accepts."""
    return [dict(c) for c in choices if all(accepts(cls, k, v) for k, v in c.items())]


# ---------------------------------------------------------------------------------- what auto knows

def local_window(seq_len: int, density: float, block_size: int) -> int:
    """The causal sliding window (tokens, a multiple of ``block_size``) that keeps about ``density`` of the
    causal (query, key) pairs of a sequence of ``seq_len`` tokens: a window w keeps 2w/S − (w/S)²."""
    fraction = 1.0 - math.sqrt(max(0.0, 1.0 - density))
    return max(block_size, math.ceil(seq_len * fraction / block_size) * block_size)


def sas_block_size(seq_len: int, default: int = 128) -> int:
    """Tile size for sparse attention: the pass's default when the sequence holds ≥ 8 tiles of it, else the
    largest power of two ≥ 16 that gives 8 tiles (short sequences on CPU)."""
    if seq_len >= 8 * default:
        return default
    size = 16
    while size * 2 * 8 <= seq_len:
        size *= 2
    return size


def _sas_choices(context: SpaceContext) -> list[dict[str, Any]]:
    if not context.seq_len or context.seq_len < 64:
        return []
    seq, block = context.seq_len, sas_block_size(context.seq_len)
    choices = []
    for pattern in context.sas_patterns:
        for density in context.sas_densities:
            window = local_window(seq, density, block)
            if window >= seq:
                continue
            if pattern in ("local", "global"):
                choices.append({"pattern": pattern, "window": window, "block_size": block})
            elif pattern == "importance":
                choices.append({"pattern": pattern, "density": density, "block_size": block})
            elif pattern == "block":
                size = max(block, round(seq * density / block) * block)
                choices.append({"pattern": pattern, "block": size, "block_size": block})
    return choices


def _remat_choices(context: SpaceContext) -> list[dict[str, Any]]:
    choices: list[dict[str, Any]] = [{"budget": b} for b in context.remat_budgets]
    choices.append({"policy": "blocks"})
    if context.device == "cuda":
        choices.append({"budget": min(context.remat_budgets, default=0.25), "offload": "auto"})
    return choices


def _amp_choices(context: SpaceContext) -> list[dict[str, Any]]:
    choices: list[dict[str, Any]] = [{"dtype": "bfloat16", "compare_autocast": False}]
    if "float8" in context.allow and context.float8_gain:
        choices.append({"dtype": "float8", "compare_autocast": False})
    return choices


KNOWN_CHOICES: dict[str, Callable[[SpaceContext], list[dict[str, Any]]]] = {
    "amp": _amp_choices,
    "fuse": lambda context: [{}],
    "sas": _sas_choices,
    "lowrank": lambda context: [{"energy": 0.9, "min_saving": 0.25}],
    "remat": _remat_choices,
}
#: Passes that are candidates without being allowed, although they declare themselves approximate.
ALWAYS_ALLOWED = {"amp"}  # bf16 with float32 master weights; its float8 needs "float8" in allow


def pass_choices(passes: Mapping[str, type[Pass]], context: SpaceContext) -> tuple[dict[str, list[dict[str, Any]]],
                                                                                   dict[str, str]]:
    """Per pass name, the option sets ``auto`` may use, and per pass left out, why."""
    chosen: dict[str, list[dict[str, Any]]] = {}
    left_out: dict[str, str] = {}
    for name, cls in passes.items():
        declared = getattr(cls, "auto_choices", None)
        if declared is None and name not in KNOWN_CHOICES:
            continue
        if not cls.exact and name not in ALWAYS_ALLOWED and name not in context.allow:
            left_out[name] = f"approximate (changes what the model computes); allow it with auto.allow={name}"
            continue
        raw = declared(dataclasses.asdict(context)) if declared is not None else KNOWN_CHOICES[name](context)
        choices = _filtered(cls, raw)
        if choices:
            chosen[name] = choices
        else:
            left_out[name] = "no applicable option set for this model and device"
    return chosen, left_out


def stacks(passes: Mapping[str, type[Pass]], choices: Mapping[str, list[dict[str, Any]]],
           separate: Sequence[str] = ("remat",)) -> list[tuple[Step, ...]]:
    """Every stack of at most one choice per pass (passes in ``separate`` left out), each in a valid order,
    without duplicates, the empty stack (the program as captured) first."""
    names = [n for n in choices if n not in separate]
    dimensions = [[None, *choices[n]] for n in names]
    found: list[tuple[Step, ...]] = []
    for combination in itertools.product(*dimensions):
        present = {n: c for n, c in zip(names, combination) if c is not None}
        order = valid_order([passes[n] for n in present])
        stack = tuple(make_step(n, present[n]) for n in order)
        if stack not in found:
            found.append(stack)
    return sorted(found, key=len)


def with_step(stack: tuple[Step, ...], step: Step, passes: Mapping[str, type[Pass]]) -> tuple[Step, ...]:
    """``stack`` with ``step`` added in its declared place."""
    by_name = dict(stack)
    by_name[step[0]] = step[1]
    order = valid_order([passes[n] for n in by_name])
    return tuple((n, by_name[n]) for n in order)


def approximate_parts(candidate_steps: tuple[Step, ...], passes: Mapping[str, type[Pass]]) -> list[str]:
    """The approximations a stack makes that need ``allow`` (pass names, or ``float8``)."""
    parts = [n for n, _ in candidate_steps if not passes[n].exact and n not in ALWAYS_ALLOWED]
    for alias, (name, option, value) in APPROXIMATE_OPTIONS.items():
        if any(n == name and dict(items).get(option) == value for n, items in candidate_steps):
            parts.append(alias)
    return parts


def allowed_names(passes: Mapping[str, type[Pass]]) -> list[str]:
    """What ``auto.allow`` accepts: every approximate pass's name (bf16 ``amp`` is always allowed) and the
    approximate options (``float8``)."""
    return sorted({n for n, cls in passes.items() if not cls.exact and n not in ALWAYS_ALLOWED}
                  | set(APPROXIMATE_OPTIONS))
