"""Where a pipeline cut can go: the compute nodes in order, what crosses each place between two of them, and
what may be recomputed instead of sent (steps 1-3 of the ``pipeline`` pass)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.fx

from effcompile.analysis import Analysis, node_parameter_costs, node_training_memory
from effcompile.errors import PassError
from effcompile.graph import get_attr_value, module_path
from effcompile.program import Program

from .config import PipelineConfig
from .partition import solve

COMPUTE_OPS = ("call_function", "call_method", "call_module")
_RANDOM_MARKERS = ("dropout", "rand", "bernoulli", "normal", "uniform", "multinomial", "exponential",
                   "cauchy", "geometric", "poisson")


class Layout:
    """The compute nodes in order, what each value is, and what crosses each place a cut could go.

    Position ``q`` (1..n-1) is the place between ``sequence[q-1]`` and ``sequence[q]``.
    """

    def __init__(self, program: Program, analysis: Analysis) -> None:
        self.gm = program.gm
        self.analysis = analysis
        nodes = list(self.gm.graph.nodes)
        self.placeholders = [n for n in nodes if n.op == "placeholder"]
        self.output = next(n for n in nodes if n.op == "output")
        self.sequence = [n for n in nodes if n.op in COMPUTE_OPS]
        if not self.sequence:
            raise PassError("pipeline: the graph has no compute node to place in a stage")
        self.position = {n: i for i, n in enumerate(self.sequence)}
        self.count = len(self.sequence)
        self._recomputable: dict[torch.fx.Node, bool] = {}
        self._symbols: dict[torch.fx.Node, frozenset[str]] = {}
        self._analyse_places()

    # what a value is
    def is_tensor(self, node: torch.fx.Node) -> bool:
        """True when ``node`` produces a tensor (the cost model recorded its shape)."""
        return "effcompile_shape" in node.meta

    def is_float(self, node: torch.fx.Node) -> bool:
        """True when ``node`` produces a floating-point tensor."""
        dtype = node.meta.get("effcompile_dtype")
        return dtype is not None and dtype.is_floating_point

    def bytes_of(self, node: torch.fx.Node) -> int:
        """Bytes of ``node``'s output."""
        cost = self.analysis.costs.get(node.name)
        return cost.output_bytes if cost is not None else 0

    def trainable(self, node: torch.fx.Node) -> bool:
        """True when ``node`` reads a trainable parameter (a ``get_attr``)."""
        if node.op != "get_attr":
            return False
        value = get_attr_value(self.gm, str(node.target))
        return isinstance(value, torch.nn.Parameter) and value.requires_grad

    def recomputable(self, node: torch.fx.Node) -> bool:
        """True when ``node`` can be recomputed in any stage: a deterministic function/method of
        buffers, constants, sizes and other recomputable values (never of a model input or a trainable
        parameter, except for reading a size)."""
        if node in self._recomputable:
            return self._recomputable[node]
        self._recomputable[node] = False  # cycles cannot happen in a DAG; this guards recursion
        ok = node.op in ("call_function", "call_method") and not _is_random_or_mutating(node)
        symbols: set[str] = set()
        if ok and is_sym_size(node):
            source = node.args[0]
            if isinstance(source, torch.fx.Node) and self.recomputable(source):
                symbols |= self._symbols.get(source, frozenset())
            else:
                symbol = size_symbol(node.meta.get("val"))
                ok = symbol is not None
                if ok:
                    symbols.add(symbol)
        elif ok:
            for source in node.all_input_nodes:
                if source.op == "get_attr" and not self.trainable(source):
                    continue
                if self.recomputable(source):
                    symbols |= self._symbols.get(source, frozenset())
                    continue
                ok = False
                break
        self._recomputable[node] = ok
        self._symbols[node] = frozenset(symbols)
        return ok

    def last_use(self, node: torch.fx.Node) -> int:
        """Position of ``node``'s last reader (``count`` when the output reads it; -1 unused)."""
        uses = [self.position[u] if u in self.position else self.count for u in node.users if u.op != "get_attr"]
        return max(uses, default=-1)

    def _analyse_places(self) -> None:
        """For each position: bytes sent, the float tensors sent, and the reason it cannot be cut."""
        n = self.count
        starts: dict[int, list[torch.fx.Node]] = {}
        for node in self.sequence:
            last = self.last_use(node)
            if last > self.position[node]:
                starts.setdefault(self.position[node] + 1, []).append(node)
        self.sent: list[list[torch.fx.Node]] = [[] for _ in range(n)]
        self.sent_bytes: list[int] = [0] * n
        self.blocked: list[str | None] = [None] * n
        live: list[torch.fx.Node] = []
        for q in range(1, n):
            live = [v for v in live if self.last_use(v) >= q] + starts.get(q, [])
            needed_symbols: dict[str, str] = {}
            for value in live:
                if self.recomputable(value):
                    for symbol in self._symbols.get(value, frozenset()):
                        needed_symbols.setdefault(symbol, value.name)
                    continue
                if self.is_tensor(value) and self.is_float(value):
                    self.sent[q].append(value)
                    self.sent_bytes[q] += self.bytes_of(value)
                elif self.blocked[q] is None:
                    kind = f"a {value.meta['effcompile_dtype']} tensor" if self.is_tensor(value) else \
                        f"a {type(value.meta.get('val')).__name__ if 'val' in value.meta else 'non-tensor'} value"
                    self.blocked[q] = (f"{value.name} ({kind}, from {module_path(value) or 'the top level'}) "
                                       "crosses here and only floating-point tensors can be sent")
            if self.blocked[q] is None and needed_symbols:
                available = {s for v in self.sent[q] for s in _tensor_symbols(v)}
                missing = [s for s in needed_symbols if s not in available]
                if missing:
                    self.blocked[q] = (f"{needed_symbols[missing[0]]} needs the size {missing[0]}, which no "
                                       "activation crossing here carries")

    def node_costs(self, balance: str, seconds: dict[str, float] | None) -> list[float]:
        """One cost per compute node in the unit ``balance`` asks for."""
        if balance == "flops":
            return [self.analysis[n].flops for n in self.sequence]
        if balance == "time":
            assert seconds is not None
            return [float(seconds.get(n.name, 0.0)) for n in self.sequence]
        if balance == "params":
            return [elements for elements, _ in node_parameter_costs(self.gm, self.sequence)]
        return list(node_training_memory(self.gm, self.analysis, self.sequence))


