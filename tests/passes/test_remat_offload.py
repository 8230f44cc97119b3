"""``remat.offload``: the planner's choice of keep / recompute / offload (exact against brute force on a small
problem, never over budget), and the mechanism on the CPU through a simulated link (the hooks offload exactly
the planned storages and let the device copies go, prefetch each region when the backward reaches the next
one, and gradients are bit-identical); on CUDA, the real side-stream link."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.fx
from hypothesis import given, settings
from hypothesis import strategies as st

import effcompile
from effcompile.analysis import DEVICE_PROFILES
from effcompile.capture import capture
from effcompile.errors import OptionError
from effcompile.pass_manager import PassManager, resolve_passes
from effcompile.passes.remat import OffloadedSpan, RematPlan, SimulatedLink
from effcompile.passes.remat.plan import Candidate, Problem, evaluate
from effcompile.passes.remat.solve import DP_BUCKETS, OffloadModel, solve_dp, storage_owners, widen_offload
from effcompile.program import Program

from conftest import tiny_spec

FREE_LINK = {"link_bandwidth": 1e18, "offload_min_bytes": 0}  # copies always hide: offload wherever it helps


@pytest.fixture(scope="module")
def gpt2() -> Program:
    """Four blocks: with two, a block's own backward (when its offloaded tensors are back) bounds the peak."""
    return capture(tiny_spec("gpt2", n_layer=4))


def run_remat(program: Program, **options) -> tuple[Program, effcompile.PassRecord]:
    result = PassManager(resolve_passes(["remat"], {"remat": options}), verify=False, measure=False).run(program)
    return result.program, result.records[0]


def spans(program: Program) -> list[OffloadedSpan]:
    return [m for m in program.gm.modules() if isinstance(m, OffloadedSpan)]


