"""``lora``: low-rank adapters on linear layers, with the base frozen (Hu et al. 2021; PEFT's layout).

1. Find linear-like sites (``nn.Linear``, Hugging Face ``Conv1D``, ``aten.linear``, ``aten.addmm``,
   ``mm``) with the shared matcher and keep those whose module path matches ``targets``.
2. Install a ``LoraLinear`` at each site's module path (it keeps the base ``weight``/``bias`` under
   their old names and adds ``lora_A``/``lora_B``) and call it instead of the matched node. It computes
   ``base(x) + scaling · lora_B(lora_A(dropout(x)))`` with ``scaling = alpha / rank``
   (``alpha / sqrt(rank)`` with ``rslora``), exactly PEFT's forward.
3. Under autocast, adapted layers that read the same input (q/k/v, gate/up) share one low-precision
   copy of it (``autocast_input``; the identity without autocast), so one copy is kept for backward.
4. Freeze every parameter except the adapters (and biases, per ``train_bias``). ``lora_B`` starts at
   zero, so the rewritten model computes what the original did: the pass is exact.
5. Optionally keep the frozen base weights in a lower precision (``base_dtype``), or ``merge`` the
   adapters into the base weights. ``merge_lora``/``unmerge_lora`` do the same on any module later.

PEFT interop lives in ``effcompile.export.peft`` (this pass writes no files): ``lora_state_dict`` names the
adapter weights as PEFT does, ``save_peft_adapter`` / ``load_peft_adapter`` write and read adapter folders;
``lora.adapter`` reads one here (``read_peft_adapter``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx
import torch.nn.functional as F

from effcompile.analysis import parameter_count
from effcompile.errors import OptionError, PassError, SpecError
from effcompile.export.peft import load_lora_state_dict, read_peft_adapter
from effcompile.export.registry import serializable
from effcompile.graph import finalize
from effcompile.pass_manager import Pass, PassRecord, register
from effcompile.passes.linear_sites import check_patterns, erase_dead_attrs, install_site, select_sites
from effcompile.passes.lora_targets import attention_projections, peft_unsupported
from effcompile.program import Program

log = logging.getLogger(__name__)

# The attention projections under the names architectures give them (the list, plus the fused
# query-key-value projections of GPT-NeoX/Falcon/BLOOM, Phi-3 and MPT).
# With the default, the attention projections the attention matcher finds are adapted too (``lora_targets``);
# the names cover families without a matched attention (DeBERTa-v2's ``query_proj``…, timm's ``qkv``, Mamba's
# ``in_proj``/``x_proj``/``out_proj``).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "c_proj", "query", "key", "value",
                   "query_key_value", "qkv_proj", "Wqkv", "query_proj", "key_proj", "value_proj", "qkv",
                   "in_proj", "x_proj", "out_proj")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@serializable
class LoraLinear(torch.nn.Module):
    """A frozen linear (``weight`` in ``layout``: ``"out_in"`` like nn.Linear, ``"in_out"`` like
    Conv1D/addmm) plus a trainable low-rank update ``scaling · lora_B(lora_A(dropout(x)))``.

    The base op is the one the graph had (``linear``, ``addmm`` or ``matmul``), so outputs at init
    are bit-identical. When the base weight's dtype differs from the input's and autocast is off, the
    base runs in the weight's dtype and the adapter in the input's dtype; the result has the input's.
    """

    def __init__(self, weight: torch.nn.Parameter, bias: torch.nn.Parameter | None, layout: str, rank: int,
                 alpha: float, dropout: float = 0.0, rslora: bool = False, init: str = "zeros") -> None:
        super().__init__()
        if layout not in ("out_in", "in_out"):
            raise ValueError(f"layout must be out_in or in_out, got {layout!r}")
        self.layout = layout
        self.weight = weight
        self.bias = bias
        out_features, in_features = weight.shape if layout == "out_in" else weight.shape[::-1]
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.rank, self.alpha, self.rslora = int(rank), float(alpha), bool(rslora)
        self.scaling = self.alpha / (math.sqrt(rank) if rslora else rank)
        adapter_dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        factory = {"device": weight.device, "dtype": adapter_dtype}
        self.lora_dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()
        self.lora_A = torch.nn.Linear(self.in_features, rank, bias=False, **factory)
        self.lora_B = torch.nn.Linear(rank, self.out_features, bias=False, **factory)
        self.merged = False
        self.reset_adapter(init)

    def reset_adapter(self, init: str = "zeros") -> None:
        """PEFT's initialisations: ``zeros`` (A Kaiming-uniform, B = 0) or ``gaussian`` (A ~ N(0, 1/rank²),
        B = 0). Either way the update starts at zero."""
        with torch.no_grad():
            if init == "gaussian":
                torch.nn.init.normal_(self.lora_A.weight, std=1.0 / self.rank)
            else:
                torch.nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            torch.nn.init.zeros_(self.lora_B.weight)

    def base(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen layer alone, computed by the op the captured graph used."""
        weight, bias = self.weight, self.bias
        cast = x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type)
        inputs = x.to(weight.dtype) if cast else x
        if self.layout == "out_in":
            out = F.linear(inputs, weight, bias)
        elif bias is not None:
            flat = inputs if inputs.dim() == 2 else inputs.reshape(-1, inputs.shape[-1])
            out = torch.addmm(bias, flat, weight)
            if inputs.dim() != 2:
                out = out.view(*inputs.shape[:-1], weight.shape[1])
        else:
            out = torch.matmul(inputs, weight)
        return out.to(x.dtype) if cast else out

    def delta_weight(self) -> torch.Tensor:
        """``scaling · B·A`` in the base weight's layout (``[out, in]`` or ``[in, out]``), float32."""
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        return delta if self.layout == "out_in" else delta.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.merged:
            return result
        down, up = self.lora_A.weight, self.lora_B.weight
        if x.dtype != down.dtype and not torch.is_autocast_enabled(x.device.type):
            down, up = down.to(x.dtype), up.to(x.dtype)
        return result + F.linear(F.linear(self.lora_dropout(x), down), up) * self.scaling

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha:g}, "
                f"layout={self.layout}, merged={self.merged}")


