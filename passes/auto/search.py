"""The search behind ``--passes auto``: enumerate stacks, build and predict them, prune, time the survivors,
choose the fastest that fits.

1. Enumerate the stacks of registered passes (``space``); a stack without ``amp`` is pruned where the device
   runs bf16 matmuls at ≥ 2× float32's rate (its ``amp`` variant is a candidate).
2. Build each stack, fullest first (shared prefixes once, without verification: the winner is verified
   afterwards), until half the budget is spent, and predict its step time and memory from the shared cost
   model (``cost``). A stack that does not fit the
   memory limit gets ``remat`` variants (budgets, per-block, offload where the pass offers it).
3. Prune: predicted over the memory limit; predicted slower than the best prediction by more than
   ``prune_margin``.
4. Time the rest eagerly in predicted order, for a few real training steps each (``measure``), until the
   budget is spent; stop timing a candidate as soon as its fastest step is slower than the best median by
   ``stop_margin``. On CUDA, then time the best one compiled when the cost model expects compiling to pay
   (even past the budget: compiling the winner is work its training needs anyway, and Inductor's cache
   keeps it; its compile time is reported apart).
5. Choose the fastest measured candidate that fits; among those within ``tie_margin`` of it, the one with
   the fewest approximations, then eager over compiled.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from effcompile.analysis import Analysis, DeviceProfile, analyze
from effcompile.errors import EffcompileError, PassError
from effcompile.options import build_config
from effcompile.pass_manager import Pass, PassManager, PassRecord
from effcompile.program import Program
from effcompile.report import human_bytes

from .cost import Prediction, predict
from .measure import Timing, program_device, time_training_steps
from .space import (
    Candidate,
    SpaceContext,
    Step,
    approximate_parts,
    make_step,
    pass_choices,
    stacks,
    with_step,
)

log = logging.getLogger(__name__)

LOW_PRECISION_PASS = "amp"
MEMORY_PASS = "remat"


@dataclass(frozen=True)
class Settings:
    """The search's limits and margins (``Auto.Config`` resolved): memory limit in bytes, budget in seconds."""

    memory_limit: int
    memory_source: str
    budget_seconds: float
    warmup: int = 2
    steps: int = 5
    stop_margin: float = 0.1
    prune_margin: float = 1.0
    tie_margin: float = 0.03
    compile: str = "auto"


@dataclass
class SearchResult:
    """The winner, every candidate, the winner's program and pass records, the programs after each of its
    passes (``chain``, the input first), the search's wall time and notes."""

    winner: Candidate
    candidates: list[Candidate]
    program: Program
    records: list[PassRecord]
    chain: list[Program]
    seconds: float
    why: str
    notes: list[str] = field(default_factory=list)


class Builder:
    """Programs for stacks, each prefix built once: ``build(stack)`` returns the program and the records."""

    def __init__(self, program: Program, passes: Mapping[str, type[Pass]]) -> None:
        self.passes = passes
        self.cache: dict[tuple[Step, ...], tuple[Program, list[PassRecord]]] = {(): (program, [])}

    def build(self, stack: tuple[Step, ...]) -> tuple[Program, list[PassRecord]]:
        """The program after ``stack``'s passes (raises EffcompileError when a pass refuses)."""
        known = max(i for i in range(len(stack) + 1) if stack[:i] in self.cache)
        program, records = self.cache[stack[:known]]
        for index in range(known, len(stack)):
            name, items = stack[index]
            cls = self.passes[name]
            config = build_config(name, cls.Config, dict(items))
            result = PassManager([(cls(), config)], verify=False, measure=False).run(program)
            program, records = result.program, [*records, *result.records]
            self.cache[stack[:index + 1]] = (program, records)
        return program, records

    def chain(self, stack: tuple[Step, ...]) -> list[Program]:
        """The input program and the program after each pass of a built ``stack``."""
        return [self.cache[stack[:i]][0] for i in range(len(stack) + 1)]


