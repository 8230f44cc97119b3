"""The one cost model: shapes, forward FLOPs, output bytes and saved-for-backward bytes per node, a
networkx view of the graph, and what those cost in time on a device (``DeviceProfile``: the roofline's
FLOP/s and memory bytes/s, and the host link's bytes/s — defined in ``effcompile.devices`` and re-exported
here). Passes and the report read these; none re-derives them.

Units: FLOPs are floating-point operations of one forward (a multiply-add is 2). Every op that
``torch.utils.flop_counter.FlopCounterMode`` counts (matmuls, convolutions, attention — including those
inside composite ops such as ``aten.linear`` and inside modules) is priced with its formulas, so
``Analysis.total_flops`` is what FlopCounterMode reports for the same forward. For cost models, every
other op gets one per output element (``NodeCost.flops`` with ``estimated=True``: a proxy for its
memory-bound work, left out of ``total_flops``). Bytes are bytes. Time costs are given in
FLOP-equivalents (seconds × the profile's FLOP/s: what a solver sums and compares) or in seconds.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
import torch.fx
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

from .devices import (  # re-exported: the cost model's public names stay effcompile.analysis.*
    DEFAULT_ACCELERATOR as DEFAULT_ACCELERATOR,
)
from .devices import (
    DEVICE_PROFILES as DEVICE_PROFILES,
)
from .devices import (
    LINK_CACHE_ENV as LINK_CACHE_ENV,
)
from .devices import (
    DeviceProfile as DeviceProfile,
)
from .devices import (
    HostLink as HostLink,
)
from .devices import (
    cost_seconds as cost_seconds,
)
from .devices import (
    cpu_low_precision_factor as cpu_low_precision_factor,
)
from .devices import (
    device_profile as device_profile,
)
from .devices import (
    exposed_copy_seconds as exposed_copy_seconds,
)
from .devices import (
    host_link_bandwidth as host_link_bandwidth,
)
from .devices import (
    link_cache_path as link_cache_path,
)
from .devices import (
    local_profile as local_profile,
)
from .devices import (
    measure_host_link as measure_host_link,
)
from .devices import (
    seconds_cost as seconds_cost,
)
from .graph import get_attr_value
from .program import Program


@dataclass
class NodeCost:
    """What one node costs. ``saved_bytes`` are bytes autograd saved for backward while running it,
    counting each storage once (at the first node that saved it) and never parameters or buffers."""

    shape: tuple[int, ...] | None = None
    dtype: torch.dtype | None = None
    flops: int = 0
    # True: ``flops`` is the one-per-output-element proxy of an op FlopCounterMode does not count.
    estimated: bool = False
    output_bytes: int = 0
    saved_bytes: int = 0
    # Storage ids (keys of ``Analysis.storage_bytes``): the storages this node's output tensors live in
    # (a view shares its base's id) and every non-parameter storage autograd saved while running it.
    output_storages: tuple[int, ...] = ()
    saved_storages: tuple[int, ...] = ()


@dataclass
class Analysis:
    """Per-node costs (keyed by node name) and totals for a Program."""

    costs: dict[str, NodeCost] = field(default_factory=dict)
    storage_bytes: dict[int, int] = field(default_factory=dict)  # storage id -> bytes

    @property
    def total_flops(self) -> int:
        """Forward FLOPs of the whole graph as ``FlopCounterMode`` counts them (proxies left out)."""
        return sum(c.flops for c in self.costs.values() if not c.estimated)

    @property
    def saved_activation_bytes(self) -> int:
        """Bytes autograd keeps for backward after one forward (activations, not parameters)."""
        return sum(c.saved_bytes for c in self.costs.values())

    def __getitem__(self, node: torch.fx.Node | str) -> NodeCost:
        return self.costs[node if isinstance(node, str) else node.name]


def _tensor_bytes(value: Any) -> int:
    return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor))


def storage_key(tensor: torch.Tensor) -> tuple[int, str]:
    """What identifies ``tensor``'s memory: (storage address, device); views of one storage share it."""
    return (tensor.untyped_storage().data_ptr(), str(tensor.device))


