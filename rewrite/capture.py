"""Capture a model as a trainable ``torch.fx.GraphModule``: symbolic tracing where it works, else
``torch.export.export(strict=False)``. Either way every node knows the module path it came from."""

from __future__ import annotations

import contextlib
import copy
import gc
import io
import logging
import re
import traceback
from typing import Any

import torch
import torch.fx

from .canonical import causal_sdpa, loss_boundary, uncast_outputs
from .data_branches import export_specialised, is_data_dependent, routed_shape_log
from .errors import CaptureError
from .graph import get_attr_value, parent_module
from .locate import error_line, model_frame
from .program import Program
from .spec import ModelSpec

log = logging.getLogger(__name__)

CAPTURE_PATHS = ("auto", "symbolic_trace", "export")


def capture(spec: ModelSpec, path: str = "auto", dynamic_batch: bool = True, canonical: bool = True) -> Program:
    """Capture ``spec.module`` (a deep copy: the user's model is never touched) into a Program.

    ``path`` is ``auto`` (symbolic tracing, falling back to export), ``symbolic_trace`` or ``export``.
    ``dynamic_batch``: export with a symbolic batch dimension (any batch runs without re-capture; an
    example of batch 1 is exported at batch 2; export takes about twice as long); False pins the
    example's shapes. Symbolic tracing is always shape-generic. ``canonical``: on exported graphs, give SDPA calls whose mask is the materialised causal
    mask ``is_causal=True`` (and ``enable_gqa`` instead of ``repeat_kv`` copies), as eager mode calls it
    and return outputs a no-op upcast had aliased (``logits.float()``) unconverted (exact; see
    ``effcompile.canonical``), and mark the loss boundary after the logits for ``torch.compile`` (a
    no-op marker); the counts are ``program.meta["causal_sdpa"]`` / ``["uncast_outputs"]`` /
    ``["loss_boundary"]``. Python branches on a tensor's value (``if mask.any():``), which export cannot
    follow symbolically, are taken as the example takes them, each held by a runtime assertion in the
    graph (other inputs raise, never compute the wrong branch); they are listed in
    ``program.meta["data_branches"]``. Raises CaptureError naming the op or source line neither path could
    follow.
    """
    if path not in CAPTURE_PATHS:
        raise CaptureError(f"unknown capture path {path!r}; use one of {', '.join(CAPTURE_PATHS)}")
    try:
        module = copy.deepcopy(spec.module)
    except RuntimeError as error:  # e.g. a non-leaf tensor attribute (recurrent_gemma): deepcopy refuses it
        computed = [f"{name}.{key}" if name else key for name, sub in spec.module.named_modules()
                    for key, value in vars(sub).items() if isinstance(value, torch.Tensor) and not value.is_leaf]
        what = (f"the tensor attribute {', '.join(computed[:3])} is computed from parameters (not a leaf), which "
                "deepcopy refuses" if computed else error_line(error))
        raise CaptureError(f"cannot copy {spec.name} for capture: {what}; register it as a buffer or compute "
                           "it in forward") from error
    module.train(spec.module.training)
    failures: list[str] = []
    if path in ("auto", "symbolic_trace") and not _is_hf_model(module):
        try:
            gm = _symbolic_trace(module, spec)
            repoint_aliases(gm, module, spec.module)
            return Program(gm, spec.args, dict(spec.kwargs), spec.loss_fn, "symbolic_trace", spec.name,
                           {"fallback_reason": None})
        except Exception as error:  # symbolic tracing fails in many ways; export gets its turn
            failures.append(f"symbolic_trace: {error_line(error)}")
            log.info("symbolic_trace failed, trying torch.export: %s", error)
            if path == "symbolic_trace":
                raise CaptureError(f"cannot capture {spec.name}: {failures[0]}; try --capture export") from error
    elif path == "symbolic_trace":
        raise CaptureError(f"cannot capture {spec.name} with symbolic_trace: Hugging Face models need "
                           "torch.export; use --capture export or auto")
    else:
        failures.append("symbolic_trace: skipped (Hugging Face models need torch.export)")
    try:
        gm = _export(module, spec, dynamic_batch)
    except Exception as error:
        detail = "; ".join(failures + [f"torch.export: {error_line(error)}"])
        raise CaptureError(f"cannot capture {spec.name}: {detail}; {_capture_fix(spec.module)}") from error
    _refuse_vmapped_indexing(gm, spec)
    repoint_aliases(gm, module, spec.module)
    program = Program(gm, spec.args, dict(spec.kwargs), spec.loss_fn, "export", spec.name,
                      {"fallback_reason": failures[0] if failures else None,
                       "data_branches": list(gm.meta.get("data_branches", ()))})
    _check_custom_backwards(program, spec)
    if canonical:
        program.meta["causal_sdpa"] = causal_sdpa(program)
        program.meta["uncast_outputs"] = uncast_outputs(program.gm)
        program.meta["loss_boundary"] = loss_boundary(program.gm)
    del module
    gc.collect()  # export leaves the deep copy's tensors in reference cycles: free them now, not at some later gc
    return program


