"""``remat``: recompute cheap activations in backward, or offload them to host memory, instead of keeping
them on the device, to fit a memory budget.

1. Measure the graph once (``effcompile.analysis``): per node, the storages autograd saves for backward,
   the storages of its outputs and its forward FLOPs. Compute nodes are those that depend on a trainable
   parameter; shape/mask arithmetic and ``sym_size`` stay outside every segment.
2. Cut the compute nodes into regions, one per repeated block (``block_index`` of the module path) and
   one per run outside the blocks (embeddings, head + loss). A region is a sequence of units: the ops
   of the ``save`` classes (matmuls, attention) and the runs between them. Candidate segments: each
   fine run (recomputes only the cheap ops between saved ops), each prefix and suffix of the region
   (part-block segments), and the whole region.
3. Choose the segments (policy ``budget``): minimise the recompute cost (``cost``: FLOPs, or by
   default a roofline time estimate on a device profile, from ``effcompile.analysis``) subject to the predicted *peak* of
   saved activations ≤ budget. Kept bytes count a storage once: what un-checkpointed nodes save plus
   every checkpointed segment's inputs. Solver: per region, every set of disjoint candidates is costed
   (kept bytes of the region's own storages, largest recompute transient, FLOPs) — identical regions
   (repeated blocks) once — then a knapsack over regions in graph order (memory in 1/4000 steps of the
   baseline, rounded up) picks one option per region, allowing a region's recomputation only while
   (kept so far + its transient) ≤ budget − storages shared between regions. Exact within that model
   (which bounds ``evaluate``'s peak from above); a region with over 50 000 plans falls back to a
   greedy pass (fine segments by FLOPs per byte freed, then whole regions). A budget below the smallest
   reachable peak (bisection over the knapsack) raises PassError naming it. A MILP
   (``scipy.optimize.milp``) was tried first: on 24 identical blocks HiGHS hit its time limit
   (symmetry), the per-region DP solves the same model in ~1 s.
   Policy ``blocks`` checkpoints every repeated block; ``sqrt`` groups ⌈√L⌉ consecutive blocks per
   segment (Chen et al. 2016). Both ignore ``budget``. With ``offload`` ``auto``/``on`` each kept
   activation may instead go to pinned host memory (the DP's offload stage, ``solve``: a copy costs only
   what the next region's compute cannot hide at the host link's bandwidth; ``on`` and the ``blocks``/
   ``sqrt`` policies then offload every further kept activation whose copies hide completely).
4. Rewrite: each chosen segment becomes a stateless sub-GraphModule called through
   ``CheckpointedSegment`` → ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``. Parameters,
   buffers and submodules stay in the parent (names unchanged) and enter as inputs; SymInt/int values
   cross the boundary as plain Python ints; segments holding dropout/random ops keep the RNG state so
   the recomputation draws the same numbers. Gradients are exact. Offloaded activations are marked in the
   graph and the span that holds them runs under ``OffloadedSpan``'s saved-tensor hooks (``offload``):
   side-stream copies out in the forward, prefetched back in the backward; gradients are bit-identical.
5. Loss head (option ``head``, default ``auto``: whenever the plan must save memory, and for ``blocks`` and
   ``sqrt``): a linear + cross-entropy head becomes one chunked call (``head``) that keeps only a
   per-row log-sum-exp and recomputes each chunk's logits in backward — the float32 logits, log-softmax and
   logits gradient of a large vocabulary are never whole. The plan is then made on the rewritten graph
   (budget in bytes of the original baseline). Exact to round-off; costs one more LM-head matmul.
6. A graph that already holds checkpointed segments, an offload span or a chunked head, or a budget met
   without recomputation (e.g. 1.0), is left unchanged (``changed=False``). The plan is stored on the
   Program as a ``RematPlan`` (``program.plan(RematPlan)``) and is the record's details.

Bytes are those of the program's example inputs on the device it was captured on (a ``2GiB`` budget
refers to that batch); a fraction scales with the batch. With ``autocast=bfloat16`` the cost model runs
under ``torch.autocast`` so that the plan sees what autocast training saves (bf16 copies of matmul
inputs, cached bf16 weight casts, float32 norms); segments recompute under the same autocast state.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.fx

from effcompile.analysis import (
    DEFAULT_ACCELERATOR,
    Analysis,
    DeviceProfile,
    HostLink,
    analyze,
    cost_seconds,
    device_profile,
    measure_forward_seconds,
)
from effcompile.errors import OptionError, PassError
from effcompile.pass_manager import Pass, PassRecord, register
from effcompile.program import Program

from .head import chunk_loss_heads, is_chunked_head
from .offload import OffloadedSpan, SimulatedLink
from .offload_graph import insert_offload, is_offload_span, offload_model, producers
from .plan import (
    SAVE_CLASSES,
    Candidate,
    Evaluation,
    Problem,
    blocks_plan,
    budget_candidates,
    build_problem,
    evaluate,
    save_nodes,
    sqrt_plan,
)
from .record import OffloadedStorage, RematPlan, step_seconds, summary
from .segment import extract_segment, is_segment
from .solve import OffloadModel, exposed_seconds, optimise, smallest_peak, widen_offload

__all__ = ["Remat", "RematPlan", "OffloadedStorage", "OffloadedSpan", "SimulatedLink", "parse_bytes"]

log = logging.getLogger(__name__)

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> float:
    """``"2GiB"`` → 2147483648.0, ``"512MB"`` → 5.12e8, ``"1e9"`` → 1e9. Raises ValueError."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(text)
    return float(match.group(1)) * _UNITS[match.group(2).lower()]


