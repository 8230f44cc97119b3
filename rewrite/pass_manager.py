"""The pass contract, the registry behind ``--passes``, and the manager that checks the order passes
declare and runs them in it, verifying each against its input. The manager knows no pass by name."""

from __future__ import annotations

import dataclasses
import gc
import importlib
import logging
import pkgutil
import time
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .analysis import Analysis, analyze, parameter_count
from .errors import OptionError, ToleranceError, VerificationError, guard
from .options import build_config, describe_type
from .program import Program
from .progress import Progress, stage
from .verify import VerifyResult, compare

log = logging.getLogger(__name__)


@dataclass
class PassRecord:
    """What one pass did. ``stats`` holds counts (nodes rewritten, parameters, bytes, FLOPs before and
    after); ``details`` the pass's own plan (segments, ranks, masks...); ``verify`` the numerics check."""

    name: str
    changed: bool
    reason: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    verify: VerifyResult | None = None
    seconds: float = 0.0
    exact: bool = True
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"name": self.name, "changed": self.changed, "reason": self.reason, "exact": self.exact,
                "options": _jsonable(self.options), "stats": _jsonable(self.stats),
                "details": _jsonable(self.details), "verify": self.verify.to_dict() if self.verify else None,
                "seconds": round(self.seconds, 3)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    return str(value)


