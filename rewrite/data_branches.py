"""Capture past Python branches on a tensor's value (``if mask.any():``): export again under torch's
real-tensor propagation, each branch taken as the example takes it and held by a runtime assertion in the
graph, labelled so that passes keep it and exporters without runtime checks (ONNX) refuse the graph."""

from __future__ import annotations

import contextlib
import logging
import traceback
from collections.abc import Callable, Iterator

import torch
import torch.fx

from .errors import CaptureError
from .graph import bounded_walk
from .locate import model_frame


def is_data_dependent(error: BaseException) -> bool:
    """Whether export stopped at Python control flow on a tensor's value (``if mask.any():``)."""
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, GuardOnDataDependentSymNode):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


DATA_BRANCH_CHECK = "effcompile: this input takes a different branch on a tensor's value"


def is_data_branch_check(node: torch.fx.Node) -> bool:
    """Whether ``node`` is a runtime assertion holding a graph captured specialised on its example's data
    (see ``export_specialised``) to a branch that example took: passes must keep it."""
    return (node.op == "call_function" and node.target is torch.ops.aten._assert_scalar.default
            and len(node.args) > 1 and isinstance(node.args[1], str) and node.args[1].startswith(DATA_BRANCH_CHECK))


def data_branch_checks(gm: torch.fx.GraphModule) -> list[str]:
    """The messages of the data-branch checks (``is_data_branch_check``) in ``gm`` and its nested graphs."""
    return [node.args[1] for module in gm.modules() if isinstance(module, torch.fx.GraphModule)
            for node in module.graph.nodes if is_data_branch_check(node)]


class _BranchLog(logging.Handler):
    """Collects the branches torch's shape environment decides from real example values (its
    ``propagate_real_tensors`` records), each with the model's own source line that took it."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.branches: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not str(record.msg).startswith("propagate_real_tensors"):
            return
        where = model_frame(traceback.extract_stack()[:-1], innermost=True) or " in the model"
        args = record.args if isinstance(record.args, tuple) else ()
        what = f"{args[0]} is {args[1]}" if len(args) == 2 else record.getMessage()
        entry = f"{where.strip()} ({what})"
        if entry not in self.branches:
            self.branches.append(entry)


def export_specialised(export: Callable[[], torch.fx.GraphModule], name: str) -> torch.fx.GraphModule:
    """Run ``export`` (a torch.export of the model ``name``, to a GraphModule) for a model whose Python branches
    read tensor values (``if mask.any():``): torch propagates the example's real values through the trace,
    takes each such branch as the example does, and inserts a runtime assertion (``aten._assert_scalar``) that
    the branch goes the same way. The graph is exact for inputs that take the example's branches and raises
    for any other input; it never computes the wrong branch. The branches taken are
    ``gm.meta["data_branches"]``. Raises CaptureError when there is no such check to hold the graph to, or a
    branch reads a random draw."""
    import torch._functorch.config as functorch_config

    branches = _BranchLog()
    with routed_shape_log(branches), functorch_config.patch(fake_tensor_propagate_real_tensors=True):
        gm = export()
    asserts = [n for sub in gm.modules() if isinstance(sub, torch.fx.GraphModule) for n in sub.graph.nodes
               if n.op == "call_function" and n.target is torch.ops.aten._assert_scalar.default and _on_data(n)]
    if not branches.branches or not asserts:  # nothing to hold the graph to its example's branches
        raise CaptureError("export specialised on data without a runtime check")
    if any(_depends_on_random(node) for node in asserts):
        # A random branch (layerdrop: `if torch.rand([]) < p`) would fail its check at random steps: refuse.
        raise CaptureError("a branch on a random draw cannot be specialised")
    gm.meta["data_branches"] = branches.branches
    message = (f"{DATA_BRANCH_CHECK} than the example {name} was captured with "
               f"({'; '.join(branches.branches)[:400]}); capture it with an example like this input")
    for node in asserts:
        node.args = (node.args[0], message)
    for sub in gm.modules():
        if isinstance(sub, torch.fx.GraphModule):
            sub.recompile()
    return gm


@contextlib.contextmanager
def routed_shape_log(handler: logging.Handler | None = None) -> Iterator[None]:
    """While the block runs, torch's shape environment logs to ``handler`` only (None: nowhere) instead of its
    own stderr handler. With a handler, its warnings are made even where the application quiets torch's
    loggers (the CLI) or disables warnings (the zoo)."""
    shapes_log = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    saved = shapes_log.handlers[:], shapes_log.propagate, shapes_log.level, logging.root.manager.disable
    shapes_log.handlers, shapes_log.propagate = ([handler] if handler else []), False
    if handler is not None:
        shapes_log.setLevel(logging.WARNING)
        logging.disable(logging.NOTSET)
    try:
        yield
    finally:
        shapes_log.handlers, shapes_log.propagate = saved[0], saved[1]
        shapes_log.setLevel(saved[2])
        logging.disable(saved[3])


def _on_data(assertion: torch.fx.Node) -> bool:
    """Whether a runtime assertion checks, at any distance, a value read from a tensor's data (``.item()``,
    ``.any()`` in an ``if``, a ``nonzero`` size: an unbacked symbol), not a shape."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    reads = (torch.ops.aten.item.default, torch.ops.aten._local_scalar_dense.default)
    for node in _ancestors(assertion):
        value = node.meta.get("val")
        if node.target in reads or (isinstance(value, (torch.SymInt, torch.SymBool, torch.SymFloat))
                                    and free_unbacked_symbols(value)):
            return True
    return False


def _ancestors(node: torch.fx.Node) -> Iterator[torch.fx.Node]:
    """Every node ``node`` reads, at any distance."""
    return bounded_walk(node, lambda n: n.all_input_nodes, len(node.graph.nodes))


def _depends_on_random(node: torch.fx.Node) -> bool:
    """Whether ``node`` reads, at any distance, the result of a random op (ATen's ``nondeterministic_seeded``)."""
    return any(torch.Tag.nondeterministic_seeded in (getattr(n.target, "tags", ()) if n.op == "call_function" else ())
               for n in _ancestors(node))