class Search:
    """One search over ``program`` (see the module docstring)."""

    def __init__(self, program: Program, passes: Mapping[str, type[Pass]], context: SpaceContext, profile: DeviceProfile,
                 settings: Settings) -> None:
        self.program, self.passes, self.context, self.profile, self.settings = program, passes, context, profile, settings
        self.device = program_device(program)
        self.builder = Builder(program, passes)
        self.analyses: dict[tuple[Step, ...], Analysis] = {}
        self.predictions: dict[tuple[Step, ...], Prediction] = {}
        self.candidates: list[Candidate] = []
        self.notes: list[str] = []
        self.started = time.perf_counter()
        self.compile_seconds = 0.0

    # ------------------------------------------------------------------ the steps
    def run(self) -> SearchResult:
        """Search and return the result. Raises PassError (one line) when no candidate fits the memory limit
        or none could be timed."""
        choices, left_out = pass_choices(self.passes, self.context)
        self.notes.extend(f"{name}: {why}" for name, why in left_out.items())
        for stack in sorted(stacks(self.passes, choices), key=len, reverse=True):  # fullest stacks first
            self._consider(Candidate(stack, approximate=bool(approximate_parts(stack, self.passes))))
        if MEMORY_PASS in choices:
            self._add_memory_variants(choices[MEMORY_PASS])
        self._prune()
        self._time_eager()
        self._time_compiled()
        return self._choose()

    def elapsed(self) -> float:
        """Seconds since the search started, minus the compile time of compiled candidates (see ``Settings``)."""
        return time.perf_counter() - self.started - self.compile_seconds

    def _consider(self, candidate: Candidate) -> None:
        self.candidates.append(candidate)
        names = candidate.names
        if (LOW_PRECISION_PASS in self.passes and LOW_PRECISION_PASS not in names
                and self.profile.matmul_rate(torch.bfloat16) >= 2 * self.profile.matmul_rate(torch.float32)):
            factor = self.profile.matmul_rate(torch.bfloat16) / self.profile.matmul_rate(torch.float32)
            candidate.status = "pruned"
            candidate.reason = (f"float32 matmuls: bf16 runs at {factor:.0f}× their rate on {self.profile.name} "
                                "(cost model); the same stack with amp is a candidate")
            return
        if self.elapsed() > self.settings.budget_seconds / 2 and self.predictions:
            candidate.status = "not built"
            candidate.reason = "half the search budget went to building and predicting; the rest is for timing"
            return
        self._evaluate(candidate)

    def _evaluate(self, candidate: Candidate, base: Candidate | None = None) -> None:
        """Build the stack and predict its time and memory (``base``: the same stack without a recomputing
        pass); mark it unavailable / duplicate when it cannot be built or a pass changed nothing."""
        try:
            program, records = self.builder.build(candidate.steps)
        except EffcompileError as error:
            candidate.status, candidate.reason = "unavailable", str(error)
            return
        idle = [r for r in records if not r.changed]
        if idle:
            candidate.status = "duplicate"
            candidate.reason = f"{idle[0].name} changed nothing ({idle[0].reason}); a shorter stack is a candidate"
            return
        try:
            analysis = self.analyses.get(candidate.steps) or analyze(program)
        except torch.OutOfMemoryError:
            candidate.status, candidate.reason = "over memory", "the cost model's forward ran out of device memory"
            return
        self.analyses[candidate.steps] = analysis
        prediction = predict(program.gm, analysis, self.profile, candidate.compile, records,
                             self.predictions.get(base.steps) if base is not None else None)
        self.predictions[candidate.steps] = prediction
        candidate.predicted_seconds, candidate.predicted_bytes = prediction.seconds, prediction.bytes
        candidate.extra["predicted_parts"] = {k: float(f"{v:.4g}") for k, v in prediction.parts.items()}

    def _add_memory_variants(self, remat_choices: list[dict[str, Any]], most: int = 2) -> None:
        """``remat`` variants of the ``most`` stacks predicted fastest among those over the memory limit."""
        limit = self.settings.memory_limit
        over = sorted((c for c in self.candidates if c.status == "candidate" and c.predicted_bytes is not None
                       and c.predicted_bytes > limit), key=lambda c: c.predicted_seconds)
        if not over:
            self.notes.append(f"{MEMORY_PASS}: not needed (every candidate is predicted to fit in "
                              f"{human_bytes(limit)}); it only adds recomputation")
            return
        fits = sum(1 for c in self.candidates if c.status == "candidate" and c.predicted_bytes is not None
                   and c.predicted_bytes <= limit)
        self.notes.append(f"{MEMORY_PASS}: variants of the {min(most, len(over))} fastest-predicted of the "
                          f"{len(over)} stacks over the limit ({fits} fit without it)")
        for base in over[:most]:
            for options in remat_choices:
                stack = with_step(base.steps, make_step(MEMORY_PASS, options), self.passes)
                candidate = Candidate(stack, approximate=base.approximate)
                self.candidates.append(candidate)
                self._evaluate(candidate, base)

    def _prune(self) -> None:
        limit = self.settings.memory_limit
        live = [c for c in self.candidates if c.status == "candidate"]
        for candidate in live:
            if candidate.predicted_bytes is not None and candidate.predicted_bytes > limit:
                candidate.status = "over memory"
                candidate.reason = f"predicted {human_bytes(candidate.predicted_bytes)} > limit {human_bytes(limit)}"
        live = [c for c in live if c.status == "candidate" and c.predicted_seconds is not None]
        if not live:
            return
        best = min(c.predicted_seconds for c in live)
        for candidate in live:
            if candidate.predicted_seconds > best * (1 + self.settings.prune_margin):
                candidate.status = "pruned"
                candidate.reason = (f"predicted {candidate.predicted_seconds * 1e3:.3g} ms > "
                                    f"{1 + self.settings.prune_margin:.2g}× the best prediction ({best * 1e3:.3g} ms)")

    # ------------------------------------------------------------------ timing
    def _best_measured(self) -> Candidate | None:
        fitting = [c for c in self.candidates if c.status == "timed"]
        return min(fitting, key=lambda c: c.measured_seconds, default=None)

    def _time_eager(self) -> None:
        queue = sorted((c for c in self.candidates if c.status == "candidate"), key=lambda c: c.predicted_seconds)
        for candidate in queue:
            if self._best_measured() is not None and self.elapsed() >= self.settings.budget_seconds:
                candidate.status = "not timed"
                candidate.reason = f"search budget ({self.settings.budget_seconds:g} s) spent"
                continue
            self._time(candidate)

    def _time(self, candidate: Candidate, within_budget: bool = True) -> None:
        program, _ = self.builder.build(candidate.steps)
        best = self._best_measured()
        margin = self.settings.stop_margin

        def should_stop(seconds: list[float]) -> str | None:
            if best is not None and min(seconds) > best.measured_seconds * (1 + margin):
                return (f"stopped after {len(seconds)} steps: fastest {min(seconds) * 1e3:.3g} ms > "
                        f"{1 + margin:g}× the best ({best.label}, {best.measured_seconds * 1e3:.3g} ms)")
            return None

        transient = int(candidate.extra.get("predicted_parts", {}).get("largest_tensor_bytes", 0) * 2)
        deadline = self.started + self.compile_seconds + self.settings.budget_seconds if within_budget else math.inf
        warmup = self.settings.warmup + (1 if candidate.compile else 0)
        timing = time_training_steps(program, candidate.compile, warmup, self.settings.steps, should_stop,
                                     deadline, transient)
        self._record(candidate, timing)

    def _record(self, candidate: Candidate, timing: Timing) -> None:
        candidate.steps_timed = len(timing.seconds)
        candidate.first_step_seconds = timing.first_step_seconds
        candidate.measured_bytes, candidate.memory_source = timing.peak_bytes, timing.memory_source
        if timing.seconds:
            candidate.measured_seconds = timing.median
            candidate.measured_min_seconds, candidate.measured_max_seconds = min(timing.seconds), max(timing.seconds)
        if candidate.compile and timing.first_step_seconds is not None and timing.median is not None:
            warmup_steps = self.settings.warmup + 1
            compile_seconds = max(0.0, timing.warmup_seconds - warmup_steps * timing.median)
            candidate.extra["compile_seconds"] = round(compile_seconds, 3)
            self.compile_seconds += compile_seconds
        if timing.error:
            candidate.status = "over memory" if timing.error == "out of memory" else "failed"
            candidate.reason = timing.error
        elif timing.stopped and not timing.stopped.startswith("search budget"):
            candidate.status, candidate.reason = "stopped", timing.stopped
        elif timing.peak_bytes is not None and timing.peak_bytes > self.settings.memory_limit:
            candidate.status = "over memory"
            candidate.reason = (f"measured {human_bytes(timing.peak_bytes)} > limit "
                                f"{human_bytes(self.settings.memory_limit)}")
        else:
            candidate.status = "timed"
            candidate.reason = timing.stopped or ""

    def _time_compiled(self) -> None:
        """On CUDA: the best eager candidate compiled, when the cost model expects a gain (``compile=auto``)
        or always (``on``)."""
        best = self._best_measured()
        if self.settings.compile == "off":
            self.notes.append("torch.compile: off (auto.compile=off)")
            return
        if self.device.type != "cuda" and self.settings.compile != "on":
            self.notes.append(f"torch.compile: not a candidate on {self.device.type} (compile time does not pay "
                              "for CPU training here; auto.compile=on times it anyway)")
            return
        if best is None:
            return
        twin = best.twin(compile=True)
        self.candidates.append(twin)
        analysis = self.analyses[best.steps]
        program, records = self.builder.build(best.steps)
        eager = predict(program.gm, analysis, self.profile, False, records).seconds
        compiled = predict(program.gm, analysis, self.profile, True, records)
        twin.predicted_seconds, twin.predicted_bytes = compiled.seconds, compiled.bytes
        ratio = compiled.seconds / max(eager, 1e-12)
        twin.extra["predicted_gain_over_eager"] = round(1 / ratio, 3)
        if self.settings.compile == "auto" and ratio > 0.97:
            twin.status, twin.reason = "pruned", f"the cost model expects compiling to gain {1 / ratio:.2f}× only"
            return
        self._time(twin, within_budget=False)  # past the budget too: compiling the winner is work training needs (and caches) anyway

    # ------------------------------------------------------------------ the choice
    def _choose(self) -> SearchResult:
        timed = sorted((c for c in self.candidates if c.status == "timed"), key=lambda c: c.measured_seconds)
        eligible = [c for c in timed if c.compile] if self.settings.compile == "on" else timed
        eligible = eligible or timed
        if not eligible:
            raise PassError(self._nothing_fits())
        fastest = eligible[0]
        close = [c for c in eligible if c.measured_seconds <= fastest.measured_seconds * (1 + self.settings.tie_margin)]
        winner = min(close, key=lambda c: (len(approximate_parts(c.steps, self.passes)), c.compile, len(c.steps),
                                           c.measured_seconds))
        why = self._why(winner, fastest, timed)
        for candidate in timed:
            if candidate is winner:
                continue
            candidate.status = "lost"
            slower = candidate.measured_seconds / winner.measured_seconds
            if candidate not in eligible:
                candidate.reason = "auto.compile=on: only compiled candidates may win"
            elif slower > 1:
                candidate.reason = f"{slower:.2f}× the winner's step time"
            else:
                candidate.reason = (f"within {self.settings.tie_margin:.0%} of the fastest but makes more "
                                    "approximations, compiles or runs more passes")
        winner.status, winner.reason = "winner", why
        program, records = self.builder.build(winner.steps)
        return SearchResult(winner, self.candidates, program, records, self.builder.chain(winner.steps),
                            time.perf_counter() - self.started, why, self.notes)

    def _why(self, winner: Candidate, fastest: Candidate, timed: list[Candidate]) -> str:
        limit = human_bytes(self.settings.memory_limit)
        memory = f"{human_bytes(winner.measured_bytes)} ≤ limit {limit}" if winner.measured_bytes else \
            f"within the limit {limit}"
        others = [c for c in timed if c is not winner]
        if winner is not fastest:
            return (f"within {self.settings.tie_margin:.0%} of the fastest ({fastest.label}, "
                    f"{fastest.measured_seconds * 1e3:.3g} ms) with fewer approximations, no compilation or fewer "
                    "passes; "
                    f"{winner.measured_seconds * 1e3:.3g} ms per step, {memory}")
        if not others:
            return f"the only candidate timed that fits: {winner.measured_seconds * 1e3:.3g} ms per step, {memory}"
        runner_up = others[0]
        return (f"fastest measured step that fits: {winner.measured_seconds * 1e3:.3g} ms against "
                f"{runner_up.label} {runner_up.measured_seconds * 1e3:.3g} ms "
                f"({runner_up.measured_seconds / winner.measured_seconds:.2f}×); {memory}")

    def _nothing_fits(self) -> str:
        limit = human_bytes(self.settings.memory_limit)
        over = [(c.measured_bytes or c.predicted_bytes, c) for c in self.candidates
                if c.status == "over memory" and (c.measured_bytes or c.predicted_bytes)]
        if over:
            smallest, candidate = min(over, key=lambda item: item[0])
            return (f"auto: no candidate fits the memory limit {limit} ({self.settings.memory_source}); the "
                    f"smallest, {candidate.label}, needs {human_bytes(smallest)}; raise --set auto.memory or train a "
                    "smaller batch")
        failed = [c for c in self.candidates if c.status in ("failed", "over memory")]
        if failed:
            return f"auto: no candidate could be timed; {failed[0].label} failed: {failed[0].reason}"
        return "auto: no candidate could be built and timed; run with --debug and report it"
