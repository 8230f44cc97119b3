"""``remat``: recompute cheap activations in backward instead of keeping them, to fit a memory budget.

1. Measure the graph once (``effcompile.analysis``): per node, the storages autograd saves for backward,
   the storages of its outputs and its forward FLOPs. Compute nodes are those that depend on a trainable
   parameter; shape/mask arithmetic and ``sym_size`` stay outside every segment.
2. Cut the compute nodes into regions, one per repeated block (``block_index`` of the module path) and
   one per run outside the blocks (embeddings, head + loss). A region is a sequence of units: the ops
   of the ``save`` classes (matmuls, attention) and the runs between them. Candidate segments: each
   fine run (recomputes only the cheap ops between saved ops), each prefix and suffix of the region
   (part-block segments), and the whole region.
3. Choose the segments (policy ``budget``): minimise the recompute cost (``cost``: FLOPs, or by
   default a roofline time estimate — see ``_remat_plan``) subject to the predicted *peak* of
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
   segment (Chen et al. 2016). Both ignore ``budget``.
4. Rewrite: each chosen segment becomes a stateless sub-GraphModule called through
   ``CheckpointedSegment`` → ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``. Parameters,
   buffers and submodules stay in the parent (names unchanged) and enter as inputs; SymInt/int values
   cross the boundary as plain Python ints; segments holding dropout/random ops keep the RNG state so
   the recomputation draws the same numbers. Gradients are exact.
5. Loss head (option ``head``, default ``auto``: whenever the plan must save memory, and for ``blocks`` and
   ``sqrt``): a linear + cross-entropy head becomes one chunked call (``_remat_head``) that keeps only a
   per-row log-sum-exp and recomputes each chunk's logits in backward — the float32 logits, log-softmax and
   logits gradient of a large vocabulary are never whole. The plan is then made on the rewritten graph
   (budget in bytes of the original baseline). Exact to round-off; costs one more LM-head matmul.
6. A graph that already holds checkpointed segments or a chunked head, or a budget met without recomputation (e.g. 1.0),
   is left unchanged (``changed=False``).

Bytes are those of the program's example inputs on the device it was captured on (a ``2GiB`` budget
refers to that batch); a fraction scales with the batch. With ``autocast=bfloat16`` the cost model runs
under ``torch.autocast`` so that the plan sees what autocast training saves (bf16 copies of matmul
inputs, cached bf16 weight casts, float32 norms); segments recompute under the same autocast state.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Literal

import torch

from effcompile.analysis import Analysis, analyze
from effcompile.errors import OptionError, PassError
from effcompile.pass_manager import Pass, PassRecord, register
from effcompile.program import Program

from .head import chunk_loss_heads, is_chunked_head
from .plan import (
    SAVE_CLASSES,
    Candidate,
    blocks_plan,
    budget_candidates,
    build_problem,
    evaluate,
    optimise,
    save_nodes,
    smallest_peak,
    sqrt_plan,
)
from .segment import extract_segment, is_segment

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
    after = ("lora", "lowrank", "sas", "amp")  # remat plans on the final graph

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

        def __post_init__(self) -> None:
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
        existing = [n for n in gm.graph.nodes if is_segment(gm, n) or is_chunked_head(n)]
        if existing:
            return PassRecord(self.name, changed=False, reason=f"graph already has {len(existing)} checkpointed "
                              "segments (remat ran before)", details={"summary": "already rematerialised"})
        analysis = self._analyze(program, config)
        problem = build_problem(gm, analysis, config.cost)
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
                problem = build_problem(gm, analysis, config.cost)
        solver = config.policy
        if config.policy == "blocks":
            plan = blocks_plan(problem, analysis)
        elif config.policy == "sqrt":
            plan = sqrt_plan(problem, analysis)
        else:
            candidates = budget_candidates(problem, analysis, save_nodes(gm, config.save))
            if budget_bytes >= problem.baseline_bytes:
                plan, solver = [], "none (budget met without recomputation)"
            else:
                plan, solver = optimise(problem, candidates, budget_bytes)
                if plan is None:
                    reachable = smallest_peak(problem, candidates)
                    raise PassError(
                        f"remat: budget {config.budget} ({budget_bytes / 2**20:.2f} MiB) is below the smallest "
                        f"reachable ({reachable / problem.baseline_bytes:.3f} of baseline, "
                        f"{reachable / 2**20:.2f} MiB at this batch); raise --set remat.budget")
        after = evaluate(problem, plan)
        details = self._details(config, problem, plan, before, after, budget_bytes, solver, heads)
        if not plan and not heads:
            reason = "budget met without recomputation" if config.policy == "budget" else \
                f"policy {config.policy} found no repeated blocks or segments to checkpoint"
            return PassRecord(self.name, changed=False, reason=reason, details=details)
        for index, candidate in enumerate(sorted(plan, key=lambda c: c.start)):
            extract_segment(gm, candidate.members, index)
        # Not graph.finalize: its dead-code pass drops unused get_attr nodes and then the modules they
        # name (HF GPT-2's tied transformer.wte), renaming parameters. Extraction leaves nothing dead.
        gm.graph.lint()
        gm.recompile()
        program.meta["remat.plan"] = details
        stats = {"remat_segments": len(plan), "remat_predicted_saved_bytes_before": before.retained_bytes,
                 "remat_predicted_saved_bytes_after": after.retained_bytes,
                 "remat_predicted_peak_bytes_after": after.peak_bytes, "remat_recompute_flops": after.recompute_flops,
                 "remat_chunked_loss_heads": len(heads)}
        log.info("remat: %s", details["summary"])
        return PassRecord(self.name, changed=True, stats=stats, details=details)

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
    def _budget_bytes(config: Config, baseline: int) -> float:
        if isinstance(config.budget, str):
            return parse_bytes(config.budget)
        return float(config.budget) * baseline

    @staticmethod
    def _details(config: Config, problem, plan: list[Candidate], before, after, budget_bytes: float,
                 solver: str, heads: list[str]) -> dict:
        kinds = {kind: sum(1 for c in plan if c.kind == kind) for kind in ("fine", "range", "block", "group")}
        share = after.recompute_flops / max(problem.total_flops, 1)
        cost_share = after.recompute_cost / max(problem.total_cost, 1e-9)
        summary = (f"{len(plan)} segments ({kinds['fine']} fine, {kinds['range']} part-block, "
                   f"{kinds['block'] + kinds['group']} whole); saved "
                   f"activations {before.retained_bytes / 2**20:.2f} → {after.retained_bytes / 2**20:.2f} MiB "
                   f"({after.retained_bytes / max(before.retained_bytes, 1):.2f}), peak "
                   f"{after.peak_bytes / 2**20:.2f} MiB; recompute +{100 * share:.1f}% forward FLOPs "
                   f"(est. +{100 * cost_share:.1f}% forward time) [{solver}]")
        if heads:
            summary += f"; loss head chunked ({', '.join(heads)})"
        return {
            "summary": summary, "policy": config.policy, "solver": solver,
            "budget_bytes": budget_bytes if config.policy == "budget" else None,
            "predicted_saved_bytes_before": before.retained_bytes, "predicted_saved_bytes_after": after.retained_bytes,
            "predicted_peak_bytes_after": after.peak_bytes, "recompute_flops": after.recompute_flops,
            "forward_flops": problem.total_flops, "recompute_share": share, "cost_model": config.cost,
            "recompute_cost_share": cost_share, "chunked_loss_heads": heads,
            "segments": [c.to_dict(problem.storage_bytes) for c in sorted(plan, key=lambda c: c.start)],
        }