class _CostInterpreter(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, costs: dict[str, NodeCost], excluded: set) -> None:
        super().__init__(gm)
        self.costs = costs
        self.seen_storages = excluded
        self.parameter_keys = set(excluded)
        self.current: NodeCost | None = None
        # Storage identity without keeping values alive: a new tensor matches a storage of the node's
        # live inputs (a view) or gets a fresh id, so a recycled address never aliases a dead tensor.
        self.storage_bytes: dict[int, int] = {}
        self.live_ids: dict[str, dict[tuple[int, str], int]] = {}
        self.packed: list[torch.Tensor] = []
        self.keep_alive: list[torch.Tensor] = []

    def run_node(self, node: torch.fx.Node) -> Any:
        cost = NodeCost()
        self.current = cost
        computes = node.op in ("call_function", "call_method", "call_module")
        # ATen ops are priced straight from torch's FLOP formulas; anything else (modules, torch functions
        # in symbolically traced graphs, composite ATen ops such as aten.linear that decompose into counted
        # ones) runs under a FlopCounterMode, which costs a dispatch per op.
        aten_op = computes and isinstance(node.target, torch._ops.OpOverload)
        formula = _flop_formula(node.target) if aten_op else None
        counted_by_mode = computes and formula is None and (not aten_op or _decomposes(node.target))
        counter = FlopCounterMode(display=False) if counted_by_mode else contextlib.nullcontext()
        self.packed = []
        with counter:
            result = super().run_node(node)
        self.current = None
        self._track_storages(node, result, cost)
        if computes:
            counted = counter.get_total_flops() if counted_by_mode else \
                _registry_flops(formula, *self.fetch_args_kwargs_from_env(node), result) if formula else 0
            counted = counted or _attention_flops(node, result)
            cost.flops = int(counted) if counted else _elements(result)
            cost.estimated = not counted
        cost.output_bytes = _tensor_bytes(result)
        if isinstance(result, torch.Tensor):
            cost.shape, cost.dtype = tuple(result.shape), result.dtype
            node.meta["effcompile_shape"] = cost.shape
            node.meta["effcompile_dtype"] = cost.dtype
        self.costs[node.name] = cost
        return result

    def _track_storages(self, node: torch.fx.Node, result: Any, cost: NodeCost) -> None:
        known: dict[tuple[int, str], int] = {}
        for source in node.all_input_nodes:
            known.update(self.live_ids.get(source.name, {}))

        def identify(tensor: torch.Tensor) -> int | None:
            key = storage_key(tensor)
            if key in self.parameter_keys:
                return None
            if key not in known:
                known[key] = len(self.storage_bytes)
                self.storage_bytes[known[key]] = tensor.untyped_storage().nbytes()
            return known[key]

        outputs = {}
        for leaf in pytree.tree_leaves(result):
            if isinstance(leaf, torch.Tensor) and (index := identify(leaf)) is not None:
                outputs[storage_key(leaf)] = index
        self.live_ids[node.name] = outputs
        cost.output_storages = tuple(dict.fromkeys(outputs.values()))
        saved = (identify(t) for t in self.packed)
        cost.saved_storages = tuple(dict.fromkeys(i for i in saved if i is not None))
        self.packed = []

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.current is not None:
            self.packed.append(tensor)
        key = storage_key(tensor)
        if self.current is not None and key not in self.seen_storages:
            self.seen_storages.add(key)
            self.current.saved_bytes += tensor.untyped_storage().nbytes()
        # Keep the storage alive (its address identifies it until the forward ends) but hand autograd
        # nothing: the analysis never runs backward, and a packed tensor would keep the graph alive.
        self.keep_alive.append(tensor.detach())
        return None


def _flop_formula(op: torch._ops.OpOverload) -> Any:
    """``torch.utils.flop_counter``'s formula for an ATen op (None if it counts no FLOPs for it)."""
    from torch.utils.flop_counter import flop_registry

    return flop_registry.get(op.overloadpacket) or flop_registry.get(op)