def train_step(program: Program, link: SimulatedLink | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    for span in spans(program):
        span.use_link(link)
    program.gm.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    loss = program.run().loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in program.gm.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("options", [{"policy": "blocks", "offload": "on"}, {"budget": 0.5, "offload": "on"},
                                     {"budget": 0.45, "offload": "auto"}], ids=["blocks", "budget-on", "budget-auto"])
def test_gradients_bit_identical_and_hooks_offload_the_plan(gpt2, options):
    rewritten, record = run_remat(gpt2.clone(), head="keep", **options, **FREE_LINK)
    plan = rewritten.plan(RematPlan)
    assert record.changed and plan is not None and plan.offloaded, record.details["summary"]
    link = SimulatedLink()
    loss, grads = train_step(rewritten, link)
    reference_loss, reference = train_step(gpt2.clone())
    assert torch.equal(loss, reference_loss)
    assert grads.keys() == reference.keys() and all(torch.equal(grads[n], reference[n]) for n in reference)
    # Exactly the planned storages went to host memory, once each, and the device copies were let go.
    to_host = [nbytes for kind, _, nbytes in link.log if kind == "to_host"]
    assert sorted(to_host) == sorted(o.nbytes for o in plan.offloaded)
    assert sum(to_host) == plan.offloaded_bytes == record.details["offloaded_bytes"]
    assert link.released and all(ref.expired() for ref in link.released)
    # Prefetches run when the backward reaches the region after each one, so nothing is fetched on demand.
    kinds = [(kind, region) for kind, region, _ in link.log if kind in ("prefetch", "unpack", "fetch")]
    assert not [k for k in kinds if k[0] == "fetch"]
    regions = sorted({o.region for o in plan.offloaded})
    for region in regions:
        assert kinds.index(("prefetch", region)) < kinds.index(("unpack", region))
    prefetched = [region for kind, region in kinds if kind == "prefetch"]
    assert list(dict.fromkeys(prefetched)) == sorted(regions, reverse=True)  # the backward's order


def test_forward_waits_for_each_offloading_region_and_backward_waits_before_use(gpt2):
    rewritten, _ = run_remat(gpt2.clone(), head="keep", policy="blocks", offload="on", **FREE_LINK)
    (span,) = spans(rewritten)
    markers = [n for n in span.body.graph.nodes if n.op == "call_function" and "offload" in n.name]
    assert markers and not span.body.graph.eliminate_dead_code()  # marks have no users but must stay
    link = SimulatedLink()
    train_step(rewritten, link)
    forward = link.log[:next(i for i, entry in enumerate(link.log) if entry[0] == "prefetch") - 1]
    marked = {region for kind, region, _ in forward if kind == "mark"}
    waited = {region for kind, region, _ in forward if kind == "forward_wait"}
    assert marked == waited  # every region's copies are waited for (on the device) one region later
    for position, (kind, _, _) in enumerate(link.log):
        if kind == "unpack":  # the compute stream waits for the copy back before the first use
            assert any(k == "wait" for k, _, _ in link.log[max(0, position - 2):position])


def test_without_a_link_nothing_moves_and_results_are_the_same(gpt2):
    rewritten, _ = run_remat(gpt2.clone(), head="keep", policy="blocks", offload="on", **FREE_LINK)
    loss, grads = train_step(rewritten, None)  # CPU tensors, no link given: the span keeps everything
    reference_loss, reference = train_step(gpt2.clone())
    assert torch.equal(loss, reference_loss) and all(torch.equal(grads[n], reference[n]) for n in reference)


def test_auto_offloads_only_where_copies_pay(gpt2):
    _, slow = run_remat(gpt2.clone(), head="keep", budget=0.45, offload="auto", link_bandwidth=1.0,
                        offload_min_bytes=0)
    _, off = run_remat(gpt2.clone(), head="keep", budget=0.45)
    assert not slow.details["offloaded"]  # 1 byte/s: every copy is exposed, recomputing is cheaper
    assert slow.details["segments"] == off.details["segments"]
    assert slow.details["link_source"] == "option" and off.details["link_source"] == "none"
    _, free = run_remat(gpt2.clone(), head="keep", budget=0.45, offload="auto", **FREE_LINK)
    assert free.details["offloaded"] and free.details["predicted_exposed_copy_seconds"] == 0.0
    assert free.details["recompute_flops"] < off.details["recompute_flops"]  # offloading replaced recomputation
    assert free.details["predicted_step_seconds"] < off.details["predicted_step_seconds"]


def test_record_fields_and_typed_plan(gpt2):
    rewritten, record = run_remat(gpt2.clone(), head="keep", budget=0.5, offload="on", **FREE_LINK)
    plan = rewritten.plan(RematPlan)
    details = record.details
    for key in ("kept_bytes", "recomputed_bytes", "offloaded_bytes", "predicted_step_seconds",
                "predicted_exposed_copy_seconds", "link_bytes_per_second", "time_scale", "device_profile"):
        assert key in details
    assert details["kept_bytes"] + details["offloaded_bytes"] + details["recomputed_bytes"] >= details["kept_bytes"]
    assert details["peak_bytes"] <= details["budget_bytes"]
    assert plan.kept_bytes == details["predicted_saved_bytes_after"] and plan.device_profile == "h200"
    assert rewritten.clone().plan(RematPlan) == plan  # clones carry the plan
    assert "remat.plan" not in rewritten.meta
    assert record.stats["remat_offloaded_tensors"] == len(plan.offloaded) > 0


def test_cpu_profile_has_no_link_and_running_twice_changes_nothing(gpt2):
    _, record = run_remat(gpt2.clone(), head="keep", budget=0.5, offload="on", device="cpu")
    assert record.details["device_profile"] == "cpu" and not record.details["offloaded"]
    once, first = run_remat(gpt2.clone(), head="keep", policy="blocks", offload="on", **FREE_LINK)
    assert first.changed and spans(once)
    _, second = run_remat(once, policy="blocks", offload="on", **FREE_LINK)
    assert not second.changed and "already" in second.reason


@pytest.mark.parametrize("options, message", [
    ({"offload": "maybe"}, "offload"), ({"link_bandwidth": "-3GB"}, "link_bandwidth"),
    ({"link_bandwidth": "fast"}, "link_bandwidth"), ({"time_scale": -1.0}, "time_scale"),
    ({"device": "tpu"}, "device"), ({"offload_min_bytes": "lots"}, "offload_min_bytes"),
])
def test_option_errors(options, message):
    with pytest.raises(OptionError, match=message):
        resolve_passes(["remat"], {"remat": options})


def test_link_bandwidth_accepts_sizes_per_second():
    (config,) = [c for _, c in resolve_passes(["remat"], {"remat": {"link_bandwidth": "45GB/s"}})]
    assert config.link_bandwidth == 45e9


# ---- the solver: exact against brute force, never over budget ----

def synthetic_problem(regions: list[list[tuple[int, bool, int]]]) -> tuple[Problem, list[Candidate]]:
    """A chain of nodes cut into regions; node i saves its input (node i-1's output) and, when flagged, its own
    output. ``regions``: per region, per node (output bytes, saves its output, recompute cost). Candidates:
    each node alone and each whole region."""
    graph = torch.fx.Graph()
    value = graph.placeholder("x")
    nodes, sizes, flags, costs, region_of = [], {0: 1024}, [], [], []
    for region, members in enumerate(regions):
        for size, saves_output, cost in members:
            value = graph.call_function(torch.neg, (value,))
            nodes.append(value)
            sizes[len(nodes)] = size
            flags.append(saves_output)
            costs.append(float(cost))
            region_of.append(region)
    everything = list(graph.nodes)
    saved = {n: frozenset() for n in everything}
    for i, node in enumerate(nodes):  # storage i is node i-1's output (0: the input)
        saved[node] = frozenset({i} | ({i + 1} if flags[i] else set()))
    spans = [[n for n, r in zip(nodes, region_of) if r == region] for region in range(len(regions))]
    problem = Problem(everything, {n: i for i, n in enumerate(everything)}, set(nodes), saved, sizes,
                      [(region, run) for region, run in enumerate(spans)])
    problem.baseline_bytes = sum(sizes[k] for k in set().union(*saved.values()))
    problem.profile = DEVICE_PROFILES["h200"]
    index = {n: i for i, n in enumerate(nodes)}
    candidates = []
    for region, run in enumerate(spans):
        for members, kind in [([n], "fine") for n in run] + ([(run, "block")] if len(run) > 1 else []):
            first = index[members[0]]
            inputs = frozenset({first})
            internal = frozenset().union(*(saved[n] for n in members)) - inputs
            candidates.append(Candidate(f"r{region}", kind, region, list(members), problem.position[members[0]],
                                        problem.position[members[-1]], 0, sum(costs[index[n]] for n in members),
                                        inputs, internal))
    return problem, candidates


def brute_force(problem: Problem, candidates: list[Candidate], budget: float, model: OffloadModel) -> float:
    """The least cost under the DP's model (see passes/remat/solve.py), by enumerating every plan."""
    unit = max(problem.baseline_bytes, 1) / DP_BUCKETS
    owners, shared = storage_owners(problem, candidates)  # who owns what is the model's definition, not the search
    limit = min(int((budget - shared) // unit), 4 * DP_BUCKETS)
    if limit < 0:
        return math.inf
    per_region = []
    for region in range(len(problem.regions)):
        mine = sorted((c for c in candidates if c.region == region), key=lambda c: c.start)
        local = {k for k, r in owners.items() if r == {region}}
        rows = []
        for size in range(len(mine) + 1):
            for chosen in itertools.combinations(mine, size):
                ranges = sorted((c.start, c.end) for c in chosen)
                if any(a[1] >= b[0] for a, b in zip(ranges, ranges[1:])):
                    continue
                covered = {n for c in chosen for n in c.members}
                kept = {k for n in problem.nodes if n not in covered for k in problem.saved[n] if k in local}
                kept |= {k for c in chosen for k in c.inputs if k in local}
                transient = max((sum(problem.storage_bytes[k] for k in c.internal) for c in chosen), default=0)
                movable = sorted(k for k in kept if k in model.storages)
                for count in range(len(movable) + 1):
                    for moved in itertools.combinations(movable, count):
                        off = sum(problem.storage_bytes[k] for k in moved)
                        seconds = model.exposed_seconds(region, off)
                        if math.isfinite(seconds):
                            kept_bytes = sum(problem.storage_bytes[k] for k in kept) - off
                            rows.append((math.ceil(kept_bytes / unit - 1e-9), math.ceil((transient + off) / unit - 1e-9),
                                         math.ceil(off / unit - 1e-9),
                                         sum(c.cost for c in chosen) + model.exposed_cost(seconds)))
        # Drop rows another row beats in every respect (a plain pairwise check, to keep the product small).
        per_region.append([row for row in rows if not any(other != row and all(a <= b for a, b in zip(other, row))
                                                          for other in rows)])
    best = math.inf
    for combo in itertools.product(*per_region):
        kept, previous, fits = 0, 0, True
        for need, extra, off, _ in combo:  # the previous region's prefetch shares the room with this region
            kept += need
            if kept + extra + previous > limit:
                fits = False
                break
            previous = off
        if fits:
            best = min(best, sum(row[3] for row in combo))
    return best


NODE = st.tuples(st.integers(1, 200).map(lambda n: n * 1000), st.sampled_from([True, True, True, False]),
                 st.integers(1, 50))
# Mostly four regions of two nodes, each keeping its own large output: where offloading can replace recomputation.
REGIONS = st.lists(st.lists(NODE, min_size=1, max_size=2), min_size=2, max_size=4)


@settings(max_examples=60, deadline=None)
@given(regions=REGIONS, budget_share=st.floats(0.3, 1.0),
       bandwidth=st.sampled_from([0.0, 1e6, 1e8, 1e18, 1e18, 1e18]), window=st.sampled_from([1e-4, 1e-3, 1.0, 1.0]),
       offloadable=st.sets(st.integers(1, 8), min_size=2, max_size=8))
def test_dp_with_offload_is_exact_and_within_budget(regions, budget_share, bandwidth, window, offloadable):
    problem, candidates = synthetic_problem(regions)
    windows = {r: (window, 2 * window) for r in range(len(regions))}
    storages = {k for k in offloadable if k in problem.storage_bytes}
    model = OffloadModel(storages, windows, bandwidth, DEVICE_PROFILES["h200"], time_scale=2.0)
    budget = budget_share * problem.baseline_bytes
    solution, status, _ = solve_dp(problem, candidates, budget, model if bandwidth else None)
    expected = brute_force(problem, candidates, budget, model)
    if not math.isfinite(expected):
        assert solution is None and status == "infeasible"
        return
    assert solution is not None
    assert solution.cost == pytest.approx(expected, rel=1e-9, abs=1e-6)
    assert evaluate(problem, solution.segments, solution.offloaded).peak_bytes <= budget
    assert set(solution.offloaded) <= storages
    by_region: dict[int, int] = {}
    for k, region in solution.offloaded.items():
        by_region[region] = by_region.get(region, 0) + problem.storage_bytes[k]
    assert solution.exposed_seconds == pytest.approx(sum(model.exposed_seconds(r, b) for r, b in by_region.items()))


def test_offload_beats_recompute_when_the_link_is_free():
    # Three regions, each keeping one large activation: recompute-only must recompute a region; offloading the
    # first region's activation (back one region before its use) fits the same budget at no cost.
    region = [(100_000, True, 10), (1_000, False, 1)]
    problem, candidates = synthetic_problem([region, region, region])
    model = OffloadModel({1, 3, 5}, {r: (1.0, 2.0) for r in range(3)}, 1e18, DEVICE_PROFILES["h200"])
    budget = 0.75 * problem.baseline_bytes
    recompute, _, _ = solve_dp(problem, candidates, budget, None)
    offload, _, _ = solve_dp(problem, candidates, budget, model)
    assert recompute is not None and recompute.segments and recompute.cost > 0
    assert offload is not None and offload.offloaded and offload.cost < recompute.cost
    assert offload.cost == brute_force(problem, candidates, budget, model)


@settings(max_examples=15, deadline=None)
@given(budget_share=st.floats(0.3, 1.0))
def test_widened_plans_stay_within_budget(budget_share):
    problem, candidates = synthetic_problem([[(50_000, True, 5), (80_000, False, 7)], [(60_000, True, 3)],
                                             [(90_000, True, 4), (20_000, True, 1)]])
    model = OffloadModel(set(range(1, 6)), {r: (1.0, 2.0) for r in range(3)}, 1e18, DEVICE_PROFILES["h200"],
                         widen=True)
    budget = budget_share * problem.baseline_bytes
    solution, _, _ = solve_dp(problem, candidates, budget, model)
    if solution is None:
        return
    widened = widen_offload(problem, solution.segments, solution.offloaded, model, budget)
    assert set(solution.offloaded.items()) <= set(widened.items())
    assert evaluate(problem, solution.segments, widened).peak_bytes <= budget


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_offload_is_bit_identical():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from effcompile.passes.remat.offload import CudaLink

    spec = tiny_spec("gpt2", batch=4, seq=64, n_layer=4)
    spec.module.to("cuda")
    spec.kwargs = {k: v.to("cuda") for k, v in spec.kwargs.items()}
    program = capture(spec)
    rewritten, record = run_remat(program.clone(), head="keep", policy="blocks", offload="on", **FREE_LINK)
    link = CudaLink(torch.device("cuda"))
    for span in spans(rewritten):
        span.use_link(link)

    def step(candidate: Program) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        candidate.gm.zero_grad(set_to_none=True)
        loss = candidate.run().loss
        loss.backward()
        torch.cuda.synchronize()
        return loss.detach(), {n: p.grad.clone() for n, p in candidate.gm.named_parameters() if p.grad is not None}

    with sdpa_kernel(SDPBackend.MATH):  # deterministic kernels: any difference is the offload's
        offloaded = step(rewritten)
        for span in spans(rewritten):
            span.set_offloading(False)
        kept, reference = step(rewritten), step(program)
    assert link.bytes.get("mark", 0) == record.details["offloaded_bytes"] > 0 and not link.counts.get("fetch")
    for other in (kept, reference):
        assert torch.equal(offloaded[0], other[0])
        assert all(torch.equal(offloaded[1][n], other[1][n]) for n in other[1])