_ABSENT = object()


def _tensor_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def repoint_aliases(gm: torch.fx.GraphModule, copy_: torch.nn.Module, original: torch.nn.Module) -> int:
    """Re-point every graph constant that aliases a parameter or buffer of the user's ``original`` model
    to ``copy_``'s tensor of the same name (registered on ``gm`` under that name if absent).

    A closure stored on a module (``self.f = lambda x: m.mlp(x)``) survives ``copy.deepcopy`` by reference,
    so tracing the copy reaches the original's tensors and lifts them as constants: the copy would never
    train them and would share storage with the user's model. Returns how many constants were re-pointed.
    Raises CaptureError when a constant shares storage with a trainable user tensor that has no name in the
    model (a tensor requiring grad held outside the module tree), or with only part of a named one.
    """
    named = {_tensor_key(t): (name, kind) for kind, items in (("parameter", original.named_parameters()),
                                                               ("buffer", original.named_buffers()))
             for name, t in items}
    storages = {key[0] for key in named} | _closure_trainables(original)
    own = {id(p) for p in gm.parameters()}
    repointed = 0
    for node in list(gm.graph.nodes):
        if node.op != "get_attr":
            continue
        try:
            value = get_attr_value(gm, node.target)
        except AttributeError:
            continue
        if not isinstance(value, torch.Tensor) or id(value) in own or value.device.type == "meta":
            continue
        hit = named.get(_tensor_key(value))
        if hit is None:
            if value.untyped_storage().data_ptr() in storages or value.requires_grad:
                raise CaptureError(f"cannot capture: graph constant {node.target} shares storage with a tensor of "
                                   "the user's model that has no parameter/buffer name (held outside the module "
                                   "tree, e.g. by a closure); make it a parameter or buffer of the model")
            continue
        name, kind = hit
        target = copy_.get_parameter(name) if kind == "parameter" else copy_.get_buffer(name)
        if get_attr_value(gm, name, _ABSENT) is _ABSENT:
            owner, leaf = parent_module(gm, name, create=True)
            if kind == "parameter":
                owner.register_parameter(leaf, target)
            else:
                owner.register_buffer(leaf, target)
        stale, node.target = node.target, name
        if not any(n.op == "get_attr" and n.target == stale for n in gm.graph.nodes):
            owner, leaf = parent_module(gm, stale)
            delattr(owner, leaf)
        repointed += 1
    if repointed:
        gm.graph.lint()
        gm.recompile()
        log.info("re-pointed %d constant(s) aliasing the user's model to the copy's own tensors", repointed)
    return repointed


def _closure_trainables(original: torch.nn.Module) -> set[int]:
    """Storages of tensors requiring grad that functions stored on the model's modules close over."""
    found: set[int] = set()
    for module in original.modules():
        for value in vars(module).values():
            for cell in getattr(value, "__closure__", None) or ():
                try:
                    content = cell.cell_contents
                except ValueError:  # an empty cell
                    continue
                if isinstance(content, torch.Tensor) and content.requires_grad:
                    found.add(content.untyped_storage().data_ptr())
    return found