def _decomposes(op: torch._ops.OpOverload) -> bool:
    """True for a composite ATen op (``aten.linear``, ``aten.matmul``, ``aten.einsum``...): it reaches the
    dispatcher, and FlopCounterMode, as the ops it decomposes into."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeImplicitAutograd")
    except RuntimeError:  # pragma: no cover - an op without a registered schema name
        return False


def _registry_flops(formula: Any, args: tuple, kwargs: dict, result: Any) -> int:
    """FLOPs of an ATen node from its ``torch.utils.flop_counter`` formula (0 if it cannot read these
    arguments)."""
    try:
        return int(formula(*args, **kwargs, out_val=result))
    except Exception:  # a formula that cannot read these arguments: fall back to elementwise pricing
        return 0


def _attention_flops(node: torch.fx.Node, result: Any) -> int:
    """Forward FLOPs of an SDPA call the flop counter missed (its CPU kernel is not registered):
    two batched matmuls, 4·B·H·Sq·Sk·D."""
    if node.target not in (torch.ops.aten.scaled_dot_product_attention.default,
                           torch.nn.functional.scaled_dot_product_attention) or not isinstance(result, torch.Tensor):
        return 0
    key = node.args[1] if len(node.args) > 1 else node.kwargs.get("key")
    key_shape = key.meta.get("effcompile_shape") if isinstance(key, torch.fx.Node) else None
    if key_shape is None or result.dim() < 2:
        return 0
    return 4 * result.numel() * int(key_shape[-2])


def _elements(value: Any) -> int:
    return sum(t.numel() for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor))


def parameter_storages(module: torch.nn.Module) -> set[tuple[int, str]]:
    """Storage keys of every parameter and buffer of ``module`` (never counted as activations)."""
    return {storage_key(t) for t in list(module.parameters()) + list(module.buffers())}


def analyze(program: Program) -> Analysis:
    """Run the graph once on the example inputs (grad enabled, as in training) and record per-node
    shapes, FLOPs, output bytes and saved-for-backward bytes. Stores shapes in ``node.meta``."""
    costs: dict[str, NodeCost] = {}
    excluded = parameter_storages(program.gm)
    interpreter = _CostInterpreter(program.gm, costs, excluded)
    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(interpreter.pack, lambda t: t), torch.enable_grad():
        interpreter.run(*program.flat_inputs())
    interpreter.keep_alive.clear()
    interpreter.env.clear()
    return Analysis(costs, interpreter.storage_bytes)


def measure_saved_bytes(module: torch.nn.Module, program: Program) -> int:
    """Bytes of distinct tensors autograd saves for backward in one forward of ``module`` on the
    program's example inputs, parameters and buffers excluded (what ``remat`` reduces)."""
    seen = parameter_storages(module)
    total = 0
    keep_alive: list[torch.Tensor] = []  # addresses identify storages only while they live

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        key = storage_key(tensor)
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
        keep_alive.append(tensor.detach())
        return None  # never unpacked: no backward runs here (see _CostInterpreter.pack)

    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.enable_grad():
        output = program.run(module)
        del output
    keep_alive.clear()
    return total


def to_networkx(gm: torch.fx.GraphModule, analysis: Analysis | None = None) -> nx.DiGraph:
    """A DiGraph with one vertex per node (attributes ``op``, ``target`` and, given an analysis,
    ``flops``/``output_bytes``/``saved_bytes``) and an edge from each input to its user."""
    graph = nx.DiGraph()
    for order, node in enumerate(gm.graph.nodes):
        attributes: dict[str, Any] = {"op": node.op, "target": str(node.target), "order": order}
        if analysis is not None and node.name in analysis.costs:
            cost = analysis.costs[node.name]
            attributes.update(flops=cost.flops, output_bytes=cost.output_bytes, saved_bytes=cost.saved_bytes)
        graph.add_node(node.name, **attributes)
        for source in node.all_input_nodes:
            graph.add_edge(source.name, node.name)
    return graph