def is_sym_size(node: torch.fx.Node) -> bool:
    """True for ``aten.sym_size`` (reading one dimension of a tensor's size)."""
    return node.op == "call_function" and node.target in (torch.ops.aten.sym_size.int, torch.ops.aten.sym_size)


def _is_random_or_mutating(node: torch.fx.Node) -> bool:
    name = str(getattr(node.target, "__name__", node.target)).lower()
    if any(marker in name for marker in _RANDOM_MARKERS):
        return True
    schema = getattr(node.target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def size_symbol(value: Any) -> str | None:
    """The symbol of a symbolic size (``s0``), or None for a plain int."""
    if isinstance(value, torch.SymInt):
        return str(value.node.expr)
    return None


def _tensor_symbols(node: torch.fx.Node) -> list[str]:
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return []
    return [s for s in (size_symbol(d) for d in value.shape) if s is not None]


def choose_cuts(layout: Layout, node_costs: list[float], config: PipelineConfig) -> list[int]:
    """Positions (1..n-1) of the K-1 cuts: from ``split_before`` or the exact solver."""
    k = config.stages
    allowed = [q for q in range(1, layout.count) if layout.blocked[q] is None]
    if config.split_before:
        positions = []
        for name in config.split_before:
            q = _position_of(layout, name)
            if layout.blocked[q] is not None:
                raise PassError(f"pipeline: cannot cut before {name!r}: {layout.blocked[q]}; choose another "
                                "module path")
            positions.append(q)
        if positions != sorted(set(positions)):
            raise PassError(f"pipeline: split_before {list(config.split_before)} must name distinct places in "
                            "graph order")
        return positions
    if k - 1 > len(allowed):
        raise PassError(_too_few_cuts_message(layout, k, allowed))
    bounds = [0] + allowed + [layout.count]
    unit_costs = [sum(node_costs[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    unit_bytes = [0] + [layout.sent_bytes[q] for q in allowed]
    partition = solve(unit_costs, k, unit_bytes, config.cut_slack)
    return [bounds[s] for s in partition.starts[1:]]


def _position_of(layout: Layout, name: str) -> int:
    for node in layout.sequence:
        path = module_path(node)
        if node.name == name or path == name or path.startswith(name + "."):
            q = layout.position[node]
            if q == 0:
                raise PassError(f"pipeline: split_before {name!r} is the first node; the first stage would be empty")
            return q
    raise PassError(f"pipeline: split_before {name!r} matches no node or module path; name a module such as "
                    f"{module_path(layout.sequence[len(layout.sequence) // 2]) or layout.sequence[1].name!r}")


def _too_few_cuts_message(layout: Layout, stages: int, allowed: list[int]) -> str:
    reasons = Counter(r for r in layout.blocked[1:] if r is not None)
    where = "; ".join(f"{count} places: {reason}" for reason, count in reasons.most_common(2))
    return (f"pipeline: stages={stages} needs {stages - 1} cuts but only {len(allowed)} of {layout.count - 1} "
            f"places between nodes can be cut ({where or 'the graph has too few nodes'}); lower pipeline.stages")