def _is_hf_model(module: torch.nn.Module) -> bool:
    return any(cls.__module__.startswith("transformers.") for cls in type(module).__mro__)


def _symbolic_trace(module: torch.nn.Module, spec: ModelSpec) -> torch.fx.GraphModule:
    gm = torch.fx.symbolic_trace(module)
    gm.train(module.training)
    # A trace can succeed and still be wrong (Python branches on shapes are baked in): check it.
    with torch.no_grad():
        torch.manual_seed(0)
        expected = module(*spec.args, **spec.kwargs)
        torch.manual_seed(0)
        got = gm(*spec.args, **spec.kwargs)
    _assert_same(expected, got)
    return gm


def _export(module: torch.nn.Module, spec: ModelSpec, dynamic_batch: bool = True) -> torch.fx.GraphModule:
    # torch.export writes graph dumps straight to stderr when it gives up; the error we raise says it all.
    # Its shape environment also warns on its own stderr handler ("Unable to find user code ...").
    if log.isEnabledFor(logging.DEBUG):
        return _export_loud(module, spec, dynamic_batch)
    with routed_shape_log(), contextlib.redirect_stderr(io.StringIO()):
        return _export_loud(module, spec, dynamic_batch)


@contextlib.contextmanager
def _no_op_module_conversions() -> Any:
    """While exporting, ``module.to(dtype/device)`` that would change no tensor returns the module untouched,
    as it does in eager mode. Some models convert a submodule inside ``forward`` (Switch Transformers' router:
    ``self.classifier = self.classifier.to(self.dtype)``), and ``Module._apply`` on export's fake parameters
    tries to swap each for itself and fails. A conversion that would change a tensor still goes through."""
    original = torch.nn.Module.to

    def to(self: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.nn.Module:
        try:
            device, dtype, _, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        except Exception:  # let the real method raise its own error
            return original(self, *args, **kwargs)
        tensors = [*self.parameters(), *self.buffers()]
        unchanged = memory_format is None and all(
            (device is None or t.device == device)
            and (dtype is None or not (t.is_floating_point() or t.is_complex()) or t.dtype == dtype)
            for t in tensors)
        return self if unchanged else original(self, *args, **kwargs)

    torch.nn.Module.to = to  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.to = original  # type: ignore[method-assign]


@contextlib.contextmanager
def _custom_functions(found: dict[str, str]) -> Any:
    """While exporting, record in ``found`` (class name → the model's line) each ``torch.autograd.Function``
    of the model's own (not torch's) with its own ``backward`` that the model applies: torch.export traces
    its forward and drops that backward."""
    function = torch.autograd.Function
    original = function.__dict__["apply"]

    def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
        if cls.backward is not function.backward and not cls.__module__.startswith("torch."):
            found.setdefault(cls.__qualname__, model_frame(traceback.extract_stack()[:-1], innermost=True))
        return original.__func__(cls, *args, **kwargs)

    function.apply = classmethod(apply)  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        function.apply = original  # type: ignore[method-assign]


def _export_loud(module: torch.nn.Module, spec: ModelSpec, dynamic_batch: bool) -> torch.fx.GraphModule:
    functions: dict[str, str] = {}
    with _no_op_module_conversions(), _custom_functions(functions):
        gm = _export_or_specialise(module, spec, dynamic_batch)
    gm.meta["custom_functions"] = functions
    return gm


def _check_custom_backwards(program: Program, spec: ModelSpec) -> None:
    """When the model applied custom autograd Functions (their backward is not in the graph), compare one
    training step of the graph with the model's own: raise CaptureError naming them when the graph's backward
    fails or its gradients differ; else list them in ``program.meta["custom_functions"]``."""
    from .verify import compare

    functions = program.gm.meta.get("custom_functions") or {}
    if not functions:
        return
    named = ", ".join(f"{name}{where}" for name, where in functions.items())
    try:
        reference = Program(copy.deepcopy(spec.module), spec.args, dict(spec.kwargs), spec.loss_fn, "eager", spec.name)
        result = compare(reference, program, exact=True)
        why = "" if result.ok else f"its gradients differ from the model's ({'; '.join(result.failures)[:200]})"
    except Exception as error:  # the differentiated forward can fail (SEW-D's XSoftmax fills its output in place)
        why = f"that fails ({error_line(error)})"
    if why:
        raise CaptureError(f"cannot capture {spec.name}: it applies the custom autograd.Function {named}, whose own "
                           f"backward torch.export does not keep; the graph differentiates its forward instead and "
                           f"{why}; make it a torch.library custom op with register_autograd (export keeps those) "
                           "or write it with differentiable tensor ops")
    program.meta["custom_functions"] = list(functions)


def _export_or_specialise(module: torch.nn.Module, spec: ModelSpec, dynamic_batch: bool) -> torch.fx.GraphModule:
    try:
        return _export_once(module, spec, dynamic_batch)
    except Exception as error:
        if not is_data_dependent(error):
            raise
        log.info("export hit a data-dependent branch (%s); exporting specialised on the example's data", error)
        try:
            return export_specialised(lambda: _export_once(module, spec, dynamic_batch), spec.name)
        except Exception as second:
            log.info("the specialised export failed too: %s", second)
            raise error from None  # the first error names the model's own branch


def _refuse_vmapped_indexing(gm: torch.fx.GraphModule, spec: ModelSpec) -> None:
    """Raise CaptureError when the exported graph indexes a tensor through ``torch.vmap`` (transformers'
    ``masking_utils`` with ``use_vmap=True``, T5Gemma 2's bidirectional mask): export records it as a
    ``flat_apply`` of dynamo's wrapped ``mod_index``, and replaying that outside export leaks vmap's batched
    tensors into the graph's values."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and type(node.target).__name__ == "FlatApply" and any(
                "_trace_wrapped_higher_order_op" in str(arg.target) for arg in node.all_input_nodes
                if arg.op == "get_attr"):
            frames = re.findall(r'File "([^"]+)", line (\d+)', node.meta.get("stack_trace") or "")
            where = ""
            if frames:
                file, line = frames[-1]
                where = f" at {file.split('site-packages/', 1)[-1]}:{line}"
            raise CaptureError(f"cannot capture {spec.name}: the model indexes a tensor inside torch.vmap{where} "
                               "(a mask built by vmapping a mask function), which torch.export records as a call "
                               "that leaks vmap's batched tensors when replayed; build that mask without vmap "
                               "(an index-based mask function) or pass the model a ready 4-D attention mask")


def _export_once(module: torch.nn.Module, spec: ModelSpec, dynamic_batch: bool) -> torch.fx.GraphModule:
    exported = None
    if dynamic_batch:
        try:
            # Copies: a failed dynamic export leaves its inputs marked dynamic, and the static retry would fail.
            args, kwargs = _fresh_tensors(_batch_of_two(spec))
            exported = torch.export.export(module, args, kwargs, strict=False,
                                           dynamic_shapes=_batch_dynamic_shapes(spec))
        except Exception as error:  # some models pin the batch size: capture them static
            log.info("dynamic-batch export failed (%s); exporting with static shapes", error)
    if exported is None:
        exported = torch.export.export(module, spec.args, spec.kwargs, strict=False)
    stateful = exported.module()
    _drop_runtime_guards(stateful)
    # A plain GraphModule: no export-time input-check hooks, so it pickles and takes other batch sizes.
    gm = torch.fx.GraphModule(stateful, stateful.graph)
    gm.meta["dynamic_batch"] = any(str(c) for c in exported.range_constraints)
    gm.train(module.training)
    return gm


def _fresh_tensors(inputs: Any) -> Any:
    """``inputs`` with each tensor replaced by a copy (same values)."""
    from torch.utils import _pytree as pytree

    return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, inputs)


def _batch_of_two(spec: ModelSpec) -> tuple[tuple, dict[str, Any]]:
    """The example inputs to export a dynamic batch dimension from: as given, or, when every tensor input
    has batch 1 (a size torch.export specialises), each repeated to batch 2. The graph then takes any
    batch size, 1 included."""
    from torch.utils import _pytree as pytree

    tensors = [t for t in pytree.tree_leaves((spec.args, spec.kwargs)) if isinstance(t, torch.Tensor) and t.dim()]
    if not tensors or any(t.shape[0] != 1 for t in tensors):
        return spec.args, spec.kwargs
    double = lambda t: torch.cat([t, t]) if isinstance(t, torch.Tensor) and t.dim() else t  # noqa: E731
    return pytree.tree_map(double, spec.args), pytree.tree_map(double, spec.kwargs)


def _batch_dynamic_shapes(spec: ModelSpec) -> tuple | dict:
    """Mark dim 0 of every tensor input of rank ≥ 1 as a batch dimension torch.export may keep symbolic."""

    def mark(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return {0: torch.export.Dim.DYNAMIC}
        if isinstance(value, (list, tuple)):
            return type(value)(mark(v) for v in value)
        if isinstance(value, dict):
            return {k: mark(v) for k, v in value.items()}
        return None

    if spec.kwargs and not spec.args:
        return {k: mark(v) for k, v in spec.kwargs.items()}
    return tuple(mark(v) for v in spec.args) if not spec.kwargs else \
        (tuple(mark(v) for v in spec.args), {k: mark(v) for k, v in spec.kwargs.items()})


def _drop_runtime_guards(gm: torch.fx.GraphModule) -> None:
    """Remove the input-shape guard torch.export inserts (``_guards_fn``): rewritten graphs are run on
    batches of other sizes (micro-batches, validation), which the static guard would refuse. Remove the
    dtype assertions too (see below)."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            gm.graph.erase_node(node)
    # Export pins each `.to()` result's capture-time dtype with an assertion; under torch.autocast or after
    # a precision pass those dtypes legitimately change, so the checks would only get in the way. Nested
    # graphs (torch.no_grad / autocast regions exported as higher-order ops) carry them too.
    for module in gm.modules():
        if isinstance(module, torch.fx.GraphModule):
            asserts = [n for n in module.graph.nodes if n.op == "call_function" and not n.users
                       and n.target is torch.ops.aten._assert_tensor_metadata.default]
            for node in asserts:
                module.graph.erase_node(node)
            if asserts and module is not gm:
                module.recompile()
    if "_guards_fn" in gm._modules:
        del gm._modules["_guards_fn"]
    gm.graph.lint()
    gm.recompile()


def _assert_same(expected: Any, got: Any) -> None:
    from torch.utils import _pytree as pytree

    expected_leaves, got_leaves = pytree.tree_leaves(expected), pytree.tree_leaves(got)
    if len(expected_leaves) != len(got_leaves):
        raise RuntimeError("the traced module returns a different output structure")
    for e, g in zip(expected_leaves, got_leaves):
        if isinstance(e, torch.Tensor):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def _capture_fix(module: torch.nn.Module) -> str:
    """The fix a capture refusal names: turn off a config's layerdrop (a random Python branch per layer) when
    it is on, else make the code traceable."""
    config = getattr(module, "config", None)
    drops = {name: getattr(config, name, None) for name in dir(config) if name.endswith("layerdrop")} if config is not None else {}
    drops = {name: value for name, value in drops.items() if isinstance(value, (int, float)) and value > 0}
    if drops:
        settings = " ".join(f"--model-arg {name}=0" for name in sorted(drops))
        return (f"the config's {', '.join(f'{n}={v}' for n, v in sorted(drops.items()))} skips layers by a random "
                f"Python branch, which cannot be captured: set {settings}")
    return "make that code traceable (no data-dependent Python control flow) or wrap it in a leaf module"
