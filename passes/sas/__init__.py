"""``sas``: structured attention sparsification — token-exact sparse patterns computed tile by tile.

1. Match every attention (``rewrite/patterns/attention.py``: SDPA, the explicit matmul-softmax-matmul form including
   the ``bmm`` form with heads folded into the batch, ``nn.MultiheadAttention`` calls); the record lists each
   candidate that did not match and why.
2. Plan each (``rewrite.plan_site``: scale, masks, dropout, causality, GQA) and observe it once on the example
   inputs (lengths, heads, what its mask is). Cross-attention (query and key from different sources or of
   different lengths) stays dense unless ``cross=true``.
3. Build each attention's token mask (``patterns.py``) and check it: a pattern that leaves a query with no
   key is an error; one that keeps every pair leaves the attention as it is (``changed=False`` when all do).
4. Replace the attention with a ``SparseAttention`` module at ``<attention path>.sas``; downstream ``view``s
   of its output become ``reshape``s. ``importance``: ``calib_steps`` dense forward/backward passes score
   tiles by Σ|A|·|∂L/∂A|, then each module keeps ``density`` of them (``warmup``: dense training passes
   first).
5. Run the sparse model twice on the example inputs: the first run builds each mask's kernel data once per
   (mask, shape, device) — shared by layers and steps — and the second times the attention; the record
   has token and tile densities, kernels, mask-building and attention times. The plan is a ``SasPlan``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from effcompile.errors import OptionError, PassError
from effcompile.graph import depends_on_input_data, finalize, module_path
from effcompile.pass_manager import Pass, PassRecord, register
from effcompile.patterns import find_linears, match_attention
from effcompile.program import Program

from .kernels import BACKENDS
from .module import MaskCache, SparseAttention
from .patterns import HEAD_PATTERNS, PATTERNS, HeadPattern, TokenMask, head_pattern, head_patterns
from .plan import SasPlan, SasSite
from .rewrite import (
    Observation,
    SitePlan,
    cross_reason,
    install,
    observe,
    plan_site,
    reshape_downstream_views,
)

log = logging.getLogger(__name__)


@dataclass
class _Accepted:
    plan: SitePlan
    observation: Observation
    causal: bool
    heads: tuple[HeadPattern, ...]
    cross: str | None


def _rank(node: object) -> int | None:
    """The number of dimensions of the tensor a graph node computes, when the graph records it."""
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return value.dim() if isinstance(value, torch.Tensor) else None


@register
class StructuredAttentionSparsity(Pass):
    """Make attention sparse with token-exact per-head patterns (fixed or importance-learned) computed by tiles."""

    name = "sas"
    summary = "sparse attention: token-exact local/block/strided/global/mixed or learned tile masks, tile kernels"
    exact = False

    @dataclass(frozen=True)
    class Config:
        pattern: Literal["local", "block", "strided", "global", "mixed", "importance", "dense"] = field(
            default="local", metadata={"help": "per head: local window, block, strided, global+local, mixed "
                                               "(per-head list), importance (learned tiles), dense (rewrite check)"})
        density: float = field(default=0.25, metadata={
            "help": "importance: fraction of the candidate (causal) tiles kept per head, diagonal included"})
        block_size: int = field(default=128, metadata={"help": "tile size in tokens: the unit the kernels compute "
                                                                "(and importance selects)"})
        window: int = field(default=512, metadata={"help": "local/global: keys within this many tokens (causal: "
                                                           "the last `window` keys, the query's own included)"})
        block: int = field(default=512, metadata={"help": "block: tokens per block"})
        stride: int = field(default=512, metadata={"help": "strided: keys at a distance that is a multiple of this"})
        n_global: int = field(default=128, metadata={"help": "global: leading tokens that attend/are attended everywhere"})
        heads: tuple[str, ...] = field(default=(), metadata={
            "help": "mixed: comma-separated per-head patterns, cycled (default: half local, half strided)"})
        cross: bool = field(default=False, metadata={
            "help": "also sparsify cross-attention (query and key from different sources); off: left dense"})
        group: int = field(default=1, metadata={
            "help": "importance: query blocks that share one set of earlier key blocks (>1: the flash kernel's "
                    "groups)"})
        calib_steps: int = field(default=2, metadata={"help": "importance: forward/backward passes to score tiles"})
        warmup: int = field(default=0, metadata={
            "help": "importance: run dense for the first N training forward passes (micro-batches), scoring tiles "
                    "on the training data, then re-select the tiles from those scores (0: keep the tiles scored "
                    "at compile time on the example inputs)"})
        backend: Literal["auto", "flex", "gather", "chunked", "flash", "reference"] = field(default="auto", metadata={
            "help": "kernel: auto (chunked for block, flex on CUDA, gather elsewhere), flex, gather, chunked, "
                    "flash (dense flash over gathered tiles), reference (masked SDPA)"})

        def __post_init__(self) -> None:
            if self.pattern not in PATTERNS:
                raise OptionError(f"sas: pattern {self.pattern!r} is unknown; use one of {', '.join(PATTERNS)}")
            if self.backend not in BACKENDS:
                raise OptionError(f"sas: backend {self.backend!r} is unknown; use one of {', '.join(BACKENDS)}")
            if self.block_size < 1:
                raise OptionError(f"sas: block_size {self.block_size} must be a positive number of tokens; "
                                  "set e.g. --set sas.block_size=128")
            if not 0 < self.density <= 1:
                raise OptionError(f"sas: density {self.density} must be in (0, 1]; set e.g. --set sas.density=0.25")
            for option in ("window", "block", "stride", "group"):
                if getattr(self, option) < 1:
                    raise OptionError(f"sas: {option} {getattr(self, option)} must be at least 1")
            if self.n_global < 0:
                raise OptionError(f"sas: n_global {self.n_global} must be ≥ 0")
            if self.calib_steps < 1:
                raise OptionError(f"sas: calib_steps {self.calib_steps} must be ≥ 1")
            if self.warmup < 0:
                raise OptionError(f"sas: warmup {self.warmup} must be ≥ 0 forward passes")
            if self.warmup and self.pattern != "importance":
                raise OptionError("sas: warmup re-scores the importance pattern; set --set sas.pattern=importance "
                                  "or drop sas.warmup")
            if self.group > 1 and self.pattern != "importance":
                raise OptionError("sas: group selects importance tiles; set --set sas.pattern=importance or drop "
                                  "sas.group")
            bad = [h for h in self.heads if h not in HEAD_PATTERNS]
            if bad:
                raise OptionError(f"sas: heads lists unknown pattern {bad[0]!r}; use {', '.join(HEAD_PATTERNS)}")
            if self.heads and self.pattern != "mixed":
                raise OptionError("sas: heads is only used with pattern=mixed; set --set sas.pattern=mixed")
            if self.backend == "chunked" and self.pattern != "block":
                raise OptionError("sas: backend=chunked computes the block pattern only; set --set sas.pattern=block "
                                  "or another backend")

    def call(self, program: Program, config: Config) -> PassRecord:
        gm = program.gm
        sites, misses = match_attention(gm)
        unmatched = [{"node": m.node.name, "path": module_path(m.node), "reason": m.reason} for m in misses if m.node]
        if not sites:
            existing = sum(isinstance(m, SparseAttention) for m in gm.modules())
            reason = (f"attention is already sparse ({existing} sas modules)" if existing else
                      "no attention found (no scaled_dot_product_attention, matmul-softmax-matmul or "
                      "nn.MultiheadAttention)" + (f"; {len(misses)} candidates did not match, e.g. {misses[0].reason}"
                                                  if misses else ""))
            return PassRecord(self.name, changed=False, reason=reason, details={"unmatched": unmatched})
        plans: list[SitePlan] = []
        skipped: list[dict[str, str]] = []
        for site in sites:
            rank = _rank(site.query)
            if rank is not None and rank > 4:  # Hiera's windowed attention: [batch, heads, windows, length, dim]
                # (rank 3 is heads folded into the batch, DeBERTa's bmm form, which sas handles)
                skipped.append({"path": site.path, "reason": f"its query has {rank} dimensions, not [batch, heads, "
                                                             "length, head_dim]: left dense"})
                continue
            plan = plan_site(site)
            if isinstance(plan, str):
                skipped.append({"path": site.path, "reason": plan})
            else:
                plans.append(plan)
        try:
            observations = observe(gm, program.flat_inputs(), plans) if plans else []
        except RuntimeError as error:
            raise PassError(f"sas: {error}; give example inputs that reach every attention") from error
        accepted = self._accept(gm, plans, observations, config, skipped)
        if not accepted:
            reason = f"no attention rewritten: {skipped[0]['reason']}" if skipped else "no attention rewritten"
            return PassRecord(self.name, changed=False, reason=reason,
                              details={"skipped": skipped, "unmatched": unmatched})
        self._check_backend(gm, config)
        sas_plan = SasPlan(skipped=skipped, unmatched=unmatched, pattern=config.pattern, block_size=config.block_size)
        modules = self._install_all(program, accepted, config, sas_plan)
        if config.pattern == "importance":
            self._calibrate(program, [m for _, m in modules], config)
        for site, module in modules:
            self._finish_site(site, module, config)
        self._measure(program, modules)
        program.set_plan(sas_plan)
        return self._record(sas_plan, len(sites), config)

    def _accept(self, gm: torch.fx.GraphModule, plans: list[SitePlan], observations: list[Observation],
                config: Config, skipped: list[dict[str, str]]) -> list[_Accepted]:
        """The attentions to rewrite: self-attention (or cross with ``cross``) whose mask drops some pair."""
        linears = {site.node: site for site in find_linears(gm)}
        accepted = []
        for plan, observation in zip(plans, observations):
            cross = cross_reason(plan, observation, linears)
            if cross and not config.cross:
                skipped.append({"path": plan.site.path, "reason": f"cross-attention ({cross}): left dense; set "
                                "--set sas.cross=true to sparsify it"})
                continue
            causal = plan.causal or bool(observation.mask and observation.mask["within_causal"])
            names = head_patterns(observation.heads, config.pattern, config.heads)
            unique = list(dict.fromkeys(names))
            heads = tuple(head_pattern(n, window=config.window, block=config.block, stride=config.stride,
                                       n_global=config.n_global) for n in (unique if len(unique) == 1 else names))
            keeps_all = self._keeps_every_pair(heads, causal, observation, config, plan.site.path or plan.site.node.name)
            if keeps_all:
                skipped.append({"path": plan.site.path, "reason": keeps_all})
                continue
            accepted.append(_Accepted(plan, observation, causal, heads, cross))
        return accepted

    def _keeps_every_pair(self, heads: tuple[HeadPattern, ...], causal: bool, observation: Observation,
                          config: Config, path: str) -> str | None:
        """Why the pattern leaves this attention as it is (it keeps every pair), or None. Raises PassError when
        the pattern leaves some query with no key."""
        query_len, key_len = observation.query_len, observation.key_len
        if config.pattern == "importance":
            return "pattern=importance with density 1 keeps every tile (attention unchanged)" \
                if config.density >= 1 else None
        if config.pattern == "dense":
            return None  # a check of the rewrite itself: always rewritten
        stats = TokenMask(heads, causal, config.block_size).stats(query_len, key_len)
        if stats.empty_queries:
            raise PassError(f"sas: pattern {config.pattern} leaves {stats.empty_queries} (head, query) pairs of "
                            f"{path} ({query_len}×{key_len} tokens) with no key to attend; widen sas.window or use "
                            "another pattern")
        if stats.kept_pairs == stats.candidate_pairs:
            return (f"pattern {config.pattern} keeps every token pair at {query_len}×{key_len} tokens "
                    f"(window {config.window}, block {config.block}): attention unchanged")
        return None

    def _check_backend(self, gm: torch.fx.GraphModule, config: Config) -> None:
        device = next((p.device for p in gm.parameters()), torch.device("cpu"))
        if config.backend == "flex" and device.type == "cuda" and config.block_size % 128:
            raise PassError(f"sas: backend=flex cannot run {config.block_size}-token tiles on CUDA (compiled "
                            "FlexAttention needs multiples of 128); set --set sas.block_size=128 or backend=auto")

    def _install_all(self, program: Program, accepted: list[_Accepted], config: Config,
                     sas_plan: SasPlan) -> list[tuple[SasSite, SparseAttention]]:
        gm = program.gm
        exported = any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes)
        device = next((p.device for p in gm.parameters()), None)
        cache = MaskCache()  # shared by every layer with the same mask
        installed = []
        for item in accepted:
            plan, observation = item.plan, item.observation
            if plan.dropout_p > 0 and config.backend in ("flex", "flash"):
                raise PassError(f"sas: {plan.site.path} uses dropout {plan.dropout_p}, which backend={config.backend} "
                                "cannot apply; use --set sas.backend=auto or gather")
            module = SparseAttention(config.block_size, item.causal, plan.scale, plan.dropout_p, config.backend,
                                     head_patterns=item.heads, heads_in_batch=plan.site.heads_in_batch, cache=cache)
            if device is not None:
                module.to(device)
            target, node = install(gm, plan, module, exported)
            mask_handling = self._mask_handling(node, observation, plan)
            views = reshape_downstream_views(gm.graph, node)
            site = SasSite(target, plan.site.path, plan.site.kind, observation.heads, observation.kv_heads,
                           observation.query_len, observation.key_len, item.causal,
                           tuple(h.name for h in item.heads), mask_handling, 0.0, 0.0, 0, 0, views_reshaped=views)
            if item.cross:
                site.mask += f"; cross-attention ({item.cross}), sparsified as sas.cross=true asks"
            installed.append((site, module))
            sas_plan.sites.append(site)
        finalize(gm)
        return installed

    def _mask_handling(self, node: torch.fx.Node, observation: Observation, plan: SitePlan) -> str:
        info = observation.mask
        if info is None:
            return "none"
        data_dependent = any(depends_on_input_data(n) for n in plan.mask_nodes)
        if info["exactly_causal"] and not data_dependent:
            node.update_kwarg("attn_mask", None)
            return "causal mask replaced by causal tiles"
        return f"{info['kind']} mask applied within kept tiles"

    def _calibrate(self, program: Program, modules: list[SparseAttention], config: Config) -> None:
        for module in modules:
            module.calibrate()
        with torch.random.fork_rng(devices=[]):
            for _ in range(config.calib_steps):
                objective = program.objective(program.run())
                if not objective.requires_grad:
                    raise PassError("sas: pattern=importance needs a differentiable loss, but the objective "
                                    "has no gradient; unfreeze parameters or use a fixed pattern")
                objective.backward()
        for parameter in program.gm.parameters():
            parameter.grad = None
        for module in modules:
            if module.importance is None:
                raise PassError("sas: no gradient reached an attention during calibration; "
                                "use a fixed pattern such as --set sas.pattern=local")
            module.select(config.density, config.group)
            if config.warmup:
                module.start_warmup(config.warmup, config.density, config.group)

    def _finish_site(self, site: SasSite, module: SparseAttention, config: Config) -> None:
        """Densities at the compiled lengths, and the tile buffer of fixed patterns (for the record)."""
        mask = module.mask
        stats = mask.stats(site.query_len, site.key_len)
        classes = mask.tile_classes(site.query_len, site.key_len)
        if config.pattern != "importance":
            module.set_pattern(module.head_patterns, classes.kept)
        site.token_density = round(stats.token_density, 4)
        site.tile_density = round(stats.tile_density, 4)
        site.kept_tiles, site.partial_tiles = stats.kept_tiles, stats.partial_tiles

    def _measure(self, program: Program, modules: list[tuple[SasSite, SparseAttention]]) -> None:
        """Run twice (no gradients): the first run builds the masks' kernel data (timed by the cache), the
        second times each attention."""
        if any(module.state != "sparse" for _, module in modules):
            return  # warming up: the masks are built after the warm-up
        first_builder: dict[tuple, str] = {}
        handles = []
        for site, module in modules:
            handles.append(module.register_forward_pre_hook(_before(site, module), with_kwargs=True))
            handles.append(module.register_forward_hook(_after_first(site, module, first_builder)))
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                try:
                    program.run()
                except RuntimeError as error:
                    if not str(error).startswith("sas:"):
                        raise
                    raise PassError(str(error)) from error
                for handle in handles:
                    handle.remove()
                handles, started = [], {}
                for site, module in modules:
                    handles.append(module.register_forward_pre_hook(_start_timer(site, started)))
                    handles.append(module.register_forward_hook(_stop_timer(site, started)))
                program.run()
        finally:
            for handle in handles:
                handle.remove()

    def _record(self, sas_plan: SasPlan, candidates: int, config: Config) -> PassRecord:
        sites = sas_plan.sites
        token = sum(s.token_density for s in sites) / len(sites)
        tile = sum(s.tile_density for s in sites) / len(sites)
        build_ms = sum(s.mask_build_ms or 0.0 for s in sites)
        attention_ms = sum(s.attention_ms or 0.0 for s in sites)
        summary = (f"{len(sites)} attention{'s' if len(sites) > 1 else ''} → sparse {config.pattern}: "
                   f"{token:.1%} of token pairs, {tile:.1%} of tiles computed (tile {config.block_size})")
        two_sided = [s for s in sites if not s.causal and {"local", "global"} & set(s.patterns)]
        if two_sided:
            summary += f"; {len(two_sided)} non-causal (encoder) attentions: the window is two-sided"
        if sas_plan.skipped:
            summary += f"; {len(sas_plan.skipped)} left dense ({sas_plan.skipped[0]['reason']})"
        if build_ms:
            summary += f"; masks built in {build_ms:.1f} ms once, attention {attention_ms:.1f} ms per forward"
        stats = {"attention_sites": candidates, "rewritten": len(sites), "skipped": len(sas_plan.skipped),
                 "unmatched": len(sas_plan.unmatched), "density": round(tile, 4), "token_density": round(token, 4),
                 "tile_density": round(tile, 4), "mask_build_ms": round(build_ms, 3),
                 "attention_ms": round(attention_ms, 3)}
        details = {"summary": summary, "sites": [vars(s) for s in sites], "skipped": sas_plan.skipped,
                   "unmatched": sas_plan.unmatched}
        return PassRecord(self.name, changed=True, stats=stats, details=details)


def _sync(module: torch.nn.Module) -> None:
    buffer = module.get_buffer("tile_mask")
    if buffer.is_cuda:
        torch.cuda.synchronize(buffer.device)


def _before(site: SasSite, module: SparseAttention) -> Any:
    def hook(_: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        site.backend = module.resolve_backend(args[0], args[1], kwargs.get("attn_mask"))
    return hook


def _after_first(site: SasSite, module: SparseAttention, first_builder: dict[tuple, str]) -> Any:
    def hook(_: torch.nn.Module, args: tuple, output: Any) -> None:
        built = {k: v for k, v in module.cache.build_ms.items() if k not in first_builder}
        for key in built:
            first_builder[key] = site.target
        site.mask_build_ms = round(sum(built.values()), 3) if built else None
        if not built:
            mine = [k for k in first_builder if k[0] != "classes" and k[-1] == module.mask.key]
            site.mask_shared_with = first_builder[mine[0]] if mine else None
    return hook


def _start_timer(site: SasSite, started: dict[str, float]) -> Any:
    def hook(module: torch.nn.Module, args: tuple) -> None:
        _sync(module)
        started[site.target] = time.perf_counter()
    return hook


def _stop_timer(site: SasSite, started: dict[str, float]) -> Any:
    def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
        _sync(module)
        site.attention_ms = round((time.perf_counter() - started[site.target]) * 1000, 3)
    return hook


__all__ = ["StructuredAttentionSparsity", "SparseAttention", "SasPlan", "SasSite", "TokenMask"]
