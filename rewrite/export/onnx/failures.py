"""Name what broke when the dynamo ONNX exporter fails: the op without a translation and where it is.

The exporter's own message opens with a coloured banner ("Failed to convert the exported program to an ONNX
model. This is step 3/3 …") and names the op further down its text or in its ``__cause__`` chain
(``No ONNX function found for <OpOverload(op='transformers.grouped_mm_fallback', overload='default')>``,
``target=torch.ops.<ns>.<name>.<overload>``). ``describe_export_failure`` strips the ANSI escapes, finds the
op, the node of the captured graph that calls it and its module path, and says how to get past it.
"""

from __future__ import annotations

import re

import torch.fx

from ...graph import module_path

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_OVERLOAD = re.compile(r"OpOverload\(op='([\w.]+)', overload='(\w+)'\)")
_TARGET = re.compile(r"target=torch\.ops\.([\w.]+)")
_NODE = re.compile(r"(?:While executing|translating node) %(\w+)")
_BANNER = ("Failed to convert the exported program", "Failed to decompose the FX graph", "Failed to export",
           "Next steps", "- ", "## ", "(Refer to", "⬆", "<class ")
# Ops with a known way around them: (substring of the op name, the fix).
_KNOWN_FIXES = (
    ("grouped_mm", "it is transformers' grouped-GEMM mixture-of-experts kernel: build the model with the "
                   "batched_mm experts implementation (`--model-arg experts_implementation=batched_mm` for hf: "
                   "models; `from_pretrained(..., experts_implementation=\"batched_mm\")` or "
                   "`model.set_experts_implementation(\"batched_mm\")` in a model file), which gathers each "
                   "token's expert weights with ops ONNX has (the eager loop has data-dependent shapes)"),

)


def strip_ansi(text: str) -> str:
    """``text`` without ANSI colour/escape sequences."""
    return _ANSI.sub("", text)


def error_chain_text(error: BaseException) -> str:
    """The messages of ``error`` and every exception it was raised from (``__cause__``/``__context__``), ANSI
    escapes stripped, one after the other."""
    texts, seen = [], set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        texts.append(strip_ansi(str(current)))
        current = current.__cause__ or current.__context__
    return "\n".join(texts)


def failing_op(text: str) -> str | None:
    """The op the exporter could not translate or decompose, as ``<ns>.<name>.<overload>`` (from an
    ``OpOverload(...)`` or ``target=torch.ops....`` in ``text``), else None."""
    match = _OVERLOAD.search(text)
    if match:
        return f"{match.group(1)}.{match.group(2)}"
    match = _TARGET.search(text)
    return match.group(1) if match else None


def _where(gm: torch.fx.GraphModule | None, op: str, name: str | None) -> str | None:
    """``<module path> (node <name>)`` of the node of ``gm`` called ``name`` if it calls ``op``, else of the first
    node calling ``op``; None when there is none."""
    if gm is None:
        return None
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and op in (str(n.target), f"{n.target}.default")]
    node = next((n for n in calls if n.name == name), calls[0] if calls else None)
    return None if node is None else f"{module_path(node) or '<root module>'} (node {node.name})"


def _innermost(error: BaseException) -> BaseException:
    seen = set()
    while id(error) not in seen and (error.__cause__ or error.__context__) is not None:
        seen.add(id(error))
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    return error


def _first_meaningful_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if not line.startswith(_BANNER):
            return line[:300]
    return (lines[0] if lines else "unknown error")[:300]


def describe_export_failure(error: BaseException, gm: torch.fx.GraphModule | None = None) -> str:
    """One line saying what stopped ``torch.onnx.export``: the op with no ONNX translation (or that failed to
    decompose), the module path and node calling it in ``gm``, and the fix; else the exporter's first
    meaningful line (banner and ANSI colour codes dropped) with a generic fix."""
    text = error_chain_text(error)
    op = failing_op(text)
    if op is None:
        return (f"{_first_meaningful_line(text)}; rewrite the code that produces it with ops ONNX has, or "
                "export without this pass")
    node = _NODE.search(text)
    where = _where(gm, op, node.group(1) if node else None)
    if "decompose" in text and "No ONNX function" not in text:
        innermost = strip_ansi(str(_innermost(error))).strip().splitlines()
        stage = "failed in the exporter's decomposition step" + (f" ({innermost[0][:200]})" if innermost else "")
    else:
        stage = "has no ONNX translation"
    fix = next((fix for key, fix in _KNOWN_FIXES if key in op), None) or (
        "rewrite that code with ops ONNX has, or register a translation "
        "(torch.onnx.export(custom_translation_table=...))")
    return f"{op}{f' at {where}' if where else ''} {stage}; {fix}"
