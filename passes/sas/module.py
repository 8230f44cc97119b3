"""``SparseAttention``: the module the ``sas`` pass installs in place of each attention, and ``MaskCache``.

The module is called as ``(query, key, value, attn_mask=None, scale=None)`` with the replaced attention's
semantics and computes the pairs its ``TokenMask`` keeps. Its state changes only through methods:
``set_pattern`` (the rule of each head), ``calibrate`` / ``select`` (score tiles on dense passes, then keep
the best), ``start_warmup`` / ``finish_warmup`` (dense training passes first, then select).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from effcompile.export.registry import serializable

from .flash import FlashPlan, flash_groups_attention, flash_plan
from .importance import scored_attention, select_important_tiles, tile_scores
from .kernels import (
    BACKENDS,
    as_4d,
    build_block_mask,
    chunked_applies,
    chunked_attention,
    flex_sparse_attention,
    gather_attention,
    gather_plan,
    is_float_mask,
    reference_attention,
)
from .patterns import HeadPattern, TokenMask

STATES = ("sparse", "calibrating", "warmup")
# Attributes of SparseAttention that are not data (rebuilt after loading), with the factory of their value:
# what the safe save format needs to know (``@serializable(transient=TRANSIENT_ATTRIBUTES)``).
TRANSIENT_ATTRIBUTES: dict[str, Callable[[], Any]] = {
    "cache": lambda: MaskCache(), "importance": lambda: None, "_mask": lambda: None, "_entries": dict}


class MaskCache:
    """What kernels build from a mask (tile classes, gather plans, FlexAttention ``BlockMask``s, flash
    groups), keyed by (mask content, lengths, heads, device, kind): built once, shared by every layer with
    the same mask and by every step. Records how long each build took (milliseconds, device synchronised)."""

    def __init__(self) -> None:
        self.entries: dict[tuple, Any] = {}
        self.build_ms: dict[tuple, float] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple, build: Callable[[], Any]) -> Any:
        """The entry for ``key``, built by ``build()`` on first use."""
        entry = self.entries.get(key)
        if entry is not None:
            self.hits += 1
            return entry
        return self._build(key, build)

    @torch.compiler.disable
    def _build(self, key: tuple, build: Callable[[], Any]) -> Any:
        device = next((part for part in key if isinstance(part, str) and part.startswith("cuda")), None)
        start = time.perf_counter()
        entry = build()
        if device is not None:
            torch.cuda.synchronize(device)
        self.build_ms[key] = (time.perf_counter() - start) * 1000
        self.entries[key] = entry
        self.misses += 1
        return entry

    def __getstate__(self) -> dict[str, Any]:
        return {"entries": {}, "build_ms": {}, "hits": 0, "misses": 0}  # BlockMasks hold closures: rebuilt

    def __deepcopy__(self, memo: dict) -> MaskCache:
        return MaskCache()  # entries are derived data; a copy rebuilds what it needs (still shared by the copy)


@serializable(transient=TRANSIENT_ATTRIBUTES)
class SparseAttention(torch.nn.Module):
    """Sparse attention replacing one attention of a captured graph (see the module docstring).

    ``head_patterns`` (one shared, or one per head) with ``causal`` and ``block_size`` define the kept pairs;
    ``tile_mask`` (buffer ``[H or 1, nQ, nK]``, saved with the model) holds ``importance`` heads' tiles, and
    for other patterns the tiles their rule keeps at the compiled length (for the record).
    ``heads_in_batch`` > 0: 3-D inputs are ``[B·H, S, D]`` (the ``bmm`` form) and are viewed as 4-D.
    """

    WARMUP_DECAY = 0.95

    def __init__(self, block_size: int, causal: bool, scale: float | None, dropout_p: float = 0.0,
                 backend: str = "auto", tile_mask: torch.Tensor | None = None, *,
                 head_patterns: tuple[HeadPattern, ...] = (HeadPattern("dense", dense=True),),
                 heads_in_batch: int = 0, kernel_options: dict[str, Any] | None = None,
                 cache: MaskCache | None = None) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"sas: backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}")
        self.block_size = block_size
        self.causal = causal
        self.scale = scale
        self.dropout_p = dropout_p
        self.backend = backend
        self.heads_in_batch = heads_in_batch
        self.kernel_options = kernel_options
        self.rules: tuple[dict[str, Any], ...] = ()  # the head patterns as plain data (saved as such)
        self.chunk = 0
        self.cache = cache if cache is not None else MaskCache()
        self.register_buffer("tile_mask", tile_mask if tile_mask is not None else torch.ones(1, 1, 1, dtype=torch.bool))
        self._state = "sparse"
        self.importance: torch.Tensor | None = None  # accumulated tile scores while calibrating / warming up
        self._warmup_left = 0
        self._select_density = 1.0
        self._select_group = 1
        self._mask: TokenMask | None = None
        self._entries: dict[tuple, Any] = {}  # this module's view of the shared cache, by shape
        self.set_pattern(tuple(head_patterns))

    # --- state, changed only through these methods -------------------------------------------------------
    @property
    def state(self) -> str:
        """``sparse`` (the kept pairs only), ``calibrating`` or ``warmup`` (dense, scoring tiles)."""
        return self._state

    @property
    def warmup_left(self) -> int:
        """Training forward passes left to run dense before the tiles are selected."""
        return self._warmup_left

    def set_pattern(self, head_patterns: tuple[HeadPattern, ...], tiles: torch.Tensor | None = None) -> None:
        """Use ``head_patterns`` (one, or one per head); ``tiles`` replaces the tile buffer."""
        self.rules = tuple(dataclasses.asdict(h) for h in head_patterns)
        self.chunk = _block_chunk(tuple(head_patterns))
        if tiles is not None:
            self.tile_mask = tiles.to(self.tile_mask.device, torch.bool)
        self._mask_changed()

    def calibrate(self) -> None:
        """Run dense from now on and accumulate each tile's Σ|A|·|∂L/∂A| over backward passes."""
        self._state, self.importance = "calibrating", None

    def select(self, density: float, group: int = 1) -> torch.Tensor:
        """Keep ``density`` of the candidate tiles by the scores accumulated so far (``importance`` pattern),
        run sparse from now on, and return the tile mask. Raises RuntimeError if nothing was scored."""
        if self.importance is None:
            raise RuntimeError("sas: no tile was scored (no backward pass reached this attention); run a "
                               "backward pass while calibrating, or use a fixed pattern")
        tiles = select_important_tiles(self.importance, self.causal, density, group)
        self.set_pattern((HeadPattern("importance", tiles=True),), tiles)
        self._state, self.importance, self._warmup_left = "sparse", None, 0
        return tiles

    def start_warmup(self, passes: int, density: float, group: int = 1) -> None:
        """Run dense for the next ``passes`` training forward passes (those with gradients), scoring tiles
        with a moving average (decay ``WARMUP_DECAY`` per pass); the pass after selects ``density``."""
        self._state, self._warmup_left, self.importance = "warmup", passes, None
        self._select_density, self._select_group = density, group

    def finish_warmup(self) -> None:
        """Select the tiles from the scores so far and run sparse (the current tiles stay if nothing was scored)."""
        if self.importance is not None:
            self.select(self._select_density, self._select_group)
        self._state, self.importance, self._warmup_left = "sparse", None, 0

    # --- the mask -----------------------------------------------------------------------------------------
    @property
    def mask(self) -> TokenMask:
        """The token mask (rebuilt after ``set_pattern``, ``select`` or loading a state dict)."""
        if self._mask is None:
            tiles = self.tile_mask if any(h.tiles for h in self.head_patterns) else None
            self._mask = TokenMask(self.head_patterns, self.causal, self.block_size, tiles)
        return self._mask

    def _mask_changed(self) -> None:
        self._mask = None
        self._entries = {}

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._mask_changed()  # the tile buffer may hold other tiles now

    @property
    def head_patterns(self) -> tuple[HeadPattern, ...]:
        """The rule of each head (one shared by all heads, or one per head)."""
        return tuple(HeadPattern(**rule) for rule in self.rules)

    def _entry(self, kind: str, query: torch.Tensor, key: torch.Tensor, build: Callable[[], Any]) -> Any:
        """What ``kind`` needs at this shape: a plain dict lookup after the first call (cheap under
        torch.compile); the first call checks the shape and takes it from, or builds it into, the shared cache."""
        local_key = (kind, query.shape[2], key.shape[2], query.shape[1], key.shape[1], str(query.device))
        entry = self._entries.get(local_key)
        if entry is None:
            entry = self._first_use(local_key, build)
        return entry

    @torch.compiler.disable
    def _first_use(self, local_key: tuple, build: Callable[[], Any]) -> Any:
        _, query_len, key_len, heads = local_key[:4]
        self.mask.check_heads(heads)
        self.mask.check_length(query_len, key_len)
        entry = self.cache.get((*local_key, self.mask.key), build)
        self._entries[local_key] = entry
        return entry

    def tile_classes(self, query_len: int, key_len: int) -> Any:
        """The mask's tile classes at these lengths (cached)."""
        key = ("classes", self.mask.key, query_len, key_len)
        return self.cache.get(key, functools.partial(self.mask.tile_classes, query_len, key_len))

    def resolve_backend(self, query: torch.Tensor, key: torch.Tensor | None = None,
                        attn_mask: torch.Tensor | None = None) -> str:
        """The kernel this call uses: the configured one; for ``auto``, ``chunked`` for the ``block`` pattern
        without a user mask, else ``flex`` on CUDA without dropout and with tiles of a multiple of 128 tokens
        (compiled FlexAttention's training kernels refuse smaller tiles on Hopper), else ``gather``."""
        if self.backend != "auto":
            return self.backend
        key_len = query.shape[-2] if key is None else key.shape[-2]
        if self.chunk and attn_mask is None and chunked_applies(query.shape[-2], key_len, self.chunk, self.causal) is None:
            return "chunked"
        flex_ok = query.is_cuda and self.dropout_p == 0 and self.block_size % 128 == 0
        return "flex" if flex_ok else "gather"

    # --- forward --------------------------------------------------------------------------------------------
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_mask: torch.Tensor | None = None, scale: float | torch.Tensor | None = None) -> torch.Tensor:
        """Attention output ``[B, H, Sq, Dv]`` (or the inputs' 3-D layout)."""
        if scale is None:
            scale = self.scale if self.scale is not None else 1.0 / math.sqrt(query.shape[-1])
        folded = self.heads_in_batch and query.dim() == 3
        if folded:
            query, key, value = (t.reshape(-1, self.heads_in_batch, *t.shape[1:]) for t in (query, key, value))
            if attn_mask is not None and attn_mask.dim() == 3:
                attn_mask = attn_mask.reshape(-1, self.heads_in_batch, *attn_mask.shape[1:])
        output = self._attend(query, key, value, attn_mask, scale)
        return output.reshape(-1, *output.shape[2:]) if folded else output

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
                scale: float | torch.Tensor) -> torch.Tensor:
        if self._state == "calibrating":
            return self._dense(query, key, value, attn_mask, scale, record=True)
        if self._state == "warmup":
            if not torch.is_grad_enabled():
                return self._dense(query, key, value, attn_mask, scale, record=False)
            if self._warmup_left > 0:
                self._warmup_left -= 1
                return self._dense(query, key, value, attn_mask, scale, record=True)
            self.finish_warmup()
        query4, key4, value4, mask4, squeezed = as_4d(query, key, value, attn_mask)
        backend = self.resolve_backend(query4, key4, mask4)
        if backend == "chunked":
            reason = self._chunked_reason(query4, key4, mask4)
            if reason:
                raise RuntimeError(f"sas: backend=chunked cannot run this attention: {reason}")
            output = chunked_attention(query4, key4, value4, self.chunk, self.causal, scale, self.dropout_p)
        elif backend == "flex":
            output = self._flex(query4, key4, value4, mask4, scale)
        elif backend == "flash":
            output = self._flash(query4, key4, value4, mask4, scale)
        elif backend == "gather":
            plan = self._entry("gather", query4, key4, lambda: gather_plan(
                self.mask, self.tile_classes(query4.shape[2], key4.shape[2]), query4.shape[1], query4.shape[2],
                key4.shape[2], query4.device))
            output = gather_attention(query4, key4, value4, plan, self.block_size, scale, mask4, self.dropout_p)
        else:
            self._entry("reference", query4, key4, lambda: True)  # checks the shape once
            output = reference_attention(query4, key4, value4, self.mask, scale, mask4, self.dropout_p)
        return output.squeeze(1) if squeezed else output

    def _chunked_reason(self, query: torch.Tensor, key: torch.Tensor, attn_mask: torch.Tensor | None) -> str | None:
        if not self.chunk:
            return "the mask is not the block pattern on every head"
        if attn_mask is not None:
            return "a user attn_mask is given"
        return chunked_applies(query.shape[2], key.shape[2], self.chunk, self.causal)

    def _flash(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
               scale: float | torch.Tensor) -> torch.Tensor:
        if attn_mask is not None:
            raise RuntimeError("sas: backend=flash cannot apply a user attn_mask; use backend=flex or gather")
        plan = self._entry("flash", query, key, lambda: flash_plan(
            self.tile_classes(query.shape[2], key.shape[2]), query.shape[1], key.shape[1], self.causal,
            query.shape[2], key.shape[2], self.block_size, query.device))
        if not isinstance(plan, FlashPlan):
            raise RuntimeError(f"sas: backend=flash cannot run this mask exactly: {plan}")
        return flash_groups_attention(query, key, value, plan, self.block_size, scale, self.dropout_p)

    def _flex(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
              scale: float | torch.Tensor) -> torch.Tensor:
        if query.is_cuda and self.block_size % 128:
            raise RuntimeError(f"sas: backend=flex cannot run {self.block_size}-token tiles on CUDA (compiled "
                               "FlexAttention needs multiples of 128); recompile with --set sas.block_size=128 "
                               "or --set sas.backend=auto")
        heads, query_len, key_len = query.shape[1], query.shape[2], key.shape[2]
        score_mod = user_mask_mod = None
        if attn_mask is not None:
            full_mask = attn_mask.expand(query.shape[0], heads, query_len, key_len)
            if is_float_mask(attn_mask):
                additive = full_mask.to(query.dtype)

                def score_mod(score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
                    return score + additive[b, h, q_idx, kv_idx]
            else:
                def user_mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
                    return full_mask[b, h, q_idx, kv_idx]

        def build() -> Any:
            return build_block_mask(self.mask, self.tile_classes(query_len, key_len), heads, query_len, key_len,
                                    query.device, user_mask_mod)
        block_mask = self._entry("flex", query, key, build) if user_mask_mod is None else build()
        options = self.kernel_options
        if options is None and attn_mask is None and query.is_cuda and query_len == key_len:
            options = {"ROWS_GUARANTEED_SAFE": True}  # every rule keeps a query's own pair in self-attention
        return flex_sparse_attention(query, key, value, block_mask, float(scale), score_mod, options)

    def _dense(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
               scale: float | torch.Tensor, record: bool) -> torch.Tensor:
        """Dense attention with this module's causality; with ``record`` (and gradients) the backward adds each
        tile's Σ_batch |A|·|∂L/∂A| to ``importance``."""
        query4, key4, value4, mask4, squeezed = as_4d(query, key, value, attn_mask)
        heads, kv_heads = query4.shape[1], key4.shape[1]
        if kv_heads != heads:
            key4 = key4.repeat_interleave(heads // kv_heads, dim=1)
            value4 = value4.repeat_interleave(heads // kv_heads, dim=1)
        scored = record and torch.is_grad_enabled() and any(t.requires_grad for t in (query4, key4, value4))
        if self.dropout_p > 0 and scored:
            output = self._dense_materialised(query4, key4, value4, mask4, scale)
        elif scored:
            value4 = value4.to(query4.dtype)
            output = scored_attention(query4, key4.to(query4.dtype), value4, mask4, float(scale), self.causal,
                                      self.block_size, self._accumulate)
        else:
            attn = mask4 if not (self.causal and mask4 is not None) else _causal_mask(mask4, query4, key4)
            output = F.scaled_dot_product_attention(query4, key4, value4, attn_mask=attn, dropout_p=self.dropout_p,
                                                    is_causal=self.causal and mask4 is None, scale=float(scale))
        return output.squeeze(1) if squeezed else output

    def _dense_materialised(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attn_mask: torch.Tensor | None, scale: float | torch.Tensor) -> torch.Tensor:
        scores = torch.matmul(query, key.transpose(-1, -2)) * scale
        if self.causal:
            tril = torch.ones(scores.shape[-2], scores.shape[-1], dtype=torch.bool, device=scores.device).tril()
            scores = scores.masked_fill(~tril, -math.inf)
        if attn_mask is not None:
            scores = scores + attn_mask.to(scores.dtype) if is_float_mask(attn_mask) else \
                scores.masked_fill(~attn_mask, -math.inf)
        probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
        probs.register_hook(lambda grad: self._accumulate(tile_scores(probs.detach(), grad, self.block_size)) or grad)
        probs = F.dropout(probs, self.dropout_p, training=True)
        return torch.matmul(probs.to(value.dtype), value)

    def _accumulate(self, tiles: torch.Tensor) -> None:
        if self.importance is None:
            self.importance = tiles
        elif self._state == "warmup":
            self.importance = self.importance.to(tiles.device) * self.WARMUP_DECAY + tiles
        else:
            self.importance = self.importance.to(tiles.device) + tiles

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_mask"], state["_entries"] = None, {}
        return state

    def extra_repr(self) -> str:
        heads, rows, cols = self.tile_mask.shape
        names = ",".join(sorted({h.name for h in self.head_patterns}))
        return (f"pattern={names}, block_size={self.block_size}, causal={self.causal}, backend={self.backend}, "
                f"tiles={heads}x{rows}x{cols}, state={self._state}")


def _block_chunk(head_patterns: tuple[HeadPattern, ...]) -> int:
    """Tokens per block when every head runs the plain ``block`` pattern (the chunked kernel), else 0."""
    blocks = {h.block for h in head_patterns}
    simple = all(h.block and not (h.window or h.stride or h.n_global or h.dense or h.tiles) for h in head_patterns)
    return blocks.pop() if simple and len(blocks) == 1 else 0


def _causal_mask(attn_mask: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    visible = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
    return attn_mask & visible if attn_mask.dtype == torch.bool else attn_mask.masked_fill(~visible, -math.inf)
