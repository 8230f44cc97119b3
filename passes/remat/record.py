"""``RematPlan``: what ``remat`` decided, stored on the Program under its type (``program.plan(RematPlan)``) for
later consumers (the report, the pipeline pass, ``--passes auto``), and the record's details."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from effcompile.analysis import cost_seconds, segment_overhead_cost

from .plan import Candidate, Evaluation, Problem


@dataclass(frozen=True)
class OffloadedStorage:
    """One storage the plan sends to pinned host memory: the node whose value holds it, its bytes and the
    region (an index of the plan's regions, in graph order) whose backward reads it back."""

    node: str
    nbytes: int
    region: int


@dataclass
class RematPlan:
    """The plan ``remat`` applied. Bytes are at the program's example batch; seconds are the cost model's
    predictions on ``device_profile`` (a step = forward + backward ≈ 3 forwards + recomputation + exposed
    copies)."""

    policy: str
    solver: str
    cost_model: str
    device_profile: str
    budget_bytes: float | None
    segments: list[dict] = field(default_factory=list)
    offloaded: list[OffloadedStorage] = field(default_factory=list)
    saved_bytes_before: int = 0  # what the un-rewritten graph keeps for backward
    kept_bytes: int = 0  # kept on the device at the forward's end
    recomputed_bytes: int = 0  # no longer kept: recomputed in backward (the chunked loss head's included)
    offloaded_bytes: int = 0  # in pinned host memory at the forward's end
    peak_bytes: int = 0
    recompute_flops: int = 0
    forward_flops: int = 0
    recompute_cost_share: float = 0.0
    link_bytes_per_second: float = 0.0
    link_source: str = "none"  # measured, cached, default, option, none (offload off)
    time_scale: float = 1.0  # real (eager) seconds ÷ roofline seconds used for the copy windows
    time_scale_source: str = "profile"  # measured, option, profile
    offload: str = "off"
    predicted_step_seconds: float = 0.0
    predicted_baseline_step_seconds: float = 0.0
    predicted_exposed_copy_seconds: float = 0.0
    chunked_loss_heads: list[str] = field(default_factory=list)
    summary: str = ""

    def details(self) -> dict:
        """The PassRecord's details: every field, plus the names earlier versions used."""
        data = asdict(self)
        data.update(predicted_saved_bytes_before=self.saved_bytes_before, predicted_saved_bytes_after=self.kept_bytes,
                    predicted_peak_bytes_after=self.peak_bytes,
                    recompute_share=self.recompute_flops / max(self.forward_flops, 1))
        return data


def step_seconds(problem: Problem, plan: list[Candidate], exposed_seconds: float, time_scale: float,
                 ) -> tuple[float, float]:
    """Predicted (step, step without remat) seconds: ``time_scale`` × the roofline of 3 forwards (a backward
    costs about two), each segment's recomputation and fixed cost, plus ``exposed_seconds`` of copies."""
    profile = problem.profile
    assert profile is not None
    forward = sum(problem.node_time.values())
    overhead = segment_overhead_cost(forward, profile)
    recompute = sum(sum(problem.node_time.get(n, 0.0) for n in c.members) + overhead for c in plan)
    baseline = time_scale * cost_seconds(3 * forward, profile)
    return baseline + time_scale * cost_seconds(recompute, profile) + exposed_seconds, baseline


def summary(plan: RematPlan, segments: list[Candidate], before: Evaluation, after: Evaluation) -> str:
    """One line: segments by kind, bytes kept / offloaded / recomputed, peak, recompute share, time."""
    kinds = {kind: sum(1 for c in segments if c.kind == kind) for kind in ("fine", "range", "block", "group")}
    text = (f"{len(segments)} segments ({kinds['fine']} fine, {kinds['range']} part-block, "
            f"{kinds['block'] + kinds['group']} whole); saved activations {before.retained_bytes / 2**20:.2f} → "
            f"{after.retained_bytes / 2**20:.2f} MiB ({after.retained_bytes / max(before.retained_bytes, 1):.2f}), "
            f"peak {after.peak_bytes / 2**20:.2f} MiB; recompute at most +{100 * plan.recompute_flops / max(plan.forward_flops, 1):.1f}% "
            f"forward FLOPs (est. +{100 * plan.recompute_cost_share:.1f}% forward time; checkpointing stops early, "
            f"the train-step FLOPs are measured) [{plan.solver}]")
    if plan.offloaded:
        text += (f"; offload {len(plan.offloaded)} tensors, {plan.offloaded_bytes / 2**20:.2f} MiB to host "
                 f"(est. {1000 * plan.predicted_exposed_copy_seconds:.2f} ms exposed at "
                 f"{plan.link_bytes_per_second / 1e9:.0f} GB/s)")
    if plan.chunked_loss_heads:
        text += f"; loss head chunked ({', '.join(plan.chunked_loss_heads)}; recomputes its logits in backward)"
    return text
