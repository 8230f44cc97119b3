"""``auto``: choose the passes, their options and the way to run (eager or ``torch.compile``) for this model,
this device and a memory limit, by predicting and then timing real training steps.

1. Candidates come from the registry (``space``): stacks of ``amp`` (bf16), ``fuse``, ``remat`` budgets (and
   offload where the pass offers it), and — only when ``allow`` names them — approximate passes (``sas``
   patterns and densities, ``lowrank``, ``float8``), each option checked against the pass's ``Config``;
   ``torch.compile`` is a candidate way to run on CUDA.
2. The shared cost model predicts each stack's step time and memory (``cost``); stacks over the memory
   limit get ``remat`` variants; stacks predicted over the limit, or much slower than the best, are pruned.
3. The survivors are timed for a few real training steps each on a copy (forward, backward, AdamW step;
   warm-up excluded) within ``budget_seconds``, dropping a candidate once it is slower than the best by
   ``stop_margin`` (``search``).
4. The fastest measured candidate within the memory limit wins (ties within ``tie_margin``: fewer
   approximations, then eager); each exact pass of its stack is verified against its input, the program
   becomes the winner's and an ``ExecutionPlan`` says whether to compile it. The record lists every
   candidate with its stack, options, predicted and measured time and memory, its status and why.

``auto`` never trains the returned module: every timing runs on a copy.
"""

from __future__ import annotations

import gc
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from effcompile.analysis import float8_gemm_choice, local_profile
from effcompile.errors import OptionError, PassError, VerificationError
from effcompile.pass_manager import Pass, PassRecord, register, registry
from effcompile.passes.remat import parse_bytes
from effcompile.patterns import find_linears
from effcompile.plans import ExecutionPlan
from effcompile.program import Program
from effcompile.verify import compare

from .cost import available_memory
from .measure import program_device
from .search import Search, SearchResult, Settings
from .space import SpaceContext, allowed_names

log = logging.getLogger(__name__)

__all__ = ["Auto"]


