"""``lowrank``: replace linear weights by their best rank-r factorisation (truncated SVD).

1. Find linear-like sites with the shared matcher; keep those matching ``targets`` (default: every
   linear but the LM head / classifier), skipping a weight that is tied or read elsewhere.
2. Per site, take the SVD ``W = U·diag(s)·Vᵀ`` (``torch.linalg.svd``, float32 or wider) and choose the
   rank: ``rank``, or the smallest rank keeping ``energy`` of ``Σ s²``.
3. Skip the site unless it saves at least ``min_saving`` of its weight's parameters
   (``1 - r·(in+out)/(in·out)``).
4. Install a ``LowRankLinear`` at the site's path, ``x ↦ up(down(x)) + bias`` with
   ``down = √s_r·V_rᵀ`` (``[r, in]``) and ``up = U_r·√s_r`` (``[out, r]``): two trainable linears whose
   product is the Eckart–Young best rank-r approximation. The bias stays.

Approximate: the record lists per layer the rank, parameter and FLOP saving and the relative
Frobenius error ``‖W - W_r‖ / ‖W‖ = √(Σ_{i>r} s_i²) / √(Σ s_i²)``; verification reports the output error.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from effcompile.errors import OptionError, PassError
from effcompile.export.registry import serializable
from effcompile.graph import bounded_walk, finalize, op_name
from effcompile.pass_manager import Pass, PassRecord, register
from effcompile.passes.linear_sites import (
    check_patterns,
    erase_dead_attrs,
    install_site,
    select_sites,
    weight_out_in,
    weight_used_elsewhere,
)
from effcompile.program import Program

log = logging.getLogger(__name__)

ALL = "all"
# Output heads: factorising the vocabulary projection (often tied to the embedding) hurts most.
HEAD_NAMES = ("lm_head", "embed_out", "decoder", "output", "classifier", "score", "qa_outputs")
# A router's scores reach expert selection through at most a few of these (softmax/sigmoid, a cast, a bias,
# a reshape): Mixtral/Qwen-MoE ``softmax → topk``, DeepSeek-V3 ``sigmoid → add(bias) → topk``.
_ROUTING_PASSTHROUGH = frozenset({"softmax", "_softmax", "log_softmax", "sigmoid", "_to_copy", "to", "float",
                                  "type", "type_as", "view", "reshape", "_unsafe_view", "flatten", "unsqueeze",
                                  "squeeze", "add", "sub", "mul", "div", "clone", "contiguous", "getitem"})
_EXPERT_SELECTION = frozenset({"topk", "argmax", "argsort", "sort"})
_ROUTING_DEPTH = 6


@serializable
class LowRankLinear(torch.nn.Module):
    """``x ↦ up(down(x)) + bias``: a linear layer stored as two factors ``down`` (``[rank, in]``) and
    ``up`` (``[out, rank]``), both trainable."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, bias: torch.nn.Parameter | None) -> None:
        super().__init__()
        rank, in_features = down.shape
        out_features = up.shape[0]
        self.in_features, self.out_features, self.rank = int(in_features), int(out_features), int(rank)
        self.down = torch.nn.Linear(in_features, rank, bias=False, device=down.device, dtype=down.dtype)
        self.up = torch.nn.Linear(rank, out_features, bias=False, device=up.device, dtype=up.dtype)
        with torch.no_grad():
            self.down.weight.copy_(down)
            self.up.weight.copy_(up)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.down(x), self.up.weight, self.bias)

    def weight_out_in(self) -> torch.Tensor:
        """The represented weight ``up·down`` as ``[out, in]``."""
        return self.up.weight @ self.down.weight

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}"