def parameter_count(module: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements, each shared tensor counted once."""
    seen: set[int] = set()
    total = 0
    for parameter in module.parameters():
        if id(parameter) in seen or (trainable_only and not parameter.requires_grad):
            continue
        seen.add(id(parameter))
        total += parameter.numel()
    return total


class _TimingInterpreter(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, seconds: dict[str, list[float]], synchronize: bool) -> None:
        super().__init__(gm)
        self.seconds = seconds
        self.synchronize = synchronize

    def run_node(self, node: torch.fx.Node) -> Any:
        import time

        if self.synchronize:
            torch.cuda.synchronize()
        started = time.perf_counter()
        result = super().run_node(node)
        if self.synchronize:
            torch.cuda.synchronize()
        self.seconds.setdefault(node.name, []).append(time.perf_counter() - started)
        return result


def measure_node_seconds(program: Program, repeats: int = 3) -> dict[str, float]:
    """Forward wall time of each node in seconds on the program's example inputs (grad enabled, one
    warm-up run, then the median of ``repeats`` runs; CUDA is synchronised around every node)."""
    inputs = program.flat_inputs()
    synchronize = torch.cuda.is_available() and any(
        isinstance(t, torch.Tensor) and t.is_cuda for t in list(inputs) + list(program.gm.parameters()))
    samples: dict[str, list[float]] = {}
    with torch.enable_grad():
        for run in range(repeats + 1):
            torch.manual_seed(0)
            timings: dict[str, list[float]] = {}
            _TimingInterpreter(program.gm, timings, synchronize).run(*inputs)
            if run:  # the first run warms caches and allocators
                for name, values in timings.items():
                    samples.setdefault(name, []).extend(values)
    return {name: sorted(values)[len(values) // 2] for name, values in samples.items()}


# ------------------------------------------------------------------------- parameters and training memory

#: Bytes of training state per parameter byte: the weight, its gradient and Adam's two moments.
TRAINING_STATE_FACTOR = 4


def trainable_parameters_read(gm: torch.nn.Module, node: torch.fx.Node) -> list[torch.Tensor]:
    """The trainable parameters a node reads directly: its ``get_attr`` inputs, or a called module's."""
    found: list[torch.Tensor] = []
    if node.op == "call_module":
        found.extend(p for p in get_attr_value(gm, str(node.target)).parameters() if p.requires_grad)
    for source in node.all_input_nodes:
        if source.op == "get_attr":
            value = get_attr_value(gm, str(source.target))
            if isinstance(value, torch.nn.Parameter) and value.requires_grad:
                found.append(value)
    return found


def node_parameter_costs(gm: torch.nn.Module, nodes: list[torch.fx.Node]) -> list[tuple[int, int]]:
    """Per node in ``nodes``: (elements, bytes) of the trainable parameters it reads, each parameter counted
    at the first node that reads it."""
    seen: set[int] = set()
    costs = []
    for node in nodes:
        elements = size = 0
        for tensor in trainable_parameters_read(gm, node):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                elements += tensor.numel()
                size += tensor.numel() * tensor.element_size()
        costs.append((elements, size))
    return costs


def node_training_memory(gm: torch.nn.Module, analysis: Analysis, nodes: list[torch.fx.Node]) -> list[int]:
    """Per node in ``nodes``, the bytes training holds for it: the activations it saves for backward plus
    ``TRAINING_STATE_FACTOR`` × the bytes of the parameters it reads first (weights, gradients, Adam's
    moments), in bytes."""
    parameters = node_parameter_costs(gm, nodes)
    return [analysis[node].saved_bytes + TRAINING_STATE_FACTOR * size for node, (_, size) in zip(nodes, parameters)]


FLOAT8_MIN_DIM = 2048  # torchao's float8 training microbenchmarks: below ~2k-wide GEMMs the casts cost more than they save