@register
class Auto(Pass):
    """Search the registered passes for the fastest training stack that fits in memory."""

    name = "auto"
    summary = ("choose passes, options and torch.compile by cost model + timed training steps, within a memory "
               "limit (approximate passes only when allowed)")
    exact = False  # bf16 amp is always a candidate
    after = ("lora", "lowrank", "sas", "fuse", "amp", "remat")  # searches on top of passes chosen by hand

    @dataclass(frozen=True)
    class Config:
        memory: float | str = field(default=1.0, metadata={
            "help": "memory limit: a fraction of the device's available memory (1.0) or a size ('40GiB')"})
        allow: tuple[str, ...] = field(default=(), metadata={
            "help": "approximate passes the search may use (comma-separated: sas, float8, lowrank); exact passes "
                    "and bf16 amp always may"})
        budget_seconds: float = field(default=30.0, metadata={
            "help": "wall time of the search (building, predicting, timing); a compiled candidate's compile time "
                    "is reported apart"})
        steps: int = field(default=5, metadata={"help": "timed training steps per candidate"})
        warmup: int = field(default=2, metadata={"help": "untimed steps first (one more when compiled)"})
        compile: Literal["auto", "on", "off"] = field(default="auto", metadata={
            "help": "torch.compile: auto (a candidate on CUDA when the cost model expects a gain), on (the best stack "
                    "runs compiled, on any device), off"})
        stop_margin: float = field(default=0.1, metadata={
            "help": "stop timing a candidate whose fastest step is this much slower than the best median"})
        prune_margin: float = field(default=1.0, metadata={
            "help": "do not time candidates predicted this much slower than the best prediction"})
        tie_margin: float = field(default=0.03, metadata={
            "help": "within this of the fastest, prefer fewer approximations, then eager"})
        sas_patterns: tuple[str, ...] = field(default=("local",), metadata={
            "help": "sas patterns to try when sas is allowed (local keeps every query's nearest keys)"})
        sas_densities: tuple[float, ...] = field(default=(0.25, 0.5), metadata={
            "help": "sas: fractions of the causal attention pairs kept"})
        remat_budgets: tuple[float, ...] = field(default=(0.5, 0.25), metadata={
            "help": "remat budgets tried for stacks over the memory limit (and per-block, offload)"})

        def __post_init__(self) -> None:
            memory = self.memory
            try:
                value = float(memory) if not isinstance(memory, str) or _is_number(memory) else parse_bytes(memory)
            except ValueError:
                raise OptionError(f"auto: memory {memory!r} is neither a fraction nor a size; write e.g. "
                                  "--set auto.memory=0.8 or auto.memory=40GiB") from None
            if not math.isfinite(value) or value <= 0 or 1 < value < 2**20:
                raise OptionError(f"auto: memory {memory!r} must be a fraction in (0, 1] of the available memory or "
                                  "a finite size of at least 1MiB (e.g. 40GiB)")
            allowed = allowed_names(registry())
            unknown = [a for a in self.allow if a not in allowed]
            if unknown:
                raise OptionError(f"auto: allow {', '.join(unknown)} unknown; choose from {', '.join(allowed)}")
            for name in ("budget_seconds", "stop_margin", "prune_margin", "tie_margin"):
                if not 0 <= getattr(self, name) < math.inf:
                    raise OptionError(f"auto: {name} {getattr(self, name)} must be a finite number ≥ 0")
            if self.steps < 1 or self.warmup < 0:
                raise OptionError(f"auto: steps {self.steps} must be ≥ 1 and warmup {self.warmup} ≥ 0")
            for name, values, interval in (("sas_densities", self.sas_densities, "(0, 1)"),
                                           ("remat_budgets", self.remat_budgets, "(0, 1]")):
                bad = [v for v in values if not (0 < v < 1 or (v == 1 and interval == "(0, 1]"))]
                if bad:
                    raise OptionError(f"auto: {name} holds {bad[0]}, not in {interval}; {name} are fractions")

    def needs_host_link(self, config: Config) -> bool:
        """Its memory-bound candidates may try ``remat.offload=auto``, which prices copies at the host link."""
        return True

    def requires(self, program: Program, config: Config) -> None:
        """Refuse a program that already has an execution plan (auto ran before on it)."""
        if program.plan(ExecutionPlan) is not None:
            raise PassError("auto: the program already has an execution plan (auto ran before); run auto once")

    def call(self, program: Program, config: Config) -> PassRecord:
        device = program_device(program)
        available, source = available_memory(device)
        size = _as_bytes(config.memory)
        limit = size if size is not None else int(float(config.memory) * available)
        limit_source = "auto.memory" if size is not None else \
            f"{float(config.memory):g} × {source}, {available / 2**30:.1f} GiB"
        context = SpaceContext(device.type, _sequence_length(program), frozenset(config.allow), config.sas_patterns,
                               config.sas_densities, config.remat_budgets, _float8_gain(program))
        settings = Settings(limit, limit_source, config.budget_seconds, config.warmup, config.steps,
                            config.stop_margin, config.prune_margin, config.tie_margin, config.compile)
        passes = {n: cls for n, cls in registry().items() if n != self.name}
        result = Search(program, passes, context, local_profile(device), settings).run()
        gc.collect()  # the candidates' programs (reference cycles) hold device memory
        _verify(result)
        return self._install(program, result, settings, device)

    def _install(self, program: Program, result: SearchResult, settings: Settings, device: torch.device) -> PassRecord:
        winner = result.winner
        chosen = result.program
        program.gm, program.plans, program.meta = chosen.gm, dict(chosen.plans), {**program.meta, **chosen.meta}
        plan = ExecutionPlan(compile=winner.compile, stack=winner.names, options=winner.options, chosen_by=self.name,
                             reason=result.why)
        program.set_plan(plan)
        counts: dict[str, int] = {}
        for candidate in result.candidates:
            counts[candidate.status] = counts.get(candidate.status, 0) + 1
        summary = (f"chose {winner.label}: {winner.measured_seconds * 1e3:.3g} ms/step; {len(result.candidates)} "
                   f"candidates ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}) in {result.seconds:.1f} s")
        details: dict[str, Any] = {
            "summary": summary, "winner": winner.to_dict(), "why": result.why, "execution": plan.to_dict(),
            "candidates": [c.to_dict() for c in result.candidates], "notes": result.notes,
            "memory_limit_bytes": settings.memory_limit, "memory_limit_source": settings.memory_source,
            "budget_seconds": settings.budget_seconds, "search_seconds": round(result.seconds, 3),
            "compile_seconds": round(sum(c.extra.get("compile_seconds", 0.0) for c in result.candidates), 3),
            "device": str(device), "passes": [r.to_dict() for r in result.records]}
        changed = bool(winner.steps) or winner.compile
        reason = "" if changed else f"the captured program, eager, was fastest ({result.why})"
        log.info("auto: %s", summary)
        return PassRecord(self.name, changed=changed, reason=reason, details=details,
                          stats={"auto_candidates": len(result.candidates),
                                 "auto_search_seconds": round(result.seconds, 3)})


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _as_bytes(memory: float | str) -> int | None:
    """``memory`` in bytes when it is a size (a unit, or a number above 1), None when it is a fraction."""
    value = float(memory) if not isinstance(memory, str) or _is_number(memory) else parse_bytes(memory)
    return int(value) if value > 1 else None


def _sequence_length(program: Program) -> int | None:
    """The length of the example's token inputs (integer tensors of rank 2), if any."""
    for value in [*program.args, *program.kwargs.values()]:
        if isinstance(value, torch.Tensor) and value.dim() == 2 and not value.is_floating_point():
            return int(value.shape[1])
    return None


def _float8_gain(program: Program) -> bool:
    """Whether the cost model expects float8 to pay on some linear (``float8_gemm_choice``)."""
    sites = [s for s in find_linears(program.gm) if s.weight_layout == "out_in"]
    return any(float8_gemm_choice(s.in_features, s.out_features, i == 0, i == len(sites) - 1)[0]
               for i, s in enumerate(sites))


def _verify(result: SearchResult) -> None:
    """Verify each pass of the winner's stack against its input, as the pass manager does (exact passes must
    keep the numerics; approximate ones record their error). Raises VerificationError."""
    for record, before, after in zip(result.records, result.chain, result.chain[1:]):
        record.verify = compare(before, after, record.exact)
        if not record.verify.ok:
            raise VerificationError(f"auto: {record.name} (in the chosen stack) failed verification: "
                                    f"{'; '.join(record.verify.failures[:3])}; this is a bug in that pass, report it")