class Pass:
    """Base of every pass. Subclasses set ``name``, ``summary``, ``exact``, a ``Config`` dataclass, and
    implement ``call(program, config) -> PassRecord``, rewriting ``program`` in place.

    ``requires`` checks preconditions (raise PassError with the fix); ``ensures`` postconditions.
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    #: Passes that must run before this one when both are asked for (by name; absent ones are ignored).
    after: ClassVar[tuple[str, ...]] = ()
    #: True: this pass must be the last one (it reshapes the program for its consumer, e.g. into stages).
    last: ClassVar[bool] = False

    def needs_host_link(self, config: Any) -> bool:
        """Whether this pass, run with ``config``, reads the host link's bandwidth (``analysis.HostLink`` on
        the Program): the caller then measures it before passes run, since a pass does no I/O."""
        return False

    @dataclass(frozen=True)
    class Config:
        pass

    def requires(self, program: Program, config: Any) -> None:
        """Raise PassError if the pass cannot run on ``program``."""

    def ensures(self, program: Program, config: Any, record: PassRecord) -> None:
        """Raise PassError if the rewrite left ``program`` in a bad state."""
        program.gm.graph.lint()

    def call(self, program: Program, config: Any) -> PassRecord:
        """Rewrite ``program`` in place and say what changed."""
        raise NotImplementedError

    def __call__(self, program: Program, config: Any) -> PassRecord:
        self.requires(program, config)
        record = self.call(program, config)
        self.ensures(program, config, record)
        return record


_REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make ``cls`` available to ``--passes`` under ``cls.name``. Raises TypeError for a
    class without a name or whose ``after`` is not a tuple of pass names."""
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__name__} has no name")
    if not isinstance(cls.after, tuple) or not all(isinstance(n, str) for n in cls.after):
        raise TypeError(f"{cls.__name__}.after must be a tuple of pass names, got {cls.after!r}")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Pass]]:
    """All registered passes by name (imports every module of ``effcompile.passes`` once)."""
    from . import passes as package

    for module in pkgutil.iter_modules(package.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{module.name}")
    return dict(sorted(_REGISTRY.items()))


def describe_passes() -> list[dict[str, Any]]:
    """Name, one-line summary, exactness and options (name, type, default, help) of every pass."""
    rows = []
    for name, cls in registry().items():
        options = []
        hints = typing.get_type_hints(cls.Config)
        for f in dataclasses.fields(cls.Config):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            options.append({"name": f.name, "type": describe_type(hints[f.name]), "default": default,
                            "help": f.metadata.get("help", "")})
        rows.append({"name": name, "summary": cls.summary, "exact": cls.exact, "options": options})
    return rows


def resolve_passes(names: Sequence[str], options: Mapping[str, Mapping[str, Any]]) -> list[tuple[Pass, Any]]:
    """Check names, ordering and options before anything runs; return (pass, config) pairs in order."""
    passes = registry()
    names = [n.strip() for n in names if n.strip()]
    for name in names:
        if name not in passes:
            raise OptionError(f"unknown pass {name!r}; available passes: {', '.join(passes)} "
                              "(effcompile --list-passes describes them)")
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise OptionError(f"pass {duplicate!r} is listed twice in --passes; list it once")
    check_order([passes[name] for name in names])
    for name in options:
        if name not in passes and name != "verify":
            raise OptionError(f"options given for unknown pass {name!r}; available passes: {', '.join(passes)}")
        if name in passes and name not in names:
            raise OptionError(f"options given for pass {name!r}, which is not in --passes; add it or drop the options")
    return [(passes[name](), build_config(name, passes[name].Config, options.get(name, {}))) for name in names]


def check_order(classes: Sequence[type[Pass]]) -> None:
    """Raise OptionError unless ``classes`` (in the order asked for) respect what each declares: every
    pass named in its ``after`` that is present runs earlier, and a ``last`` pass runs last. The message
    names the broken rule and suggests a valid order."""
    names = [cls.name for cls in classes]
    position = {name: i for i, name in enumerate(names)}
    lasts = [cls.name for cls in classes if cls.last]
    if len(lasts) > 1:
        raise OptionError(f"passes {' and '.join(repr(n) for n in lasts)} each must be the last pass; "
                          "run them in separate compilations")
    for cls in classes:
        for earlier in cls.after:
            if earlier in position and position[earlier] > position[cls.name]:
                raise OptionError(f"pass {cls.name!r} must run after {earlier!r}; reorder, e.g. "
                                  f"--passes {','.join(valid_order(classes))}")
    if lasts and position[lasts[0]] != len(names) - 1:
        raise OptionError(f"pass {lasts[0]!r} must be the last pass; move it to the end of --passes")


def valid_order(classes: Sequence[type[Pass]]) -> list[str]:
    """The pass names in an order that respects every ``after`` and ``last`` declaration, as close to the
    given order as possible (a stable topological sort). Raises OptionError when the declarations
    contradict each other (a cycle: a bug in those passes)."""
    names = [cls.name for cls in classes]
    before = {cls.name: {n for n in cls.after if n in names and n != cls.name} for cls in classes}
    for cls in classes:
        if cls.last:
            before[cls.name] |= {n for n in names if n != cls.name}
    ordered: list[str] = []
    while len(ordered) < len(names):
        ready = next((n for n in names if n not in ordered and before[n] <= set(ordered)), None)
        if ready is None:
            stuck = [n for n in names if n not in ordered]
            raise OptionError(f"passes {', '.join(stuck)} declare contradictory orders (each must run after "
                              "another); this is a bug in those passes, report it")
        ordered.append(ready)
    return ordered


@dataclass
class RunResult:
    """The program after every pass, one record per pass, and the analysis before and after."""

    program: Program
    records: list[PassRecord]
    analysis_before: Analysis | None
    analysis_after: Analysis | None


class PassManager:
    """Runs passes in order. Each pass gets a clone of the current program (so the input survives for
    verification); its record gets parameter/bytes/FLOP counts before and after and a verify result.
    ``progress`` receives a report as each stage (analysis, each pass, its verification) starts and ends."""

    def __init__(self, passes: Sequence[tuple[Pass, Any]], verify: bool = True, measure: bool = True,
                 max_error: float | None = None, progress: Progress | None = None) -> None:
        self.passes = list(passes)
        self.verify = verify
        self.measure = measure
        self.max_error = max_error
        self.progress = progress

    def run(self, program: Program) -> RunResult:
        """Run every pass. Raises the ``EffcompileError`` a pass raised on purpose (bad input, e.g. an
        unreachable budget); ``VerificationError`` if an exact pass broke numerics, ``ToleranceError`` if an
        approximate one exceeded ``max_error``; ``InternalError`` (a bug), naming the pass and those before
        it, for any other exception."""
        current = program
        before = self._analyze(current, "analysis", "analysis of the captured program")
        first = before
        records: list[PassRecord] = []
        for pass_, config in self.passes:
            started = time.perf_counter()
            candidate = current.clone()
            where = f"pass {pass_.name!r} ({_after_text(records)})"
            with stage(self.progress, f"pass {pass_.name}") as note, guard(where):
                record = pass_(candidate, config)
                note.detail = "changed" if record.changed else "unchanged"
            record.exact = pass_.exact
            record.options = dataclasses.asdict(config)
            after = self._analyze(candidate, f"analysis after {pass_.name}", f"analysis after {where}") \
                if record.changed else before
            record.stats = {**_counts(current, candidate, before, after), **record.stats}
            if self.verify:
                with stage(self.progress, f"verify {pass_.name}") as note, guard(f"verification of {where}"):
                    record.verify = compare(current, candidate, pass_.exact, None if pass_.exact else self.max_error)
                    note.detail = "ok" if record.verify.ok else "failed"
                record.stats.update(training_flops_before=record.verify.training_flops_reference,
                                    training_flops_after=record.verify.training_flops_candidate)
                _check(pass_, record.verify)
            record.seconds = time.perf_counter() - started
            records.append(record)
            if record.changed:
                current, before = candidate, after
        gc.collect()  # verification and analysis leave tensors in reference cycles (interpreters, autograd graphs)
        return RunResult(current, records, first, before)

    def _analyze(self, program: Program, name: str, where: str) -> Analysis | None:
        if not self.measure:
            return None
        with stage(self.progress, name), guard(where):
            return analyze(program)


def _after_text(records: Sequence[PassRecord]) -> str:
    return f"after passes: {', '.join(r.name for r in records)}" if records else "the first pass"


def _check(pass_: Pass, result: VerifyResult) -> None:
    """Raise the right error for a failed verification: an exact pass that changed the numerics is a bug
    in that pass; an approximate one past the tolerance is a tolerance the user chose."""
    if result.ok:
        return
    if not pass_.exact:
        raise ToleranceError(
            f"{pass_.name}: the output's relative error {result.output_max_rel:.3g} exceeds --max-error "
            f"{result.tolerance:g}; raise --max-error or tighten {pass_.name}'s options (see effcompile "
            "--list-passes)")
    raise VerificationError(f"{pass_.name}: verification failed: {'; '.join(result.failures[:3])}; this exact "
                            f"pass changed the numerics, a bug in the pass: report it (or skip the pass)")


def _counts(old: Program, new: Program, before: Analysis | None, after: Analysis | None) -> dict[str, Any]:
    counts: dict[str, Any] = {
        "nodes_before": len(old.gm.graph.nodes), "nodes_after": len(new.gm.graph.nodes),
        "params_before": parameter_count(old.gm), "params_after": parameter_count(new.gm),
        "trainable_before": parameter_count(old.gm, True), "trainable_after": parameter_count(new.gm, True),
    }
    if before is not None and after is not None:
        counts.update(saved_activation_bytes_before=before.saved_activation_bytes,
                      saved_activation_bytes_after=after.saved_activation_bytes,
                      flops_before=before.total_flops, flops_after=after.total_flops)
    return counts