@register
class Remat(Pass):
    """Checkpoint the segments that fit a memory budget at the least estimated recompute cost."""

    name = "remat"
    summary = "recompute cheap activations in backward (non-reentrant checkpoint segments) to fit a memory budget"
    exact = True
    after = ("lora", "lowrank", "sas", "fuse", "amp")  # remat plans on the final graph

    @dataclass(frozen=True)
    class Config:
        budget: float | str = field(default=0.5, metadata={
            "help": "peak saved-activation memory allowed: a fraction of the un-checkpointed model's (0.5) "
                    "or bytes at the example batch ('2GiB', '800MB'); policy=budget only"})
        policy: Literal["budget", "blocks", "sqrt"] = field(default="budget", metadata={
            "help": "budget: optimise segments for the budget; blocks: checkpoint every repeated block; "
                    "sqrt: ⌈√L⌉ blocks per segment (Chen et al.)"})
        cost: Literal["time", "flops"] = field(default="time", metadata={
            "help": "what recomputation costs: time (roofline: max(FLOPs, bytes moved), plus a per-segment "
                    "overhead) or flops (forward FLOPs only)"})
        autocast: Literal["off", "bfloat16", "float16"] = field(default="off", metadata={
            "help": "plan for training under torch.autocast with this dtype (what is saved differs: bf16 "
                    "matmul inputs, cached weight casts); off: as captured"})
        head: Literal["auto", "chunked", "keep"] = field(default="auto", metadata={
            "help": "the linear + cross-entropy loss head: chunked computes it in row chunks and recomputes each "
                    "chunk's logits in backward (full logits' float32 loss state never held); auto: chunked "
                    "whenever remat has memory to save; keep: as captured"})
        head_rows: int = field(default=0, metadata={
            "help": "rows per loss-head chunk (0: about 256 MiB of float32 logits per chunk)"})
        save: tuple[str, ...] = field(default=("matmul", "attention"), metadata={
            "help": "op classes fine-grained segments never recompute (comma-separated: matmul, attention, "
                    "norm; empty: none) — only whole-block segments recompute them"})
        offload: Literal["off", "auto", "on"] = field(default="off", metadata={
            "help": "keep / recompute / offload each saved activation to pinned host memory (side stream, "
                    "prefetched in backward): auto: offload where the link model says it is cheaper than "
                    "recomputing; on: also offload every further kept activation whose copies hide; off: "
                    "recompute only"})
        link_bandwidth: float | str = field(default=0.0, metadata={
            "help": "host link bytes/s per direction for the offload model ('45GB'); 0: measured once per "
                    "CUDA device and cached, else the device profile's"})
        device: Literal["auto", "h200", "h100", "cpu"] = field(default="auto", metadata={
            "help": "the device profile costs are estimated for; auto: the CUDA device the program is on, "
                    "else h200 (a program captured on the CPU is planned for GPU training)"})
        offload_min_bytes: float | str = field(default="1MiB", metadata={
            "help": "smallest tensor offload may move (smaller ones cost more in hooks than they free)"})
        time_scale: float = field(default=0.0, metadata={
            "help": "real (eager) forward seconds ÷ the roofline's, for the compute copies can hide behind; "
                    "0: measured when offloading a program on a CUDA device, else the device profile's"})

        def __post_init__(self) -> None:
            if isinstance(self.time_scale, bool) or not isinstance(self.time_scale, (int, float)) or \
                    not 0 <= self.time_scale < math.inf:
                raise OptionError(f"remat: time_scale {self.time_scale!r} must be a finite number ≥ 0 (0: automatic)")
            for name in ("link_bandwidth", "offload_min_bytes"):
                value = getattr(self, name)
                try:
                    number = parse_bytes(value.removesuffix("/s")) if isinstance(value, str) else value
                    if isinstance(number, bool) or not isinstance(number, (int, float)) or not 0 <= number < math.inf:
                        raise ValueError(value)
                except ValueError:
                    raise OptionError(f"remat: {name} {value!r} must be a finite number of bytes ≥ 0, e.g. 45GB or "
                                      "4.5e10") from None
                object.__setattr__(self, name, float(number))
            if isinstance(self.head_rows, bool) or not isinstance(self.head_rows, int) or self.head_rows < 0:
                raise OptionError(f"remat: head_rows {self.head_rows!r} must be a whole number ≥ 0 (0: automatic)")
            unknown = [c for c in self.save if c not in SAVE_CLASSES]
            if unknown:
                raise OptionError(f"remat: save {', '.join(unknown)} unknown; choose from {', '.join(SAVE_CLASSES)}")
            budget = self.budget
            if isinstance(budget, str):
                try:
                    budget = float(budget)
                except ValueError:
                    try:
                        if parse_bytes(budget) <= 0:
                            raise ValueError(budget)
                    except ValueError:
                        raise OptionError(f"remat: budget {self.budget!r} is neither a fraction nor a size; "
                                          "write e.g. --set remat.budget=0.5 or remat.budget=2GiB") from None
                    return
                object.__setattr__(self, "budget", budget)
            if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
                raise OptionError(f"remat: budget={self.budget!r} is not allowed: a fraction of the un-checkpointed "
                                  "model's saved activations must be > 0 and ≤ 1, in (0, 1] (e.g. 0.5), a size "
                                  "such as 2GiB > 0; fix --set remat.budget")

    def call(self, program: Program, config: Config) -> PassRecord:
        gm = program.gm
        existing = [n for n in gm.graph.nodes if is_segment(gm, n) or is_chunked_head(n) or is_offload_span(gm, n)]
        if existing:
            return PassRecord(self.name, changed=False, reason=f"graph already has {len(existing)} checkpointed "
                              "segments (remat ran before)", details={"summary": "already rematerialised"})
        profile = self._profile(program, config)
        analysis = self._analyze(program, config)
        problem = build_problem(gm, analysis, config.cost, profile)
        if not problem.compute or problem.baseline_bytes == 0:
            return PassRecord(self.name, changed=False, reason="nothing is saved for backward (no trainable "
                              "parameters reached)", details={"summary": "nothing to recompute"})
        budget_bytes = self._budget_bytes(config, problem.baseline_bytes)
        before = evaluate(problem, [])
        heads: list[str] = []
        wants_memory = config.policy != "budget" or budget_bytes < problem.baseline_bytes
        if config.head == "chunked" or (config.head == "auto" and wants_memory):
            heads = chunk_loss_heads(gm, config.head_rows)
            if heads:  # plan on the graph with the chunked head (same budget in bytes)
                analysis = self._analyze(program, config)
                problem = build_problem(gm, analysis, config.cost, profile)
        link = self._link(program, config, profile)
        scale = self._time_scale(program, config, profile, problem)
        model = offload_model(problem, gm, analysis, profile, link[0], config.offload_min_bytes,
                              config.offload == "on", scale[0]) if config.offload != "off" and link[0] > 0 else None
        plan, offloaded, solver = self._choose(config, gm, problem, analysis, budget_bytes, model)
        after = evaluate(problem, plan, offloaded)
        exposed = exposed_seconds(problem, offloaded, model) if model is not None else 0.0
        record = self._plan(config, gm, problem, analysis, plan, offloaded, (before, after), budget_bytes, solver,
                            heads, link, scale, exposed)
        details = record.details()
        if not plan and not heads and not offloaded:
            reason = "budget met without recomputation" if config.policy == "budget" else \
                f"policy {config.policy} found no repeated blocks or segments to checkpoint"
            return PassRecord(self.name, changed=False, reason=reason, details=details)
        for index, candidate in enumerate(sorted(plan, key=lambda c: c.start)):
            extract_segment(gm, candidate.members, index)
        insert_offload(gm, problem, analysis, offloaded)
        # Not graph.finalize: its dead-code pass drops unused get_attr nodes and then the modules they
        # name (HF GPT-2's tied transformer.wte), renaming parameters. Extraction leaves nothing dead.
        gm.graph.lint()
        gm.recompile()
        program.set_plan(record)
        stats = {"remat_segments": len(plan), "remat_predicted_saved_bytes_before": before.retained_bytes,
                 "remat_predicted_saved_bytes_after": after.retained_bytes,
                 "remat_predicted_peak_bytes_after": after.peak_bytes, "remat_recompute_flops": after.recompute_flops,
                 "remat_chunked_loss_heads": len(heads), "remat_offloaded_tensors": len(offloaded),
                 "remat_predicted_offloaded_bytes": after.offloaded_bytes}
        log.info("remat: %s", details["summary"])
        return PassRecord(self.name, changed=True, stats=stats, details=details)

    def _choose(self, config: Config, gm: torch.fx.GraphModule, problem: Problem, analysis: Analysis,
                budget_bytes: float, model: OffloadModel | None) -> tuple[list[Candidate], dict[int, int], str]:
        """The segments, the offloaded storages (id → region) and the solver's name for ``config.policy``."""
        if config.policy in ("blocks", "sqrt"):
            plan = blocks_plan(problem, analysis) if config.policy == "blocks" else sqrt_plan(problem, analysis)
            offloaded = widen_offload(problem, plan, {}, model, None) if model is not None else {}
            return plan, offloaded, config.policy + (" + offload" if offloaded else "")
        if budget_bytes >= problem.baseline_bytes:
            return [], {}, "none (budget met without recomputation)"
        candidates = budget_candidates(problem, analysis, save_nodes(gm, config.save))
        solution, solver = optimise(problem, candidates, budget_bytes, model)
        if solution is None:
            reachable = smallest_peak(problem, candidates, model)
            raise PassError(
                f"remat: budget {config.budget} ({budget_bytes / 2**20:.2f} MiB) is below the smallest "
                f"reachable ({reachable / problem.baseline_bytes:.3f} of baseline, "
                f"{reachable / 2**20:.2f} MiB at this batch); raise --set remat.budget")
        offloaded = solution.offloaded
        if model is not None and model.widen:
            offloaded = widen_offload(problem, solution.segments, offloaded, model, budget_bytes)
        return solution.segments, offloaded, solver + (" + offload" if offloaded else "")

    def needs_host_link(self, config: Config) -> bool:
        """Offloading without a given ``link_bandwidth`` prices copies at the measured host link."""
        return config.offload != "off" and not config.link_bandwidth

    @staticmethod
    def _analyze(program: Program, config: Config) -> Analysis:
        """The cost model's run, under autocast when the plan is for autocast training."""
        if config.autocast == "off":
            return analyze(program)
        parameter = next(program.gm.parameters(), None)
        device = parameter.device.type if parameter is not None else "cpu"
        with torch.autocast(device, dtype=getattr(torch, config.autocast)):
            return analyze(program)

    @staticmethod
    def _profile(program: Program, config: Config) -> DeviceProfile:
        if config.device != "auto":
            return device_profile(config.device)
        device = _program_device(program)
        return device_profile(device) if device.type == "cuda" else device_profile(DEFAULT_ACCELERATOR)

    @staticmethod
    def _link(program: Program, config: Config, profile: DeviceProfile) -> tuple[float, str]:
        """Host link bytes/s for the offload model and where the figure came from."""
        if config.offload == "off":
            return 0.0, "none"
        if config.link_bandwidth:
            return float(config.link_bandwidth), "option"
        device = _program_device(program)
        measured = program.plan(HostLink)  # measured by the caller (effcompile.compile): a pass does no I/O
        if device.type == "cuda" and config.device in ("auto", profile.name) and measured is not None:
            return measured.bytes_per_second, measured.source
        return profile.host_link_bytes_per_second, "default"

    @staticmethod
    def _time_scale(program: Program, config: Config, profile: DeviceProfile, problem: Problem) -> tuple[float, str]:
        """Real eager seconds ÷ roofline seconds, and where it came from: the option, a measured forward on
        the CUDA device the program is on (when offloading), else the profile's."""
        if config.time_scale:
            return float(config.time_scale), "option"
        device = _program_device(program)
        if config.offload == "off" or device.type != "cuda" or config.device not in ("auto", profile.name):
            return profile.eager_time_scale, "profile"
        roofline = cost_seconds(sum(problem.node_time.values()), profile)
        dtype = getattr(torch, config.autocast) if config.autocast != "off" else None
        return measure_forward_seconds(program, dtype) / max(roofline, 1e-12), "measured"

    @staticmethod
    def _budget_bytes(config: Config, baseline: int) -> float:
        if isinstance(config.budget, str):
            return parse_bytes(config.budget)
        return float(config.budget) * baseline

    @staticmethod
    def _plan(config: Config, gm: torch.fx.GraphModule, problem: Problem, analysis: Analysis, plan: list[Candidate],
              offloaded: dict[int, int], evaluations: tuple[Evaluation, Evaluation], budget_bytes: float, solver: str,
              heads: list[str], link: tuple[float, str], scale: tuple[float, str], exposed: float) -> RematPlan:
        """The typed record of the plan (stored on the Program, and the PassRecord's details)."""
        before, after = evaluations
        step, baseline = step_seconds(problem, plan, exposed, scale[0])
        found = producers(gm, analysis) if offloaded else {}
        record = RematPlan(
            policy=config.policy, solver=solver, cost_model=config.cost, device_profile=problem.profile.name,
            budget_bytes=budget_bytes if config.policy == "budget" else None,
            segments=[c.to_dict(problem.storage_bytes) for c in sorted(plan, key=lambda c: c.start)],
            offloaded=[OffloadedStorage(found[k].name, problem.storage_bytes[k], region)
                       for k, region in sorted(offloaded.items(), key=lambda kv: problem.position[found[kv[0]]])],
            saved_bytes_before=before.retained_bytes, kept_bytes=after.retained_bytes,
            recomputed_bytes=max(0, problem.baseline_bytes - after.retained_bytes - after.offloaded_bytes),
            offloaded_bytes=after.offloaded_bytes, peak_bytes=after.peak_bytes, recompute_flops=after.recompute_flops,
            forward_flops=problem.total_flops, recompute_cost_share=after.recompute_cost / max(problem.total_cost, 1e-9),
            link_bytes_per_second=link[0], link_source=link[1], time_scale=scale[0], time_scale_source=scale[1],
            offload=config.offload,
            predicted_step_seconds=step, predicted_baseline_step_seconds=baseline,
            predicted_exposed_copy_seconds=exposed, chunked_loss_heads=heads)
        record.summary = summary(record, plan, before, after)
        return record


def _program_device(program: Program) -> torch.device:
    parameter = next(program.gm.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")
