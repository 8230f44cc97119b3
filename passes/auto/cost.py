"""Predicted training-step time and memory of a candidate, read from the shared cost model's per-node costs
(``effcompile.analysis.analyze``: FLOPs, output dtypes and storages, bytes saved for backward).

Time (seconds per optimizer step), a roofline per node:

1. A node takes max(FLOPs / matmul rate of its output dtype, 2 × bytes it writes / memory bandwidth) in the
   forward (views cost nothing); attention runs at ``attention_share`` of the matmul rate and a causal SDPA
   computes half its FLOP count; the backward costs twice the forward.
2. Eager: every node with a kernel adds ``kernel_seconds`` (launch and dispatch) three times (forward and
   backward). Compiled: no per-node cost, and memory-bound nodes move ``fused_memory_share`` of their bytes
   (Inductor fuses chains of elementwise ops).
3. The optimizer (fused AdamW) reads weight, gradient and two moments and writes three of them: 7 × the
   trainable bytes. A pass that recomputes in backward says how much (``details["recompute_cost_share"]``
   — a share of the forward's time — or ``details["recompute_share"]`` of its FLOPs) and how long copies to
   the host stay exposed (``details["predicted_exposed_copy_seconds"]``): the stack's time is the same
   stack's without that pass plus that share of its forward plus the exposed copies.

Memory (bytes): parameters and buffers, gradients and AdamW's two moments of the trainable ones, the
activations autograd keeps for backward (measured in the analysis), and twice the largest single tensor (a
gradient being formed in backward beside its input).

The rates are the shared model's: ``effcompile.analysis.DeviceProfile`` (``local_profile(device)``: a CUDA
device's named profile, the CPU sized to this process's threads). They order and prune candidates; the timed
steps decide.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from effcompile.analysis import Analysis, DeviceProfile, written_bytes
from effcompile.patterns import find_attention

_COMPUTE_OPS = ("call_function", "call_method", "call_module")


@dataclass
class Prediction:
    """Predicted seconds per training step and peak bytes, with the parts they are made of."""

    seconds: float
    bytes: int
    parts: dict[str, float] = field(default_factory=dict)


def _elements(cost: Any) -> int:
    return max(1, cost.output_bytes // max(1, _itemsize(cost.dtype)))


def _itemsize(dtype: torch.dtype | None) -> int:
    return torch.empty((), dtype=dtype).element_size() if dtype is not None else 4


def forward_seconds(gm: torch.fx.GraphModule, analysis: Analysis, profile: DeviceProfile, compiled: bool) -> dict[str, float]:
    """The forward's predicted seconds split into ``compute`` (matmul-bound nodes), ``memory`` (memory-bound
    nodes) and ``kernels`` (the count of nodes that launch work)."""
    causal = {site.node.name for site in find_attention(gm) if site.kind == "sdpa" and site.is_causal}
    attention = {site.node.name for site in find_attention(gm)}
    compute = memory = 0.0
    kernels = 0
    for node in gm.graph.nodes:
        cost = analysis.costs.get(node.name)
        if node.op not in _COMPUTE_OPS or cost is None:
            continue
        written = written_bytes(node, analysis)
        flops = float(cost.flops)
        matmul_like = flops > 4 * _elements(cost)
        if not written and not matmul_like:
            continue  # a view
        kernels += 1
        memory_time = 2 * written / profile.memory_bytes_per_second
        if matmul_like:
            rate = profile.matmul_rate(cost.dtype)
            if node.name in attention:
                rate *= profile.attention_share
                flops *= 0.5 if node.name in causal else 1.0
            compute_time = flops / rate
            if compute_time >= memory_time:
                compute += compute_time
                continue
        memory += memory_time * (profile.fused_memory_share if compiled else 1.0)
    return {"compute": compute, "memory": memory, "kernels": float(kernels)}


def predict(gm: torch.fx.GraphModule, analysis: Analysis, profile: DeviceProfile, compiled: bool,
            records: Sequence[Any] = (), base: Prediction | None = None) -> Prediction:
    """Predicted seconds per training step (forward, backward, fused AdamW) and peak training bytes of
    ``gm`` as analysed, run compiled or eagerly. ``records``: the pass records of its stack; when one of them
    recomputes (``details["recompute_share"]``), give the prediction of the stack without that pass as
    ``base``: the time is then ``base``'s plus the recomputed share of its forward (the analysis of a
    checkpointed graph hides the work inside its segments), the memory this graph's."""
    forward = forward_seconds(gm, analysis, profile, compiled)
    forward_time = forward["compute"] + forward["memory"]
    overhead = 0.0 if compiled else 3 * forward["kernels"] * profile.kernel_seconds
    state = training_state_bytes(gm)
    optimizer_time = 7 * state["trainable"] / profile.memory_bytes_per_second
    seconds = 3 * forward_time + overhead + optimizer_time
    changed = [r for r in records if r.changed]
    recompute_share = sum(float(r.details.get("recompute_cost_share") or r.details.get("recompute_share") or 0.0)
                          for r in changed)
    copies = sum(float(r.details.get("predicted_exposed_copy_seconds") or 0.0) for r in changed)
    recompute = 0.0
    if recompute_share or copies:
        reference = base.parts["forward_s"] if base is not None else forward_time
        recompute = recompute_share * reference
        seconds = (base.seconds if base is not None else seconds) + recompute + copies
    largest = max((c.output_bytes for c in analysis.costs.values()), default=0)
    memory = state["parameters"] + 3 * state["trainable"] + analysis.saved_activation_bytes + 2 * largest
    parts = {"forward_s": forward_time, "forward_compute_s": forward["compute"], "forward_memory_s": forward["memory"],
             "kernels": forward["kernels"], "launch_s": overhead, "optimizer_s": optimizer_time,
             "recompute_s": recompute, "exposed_copy_s": copies, "parameter_bytes": state["parameters"],
             "trainable_bytes": state["trainable"], "activation_bytes": analysis.saved_activation_bytes,
             "largest_tensor_bytes": largest}
    return Prediction(seconds, int(memory), parts)


def training_state_bytes(module: torch.nn.Module) -> dict[str, int]:
    """Bytes of parameters and buffers (``parameters``) and of the trainable parameters (``trainable``: each
    adds a gradient and two AdamW moments of its size), each tensor counted once."""
    seen: set[int] = set()
    total = trainable = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        size = tensor.numel() * tensor.element_size()
        total += size
        if isinstance(tensor, torch.nn.Parameter) and tensor.requires_grad:
            trainable += size
    return {"parameters": total, "trainable": trainable}


def available_memory(device: torch.device) -> tuple[int, str]:
    """Bytes this process can still use on ``device`` and where the figure came from: CUDA's free memory
    (``torch.cuda.mem_get_info``) plus what PyTorch's allocator holds unused; on the CPU the system's
    available memory (psutil, else ``sysconf``)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached), "cuda free memory"
    try:
        import psutil

        return int(psutil.virtual_memory().available), "available system memory"
    except ImportError:  # pragma: no cover - psutil is usually present
        pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else 0
        return int(pages * os.sysconf("SC_PAGE_SIZE")) if pages else 2**62, "available system memory"