@serializable
def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` in autocast's lower precision when autocast is on for its device (else ``x`` itself).

    Inserted once before the adapted layers that share an input (q/k/v, gate/up), so under autocast
    they share one low-precision copy of it, which the adapters save for backward, instead of each
    casting (and saving) its own. Without autocast it is the identity, so the rewrite stays exact."""
    device = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device):
        low = torch.get_autocast_dtype(device)
        if x.dtype != low and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
            return x.to(low)
    return x



def _check_rank(gm: torch.fx.GraphModule, sites: list, rank: int) -> None:
    """Refuse a rank above min(in, out) of a target: the update B·A cannot have a higher rank, and the
    adapter's matrices would only waste memory (rank 10**9 tried to allocate 128 GB)."""
    shapes = {site.path: tuple(gm.get_parameter(site.weight_target).shape) for site in sites}
    path = min(shapes, key=lambda p: min(shapes[p]))
    if rank > min(shapes[path]):
        raise OptionError(f"lora: rank={rank} is not allowed: it must be ≤ min(in, out) of every target, and "
                          f"the weight of {path} is {shapes[path]}; set --set lora.rank=<1..{min(shapes[path])}> "
                          f"or leave {path} out of lora.targets")


@register
class Lora(Pass):
    """Add trainable low-rank adapters to the chosen linears and freeze everything else."""

    name = "lora"
    summary = "low-rank adapters (PEFT-compatible) on chosen linears; base frozen"
    exact = True

    @dataclass(frozen=True)
    class Config:
        rank: int = field(default=8, metadata={"help": "adapter rank r"})
        alpha: float = field(default=16.0, metadata={"help": "scaling numerator: update = alpha/r · B·A"})
        dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter's input, in [0, 1)"})
        targets: tuple[str, ...] = field(default=DEFAULT_TARGETS, metadata={
            "help": "module names (path suffixes, PEFT's rule), globs or regexes; comma-separated"})
        init: Literal["zeros", "gaussian"] = field(default="zeros", metadata={
            "help": "A Kaiming-uniform (zeros) or N(0, 1/r²) (gaussian); B = 0 either way"})
        train_bias: Literal["none", "all", "lora_only"] = field(default="none", metadata={
            "help": "which biases stay trainable: none, all, or those of adapted layers"})
        rslora: bool = field(default=False, metadata={"help": "scale by alpha/sqrt(r) (rank-stabilised LoRA)"})
        base_dtype: Literal["same", "bfloat16", "float16"] = field(default="same", metadata={
            "help": "store the adapted layers' frozen weights in this dtype (saves memory; then approximate)"})
        merge: bool = field(default=False, metadata={
            "help": "fold the adapters into the base weights (for export/inference); the base trains again"})
        adapter: str = field(default="", metadata={
            "help": "a PEFT adapter folder to load (its r, lora_alpha, target_modules override rank, alpha, targets)"})
        seed: int = field(default=0, metadata={"help": "seed of the adapters' initialisation"})
        share_cast: bool = field(default=True, metadata={
            "help": "under autocast, cast an input shared by several adapted layers once (saves memory)"})

        def __post_init__(self) -> None:
            if self.rank < 1:
                raise OptionError(f"lora: rank {self.rank} must be a positive integer; set e.g. --set lora.rank=8")
            if not (self.alpha > 0 and math.isfinite(self.alpha)):
                raise OptionError(f"lora: alpha {self.alpha} must be a positive number; set e.g. --set lora.alpha=16")
            if not 0.0 <= self.dropout < 1.0:
                raise OptionError(f"lora: dropout {self.dropout} must be in [0, 1); set e.g. --set lora.dropout=0.05")
            if self.merge and self.base_dtype != "same":
                raise OptionError("lora: merge=true with base_dtype lowers the merged weights' precision; "
                                  "use one of them (merge for export, base_dtype for training)")
            check_patterns("lora", self.targets)

    def call(self, program: Program, config: Config) -> PassRecord:
        gm = program.gm
        adapter_state = None
        if config.adapter:
            config, adapter_state = _read_adapter(config)
        trainable_before = parameter_count(gm, trainable_only=True)
        was_trainable = {id(p): p.requires_grad for p in gm.parameters()}
        existing = [name for name, m in gm.named_modules() if isinstance(m, LoraLinear)]
        default = config.targets == DEFAULT_TARGETS
        # (adapted projections are no linear sites: a search from an adapted attention would reach past them)
        projections = attention_projections(gm) if default and not existing else []
        selection = select_sites(gm, tuple(config.targets) + tuple(projections))
        sites, skipped = [], {}
        for site in selection.sites:
            unsupported = peft_unsupported(site)
            if not site.path or (site.kind != "module" and site.weight_target != f"{site.path}.weight"):
                skipped[site.path or site.node.name] = "weight is not a module's .weight; cannot name an adapter"
            elif unsupported is not None and default:
                skipped[site.path] = f"a {unsupported}, not a Linear/Conv1D: PEFT could not load its adapter"
            elif unsupported is not None:
                raise PassError(f"lora: target {site.path} is a {unsupported} (it computes F.linear on its own "
                                "weight), not an nn.Linear/Conv1D, so PEFT cannot load an adapter on it; leave it "
                                "out of lora.targets")
            else:
                sites.append(site)  # a module called twice gets one adapter, used at both calls (as PEFT)
        if not sites:
            return self._nothing(selection, existing, config)
        _check_rank(gm, sites, config.rank)

        adapters: dict[str, LoraLinear] = {}
        with torch.random.fork_rng():  # seeded adapters; the caller's random state is left as it was
            torch.manual_seed(config.seed)
            for site in sites:
                module = adapters.get(site.path)
                if module is None:
                    weight = gm.get_parameter(site.weight_target)
                    bias = gm.get_parameter(site.bias_target) if site.bias_target else None
                    module = LoraLinear(weight, bias, site.weight_layout, config.rank, config.alpha,
                                        config.dropout, config.rslora, config.init)
                    adapters[site.path] = module
                install_site(gm, site, module)
        erase_dead_attrs(gm)
        shared_casts = _share_input_casts(gm) if config.share_cast else 0
        all_adapters = {name: m for name, m in gm.named_modules() if isinstance(m, LoraLinear)}
        _freeze(gm, all_adapters, config.train_bias)
        if adapter_state is not None:
            self.exact = False  # trained adapters change the outputs (by design)
            try:
                load_lora_state_dict(gm, adapter_state)
            except (KeyError, RuntimeError) as error:
                raise PassError(f"lora: the adapter in {config.adapter} does not fit this model ({error}); "
                                "load an adapter trained on this architecture") from None
        if config.base_dtype != "same":
            self.exact = False  # lowering the stored precision of the base changes numerics (by design)
            cast_base(gm, _DTYPES[config.base_dtype])
        if config.merge:
            merge_lora(gm)
            for parameter in gm.parameters():  # a merged model is a plain model again: train as before
                parameter.requires_grad_(was_trainable.get(id(parameter), False))
        finalize(gm)
        trainable_after = parameter_count(gm, trainable_only=True)
        total = parameter_count(gm)
        paths = sorted(adapters)
        adapter_params = sum(m.lora_A.weight.numel() + m.lora_B.weight.numel() for m in adapters.values())
        names = sorted({p.rsplit(".", 1)[-1] for p in paths})
        details = {
            "summary": f"{len(paths)} adapters (r={config.rank}) on {', '.join(names)}; trainable "
                       f"{trainable_before:,} → {trainable_after:,} ({trainable_after / max(total, 1):.2%})",
            "targets_matched": paths, "module_names": names, "adapter_parameters": adapter_params,
            "trainable_before": trainable_before, "trainable_after": trainable_after,
            "trainable_fraction": trainable_after / max(total, 1), "skipped": skipped,
            "already_adapted": existing, "explain": selection.explain, "attention_projections": projections,
            "scaling": config.alpha / (math.sqrt(config.rank) if config.rslora else config.rank),
            "merged": config.merge, "base_dtype": config.base_dtype, "shared_input_casts": shared_casts,
        }
        log.info("lora: %s", details["summary"])
        return PassRecord(self.name, changed=True, stats={"adapters": len(paths), "nodes_rewritten": len(sites)},
                          details=details)

    def _nothing(self, selection: Any, existing: list[str], config: Config) -> PassRecord:
        names = sorted({p.rsplit(".", 1)[-1] for p in selection.all_paths})
        if existing and not selection.sites:
            reason = f"the targets are already adapted ({len(existing)} LoraLinear modules); nothing to add"
        elif config.targets != DEFAULT_TARGETS:
            raise PassError(f"lora: targets {', '.join(config.targets)} match no linear layer; the linears here "
                            f"are named {', '.join(names) or '(none)'}; set --set lora.targets=<names>")
        else:  # as PEFT: nothing to adapt is an error, not a model with nothing to train
            raise PassError(f"lora: no attention projection found and no linear matches the default targets; the "
                            f"linears here are named {', '.join(names) or '(none)'}; set --set lora.targets=<names>")
        return PassRecord(self.name, changed=False, reason=reason,
                          details={"summary": reason, "explain": selection.explain, "already_adapted": existing})


def _share_input_casts(gm: torch.fx.GraphModule) -> int:
    """Route the input of every ``LoraLinear`` call through one ``autocast_input`` node per input.
    Returns the number of ``autocast_input`` nodes added."""
    users: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), LoraLinear):
            source = node.args[0]
            if isinstance(source, torch.fx.Node) and not (source.op == "call_function" and source.target is autocast_input):
                users.setdefault(source, []).append(node)
    for source, calls in users.items():
        with gm.graph.inserting_after(source):
            cast = gm.graph.call_function(autocast_input, (source,))
        cast.meta.update({k: v for k, v in calls[0].meta.items() if k in ("nn_module_stack", "stack_trace")})
        for call in calls:
            call.replace_input_with(source, cast)
    return len(users)


def _read_adapter(config: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """The config with the rank, alpha, targets and rslora of the PEFT adapter folder ``config.adapter``,
    and the adapter's weights."""
    import dataclasses

    try:
        settings, state = read_peft_adapter(config.adapter)
    except SpecError as error:
        raise PassError(f"lora: {error}") from None
    targets = settings.get("target_modules") or config.targets
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    config = dataclasses.replace(config, rank=int(settings.get("r", config.rank)),
                                 alpha=float(settings.get("lora_alpha", config.alpha)), targets=targets,
                                 rslora=bool(settings.get("use_rslora", config.rslora)))
    return config, state


def _freeze(gm: torch.nn.Module, adapters: dict[str, LoraLinear], train_bias: str) -> None:
    adapter_params = {id(p) for m in adapters.values() for p in (m.lora_A.weight, m.lora_B.weight)}
    adapted_biases = {id(m.bias) for m in adapters.values() if m.bias is not None}
    for name, parameter in gm.named_parameters():
        keep = id(parameter) in adapter_params
        if train_bias == "all" and name.rsplit(".", 1)[-1] == "bias":
            keep = True
        if train_bias == "lora_only" and id(parameter) in adapted_biases:
            keep = True
        parameter.requires_grad_(keep)


def lora_modules(module: torch.nn.Module) -> dict[str, LoraLinear]:
    """Every ``LoraLinear`` in ``module`` by path."""
    return {name: m for name, m in module.named_modules() if isinstance(m, LoraLinear)}


def cast_base(module: torch.nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen ``weight``/``bias`` of every adapted layer in ``dtype`` (adapters stay as they are).
    Returns the number of tensors cast. Tied weights are cast once and stay tied."""
    cast: dict[int, torch.nn.Parameter] = {}
    for adapter in lora_modules(module).values():
        for name in ("weight", "bias"):
            tensor = getattr(adapter, name)
            if tensor is None or tensor.requires_grad or tensor.dtype == dtype:
                continue
            if id(tensor) not in cast:
                cast[id(tensor)] = torch.nn.Parameter(tensor.detach().to(dtype), requires_grad=False)
    if not cast:
        return 0
    for owner in module.modules():  # re-point every registration of a cast tensor (tied names too)
        for name, tensor in list(owner._parameters.items()):
            if tensor is not None and id(tensor) in cast:
                owner._parameters[name] = cast[id(tensor)]
    return len(cast)


@torch.no_grad()
def merge_lora(module: torch.nn.Module) -> int:
    """Fold every unmerged adapter into its base weight (``W += scaling·B·A``); the adapters then no
    longer run. Returns how many were merged. Outputs are unchanged up to round-off."""
    count = 0
    for adapter in lora_modules(module).values():
        if not adapter.merged:
            adapter.weight.add_(adapter.delta_weight().to(adapter.weight.dtype))
            adapter.merged = True
            count += 1
    return count


@torch.no_grad()
def unmerge_lora(module: torch.nn.Module) -> int:
    """Undo ``merge_lora`` (``W -= scaling·B·A``) so the adapters train again. Returns how many."""
    count = 0
    for adapter in lora_modules(module).values():
        if adapter.merged:
            adapter.weight.sub_(adapter.delta_weight().to(adapter.weight.dtype))
            adapter.merged = False
            count += 1
    return count