@register
class Lowrank(Pass):
    """Factorise chosen linears into two thin ones by truncated SVD (approximate)."""

    name = "lowrank"
    summary = "replace linears by their best rank-r factorisation (truncated SVD); approximate"
    exact = False

    @dataclass(frozen=True)
    class Config:
        rank: int | None = field(default=None, metadata={"help": "keep this many singular values per layer"})
        energy: float | None = field(default=None, metadata={
            "help": "keep the smallest rank holding this fraction of Σs², in (0, 1]"})
        targets: tuple[str, ...] = field(default=(ALL,), metadata={
            "help": "'all' (every linear but the LM head) or module names/globs/regexes; comma-separated"})
        min_saving: float = field(default=0.0, metadata={
            "help": "skip a layer unless it saves this fraction of its parameters (negative: allow growth)"})

        def __post_init__(self) -> None:
            if (self.rank is None) == (self.energy is None):
                raise OptionError("lowrank: set exactly one of rank and energy; e.g. --set lowrank.rank=64 "
                                  "or --set lowrank.energy=0.9")
            if self.rank is not None and self.rank < 1:
                raise OptionError(f"lowrank: rank {self.rank} must be a positive integer; set e.g. --set lowrank.rank=64")
            if self.energy is not None and not 0.0 < self.energy <= 1.0:
                raise OptionError(f"lowrank: energy {self.energy} is outside (0, 1]; set e.g. --set lowrank.energy=0.9")
            if not (math.isfinite(self.min_saving) and self.min_saving < 1.0):
                raise OptionError(f"lowrank: min_saving {self.min_saving} must be below 1 (a fraction of the "
                                  "layer's parameters); set e.g. --set lowrank.min_saving=0.25")
            check_patterns("lowrank", [t for t in self.targets if t != ALL] or [ALL])

    def call(self, program: Program, config: Config) -> PassRecord:
        gm = program.gm
        everything = ALL in config.targets
        patterns = ["*"] if everything else [t for t in config.targets if t != ALL]
        exclude = list(HEAD_NAMES) if everything else []
        selection = select_sites(gm, patterns, exclude)
        if not selection.sites:
            names = sorted({p.rsplit(".", 1)[-1] for p in selection.all_paths})
            if not everything:
                raise PassError(f"lowrank: targets {', '.join(config.targets)} match no linear layer; the "
                                f"linears here are named {', '.join(names) or '(none)'}; set --set lowrank.targets=<names>")
            reason = "no linear to factorise (only output heads, or none)" if selection.all_paths else "no linear layer"
            return PassRecord(self.name, changed=False, reason=reason,
                              details={"summary": reason, "explain": selection.explain})

        layers: list[dict] = []
        skipped: dict[str, str] = {}
        plans = []
        for site in selection.sites:
            reason = None
            if not site.path or (site.kind != "module" and site.weight_target != f"{site.path}.weight"):
                reason = "weight is not a module's .weight"
            elif everything and (selection_op := routes_experts(site.node)) is not None:
                reason = (f"a mixture-of-experts router (its output feeds {selection_op}, which selects experts; "
                          "factorising it changes expert choice) — name it in lowrank.targets to factorise it")
            else:
                reason = weight_used_elsewhere(gm, site)
            if reason is not None:
                skipped[site.path or site.node.name] = reason
                continue
            weight = weight_out_in(gm, site).detach()
            limit = min(weight.shape)
            if config.rank is not None and config.rank > limit:
                raise PassError(f"lowrank: rank {config.rank} exceeds the largest rank of {site.path} "
                                f"({site.out_features}×{site.in_features} allows at most {limit}); lower "
                                f"--set lowrank.rank or exclude the layer from lowrank.targets")
            plans.append((site, weight))

        for site, weight in plans:
            compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
            u, s, vh = torch.linalg.svd(weight.to(compute), full_matrices=False)
            energy = s.square()
            total = float(energy.sum())
            rank = config.rank if config.rank is not None else _rank_for_energy(energy, config.energy)
            params_before = site.in_features * site.out_features
            params_after = rank * (site.in_features + site.out_features)
            saving = 1.0 - params_after / params_before
            error = math.sqrt(max(float(energy[rank:].sum()), 0.0) / total) if total > 0 else 0.0
            layer = {"path": site.path, "in": site.in_features, "out": site.out_features, "rank": rank,
                     "max_rank": min(weight.shape), "params_before": params_before, "params_after": params_after,
                     "param_saving": saving, "flop_saving": saving, "relative_frobenius_error": error,
                     "energy_kept": 1.0 - (float(energy[rank:].sum()) / total if total > 0 else 0.0)}
            if saving < config.min_saving:
                skipped[site.path] = f"rank {rank} saves {saving:.1%} of its parameters, below min_saving {config.min_saving:g}"
                continue
            root = s[:rank].sqrt()
            down = (root[:, None] * vh[:rank]).to(weight.dtype)
            up = (u[:, :rank] * root[None, :]).to(weight.dtype)
            bias = gm.get_parameter(site.bias_target) if site.bias_target else None
            install_site(gm, site, LowRankLinear(down, up, bias), drop=("weight",))
            layers.append(layer)
        if not layers:
            reason = f"every candidate layer was skipped ({len(skipped)}); see details.skipped"
            return PassRecord(self.name, changed=False, reason=reason,
                              details={"summary": reason, "skipped": skipped, "explain": selection.explain})
        erase_dead_attrs(gm)
        finalize(gm)
        before = sum(layer["params_before"] for layer in layers)
        after = sum(layer["params_after"] for layer in layers)
        worst = max(layer["relative_frobenius_error"] for layer in layers)
        ranks = sorted({layer["rank"] for layer in layers})
        details = {
            "summary": f"{len(layers)} layers factorised (rank {ranks[0]}" + (f"–{ranks[-1]}" if len(ranks) > 1 else "")
                       + f"); their parameters {before:,} → {after:,} ({1 - after / before:.1%} saved); "
                       f"worst relative Frobenius error {worst:.3g}",
            "layers": layers, "skipped": skipped, "explain": selection.explain,
            "params_saved": before - after, "worst_relative_frobenius_error": worst,
        }
        log.info("lowrank: %s", details["summary"])
        return PassRecord(self.name, changed=True, stats={"layers_factorised": len(layers),
                                                          "nodes_rewritten": len(layers)}, details=details)


def routes_experts(node: torch.fx.Node) -> str | None:
    """The expert-selection op (``topk``, ``argmax``, ``sort``...) that ``node``'s output reaches through at most
    ``_ROUTING_DEPTH`` softmax/sigmoid/cast/bias/reshape ops — i.e. ``node`` is a mixture-of-experts router —
    else None. Matched on the graph, not on module names."""
    for user in bounded_walk(node, lambda n: n.users, _ROUTING_DEPTH, lambda n: op_name(n) in _ROUTING_PASSTHROUGH):
        if op_name(user) in _EXPERT_SELECTION:
            return op_name(user)
    return None


def _rank_for_energy(energy: torch.Tensor, fraction: float) -> int:
    """Smallest r with Σ_{i<r} s_i² ≥ fraction·Σ s_i² (at least 1); fraction 1.0 keeps every value (exact)."""
    if fraction >= 1.0:
        return energy.numel()
    cumulative = torch.cumsum(energy, 0) / energy.sum().clamp_min(torch.finfo(energy.dtype).tiny)
    rank = int(torch.searchsorted(cumulative, torch.tensor(fraction, dtype=cumulative.dtype) - 1e-7)) + 1
    return max(1, min(rank, energy.numel()))