def float8_gemm_choice(in_features: int, out_features: int, first: bool, last: bool,
                       min_dim: int = FLOAT8_MIN_DIM) -> tuple[bool, str]:
    """Whether a linear's three GEMMs (forward, input and weight gradients) should run in float8, and why.

    The rule (a cost estimate, not a measurement): float8 pays when the GEMM is large enough that the
    2-3× tensor-core rate outweighs the scaling and casting passes over its operands — torchao's
    microbenchmarks on H100 put the break-even near 2k on the smaller of K and N, so ``min(in, out) <
    min_dim`` stays bf16; ``_scaled_mm`` needs both dimensions divisible by 16; and the first and last
    linears (the model's input projection and output head) stay bf16 for accuracy, as torchao recommends."""
    if first or last:
        return False, "first/last linear (kept in bf16 for accuracy)"
    if in_features % 16 or out_features % 16:
        return False, f"{in_features}×{out_features} not divisible by 16 (float8 GEMM needs it)"
    if min(in_features, out_features) < min_dim:
        return False, f"small GEMM: min({in_features}, {out_features}) < {min_dim}"
    return True, f"{in_features}×{out_features} ≥ {min_dim}"


# ---- Time: the roofline per node, on a DeviceProfile (effcompile.devices) ----


def written_bytes(node: torch.fx.Node, analysis: Analysis) -> int:
    """Bytes a node writes to fresh storages (its outputs that are not views of its inputs' storages)."""
    cost = analysis.costs.get(node.name)
    if cost is None:
        return 0
    sources: set[int] = set()
    for source in node.all_input_nodes:
        if source.name in analysis.costs:
            sources.update(analysis.costs[source.name].output_storages)
    return sum(analysis.storage_bytes.get(k, 0) for k in cost.output_storages if k not in sources)


def node_time_cost(node: torch.fx.Node, analysis: Analysis, profile: DeviceProfile) -> float:
    """Forward time of one node in FLOP-equivalents on ``profile``'s roofline: max(FLOPs, ridge ×
    bytes moved), bytes moved = what it writes and what reads it back (2 × ``written_bytes``). Views and
    nodes outside the analysis cost 0."""
    cost = analysis.costs.get(node.name)
    written = written_bytes(node, analysis)
    if cost is None or not written:
        return 0.0
    return max(float(cost.flops), profile.flops_per_byte * 2 * written)


def node_recompute_cost(node: torch.fx.Node, analysis: Analysis, cost_model: str, profile: DeviceProfile) -> float:
    """What recomputing one node costs, in FLOP-equivalents: ``cost_model`` ``"time"`` is
    ``node_time_cost``, ``"flops"`` its forward FLOPs alone. Raises ValueError for another model."""
    if cost_model == "flops":
        cost = analysis.costs.get(node.name)
        return float(cost.flops) if cost is not None else 0.0
    if cost_model != "time":
        raise ValueError(f"cost model {cost_model!r} is not 'time' or 'flops'")
    return node_time_cost(node, analysis, profile)


def segment_overhead_cost(forward_cost: float, profile: DeviceProfile) -> float:
    """The fixed cost of one checkpointed segment, FLOP-equivalents, for a forward costing ``forward_cost``."""
    return profile.segment_overhead_share * forward_cost


def measure_forward_seconds(program: Program, autocast: torch.dtype | None = None, repeats: int = 3) -> float:
    """Median wall time in seconds of ``repeats`` forwards of the program on its example inputs (grad enabled,
    under ``torch.autocast`` with ``autocast`` when given, CUDA synchronised; one warm-up run first)."""
    import time

    parameter = next(program.gm.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    cuda = device.type == "cuda"
    context = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    seconds = []
    with torch.enable_grad(), context:
        for run in range(repeats + 1):
            if cuda:
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            output = program.run()
            if cuda:
                torch.cuda.synchronize(device)
            if run:
                seconds.append(time.perf_counter() - started)
            del output
    return sorted(seconds)[len(seconds) // 2]
