"""Token-level attention patterns for the ``sas`` pass, and the tiles that cover them.

A pattern says which (query, key) token pairs of each head are attended; tiles of ``block_size`` tokens
(query block × key block) are only the unit the kernels compute. Sizes are in tokens, never rounded to
tiles: a tile holding some attended pairs is *partial* and the kernels mask it element by element;
a tile whose every pair is attended is *full* and is computed unmasked. Causal attention is top-left
aligned (``scaled_dot_product_attention(is_causal=True)``: key ``k`` is visible to query ``q`` iff
``k <= q``); a head keeps a pair iff causality allows it and one of its rules does:

  1. ``local`` (window ``W``): ``|q - k| < W``. Causal: the ``W`` most recent keys, the query's own
     included (Mistral's sliding window). Non-causal (encoders): two-sided, ``W - 1`` keys either side.
  2. ``block`` (``B``): ``q // B == k // B`` (each query sees its own block of ``B`` tokens).
  3. ``strided`` (``S``): ``(q - k) % S == 0`` (Sparse Transformer's strided head: every ``S``-th key,
     the query's own included). Sparse at the token level but not at the tile level unless ``S`` is
     large: the record's tile density says what the kernels compute.
  4. ``global`` (``G`` tokens + window ``W``): ``q < G or k < G`` or the local window (Longformer/BigBird).
  5. ``dense``: every pair.
  6. ``tiles`` (``importance``): the pairs of the head's kept tiles (tile-exact by definition).
``mixed`` gives each head its own rule (``head_patterns``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

PATTERNS = ("local", "block", "strided", "global", "mixed", "importance", "dense")
HEAD_PATTERNS = ("local", "block", "strided", "global", "dense")
# Pairs evaluated per batch when counting the pairs of partial tiles (bounded memory at long lengths).
_PAIRS_PER_BATCH = 1 << 24


@dataclass(frozen=True)
class HeadPattern:
    """One head's rule: the union of the parts that are set (0 / False: unused).

    ``window``: ``|q - k| < window``; ``block``: same block of ``block`` tokens; ``stride``: ``(q - k)``
    a multiple of ``stride``; ``n_global``: ``q < n_global or k < n_global``; ``dense``: every pair;
    ``tiles``: the pairs of the head's kept tiles (the mask's tile tensor)."""

    name: str
    window: int = 0
    block: int = 0
    stride: int = 0
    n_global: int = 0
    dense: bool = False
    tiles: bool = False


def head_pattern(name: str, *, window: int = 0, block: int = 0, stride: int = 0, n_global: int = 0) -> HeadPattern:
    """The ``HeadPattern`` of a named pattern (``local``, ``block``, ``strided``, ``global``, ``dense``,
    ``importance``) with its sizes in tokens. Raises ValueError for an unknown name or a size < 1."""
    for option, value in (("window", window), ("block", block), ("stride", stride)):
        if value < 0 or (value == 0 and {"local": "window", "global": "window", "block": "block",
                                         "strided": "stride"}.get(name) == option):
            raise ValueError(f"pattern {name} needs {option} ≥ 1 token, got {value}")
    if name == "local":
        return HeadPattern(name, window=window)
    if name == "block":
        return HeadPattern(name, block=block)
    if name == "strided":
        return HeadPattern(name, stride=stride)
    if name == "global":
        return HeadPattern(name, window=window, n_global=n_global)
    if name == "dense":
        return HeadPattern(name, dense=True)
    if name == "importance":
        return HeadPattern(name, tiles=True)
    raise ValueError(f"unknown pattern {name!r}; use one of {', '.join(PATTERNS)}")


def head_patterns(heads: int, pattern: str, per_head: tuple[str, ...]) -> list[str]:
    """The pattern name of each of ``heads`` heads: ``pattern`` for all, or for ``mixed`` the list
    ``per_head`` cycled (default: the first half ``local``, the second half ``strided``)."""
    if pattern != "mixed":
        return [pattern] * heads
    if per_head:
        return [per_head[h % len(per_head)] for h in range(heads)]
    return ["local" if h < (heads + 1) // 2 else "strided" for h in range(heads)]


@dataclass(frozen=True)
class TileClasses:
    """The tiles of one (query length, key length): ``kept`` holds at least one attended pair, ``full``
    every pair (no element mask needed, causality included), ``causal_full`` every causal pair (only the
    causal mask needed). Bool ``[heads or 1, query_blocks, key_blocks]`` on the CPU."""

    kept: torch.Tensor
    full: torch.Tensor
    causal_full: torch.Tensor


@dataclass(frozen=True)
class MaskStats:
    """Token-level and tile-level counts of one mask at one shape (summed over heads)."""

    kept_pairs: int
    candidate_pairs: int
    kept_tiles: int
    candidate_tiles: int
    partial_tiles: int
    empty_queries: int  # queries (over heads) that attend no key: such a mask is refused

    @property
    def token_density(self) -> float:
        """Attended pairs over the pairs the attention could attend (causal: k ≤ q)."""
        return self.kept_pairs / max(self.candidate_pairs, 1)

    @property
    def tile_density(self) -> float:
        """Computed tiles over the tiles dense (causal) attention computes."""
        return self.kept_tiles / max(self.candidate_tiles, 1)


class TokenMask:
    """The attended (query, key) pairs of every head: per-head ``HeadPattern``s (one shared by all heads,
    or one per head), causality, the tile size, and for ``tiles`` heads their kept tiles
    (bool ``[heads or 1, query_blocks, key_blocks]``, covering the longest sequence the model runs at).

    ``key`` identifies the mask by content, so layers with the same mask share what is built from it."""

    def __init__(self, heads: tuple[HeadPattern, ...], causal: bool, block_size: int,
                 tiles: torch.Tensor | None = None) -> None:
        if not heads:
            raise ValueError("a TokenMask needs at least one head pattern")
        if any(h.tiles for h in heads) and tiles is None:
            raise ValueError("an importance (tiles) head needs its tile tensor")
        if tiles is not None and tiles.shape[0] not in (1, len(heads)) and len(heads) != 1:
            raise ValueError(f"{tiles.shape[0]} tile heads for {len(heads)} head patterns")
        self.heads = tuple(heads)
        self.causal = causal
        self.block_size = block_size
        self.tiles = None if tiles is None else tiles.detach().to("cpu", torch.bool).contiguous()
        digest = "" if self.tiles is None else hashlib.sha1(
            self.tiles.numpy().tobytes() + str(tuple(self.tiles.shape)).encode()).hexdigest()
        self.key = (self.heads, causal, block_size, digest)
        self._device_tiles: dict[str, torch.Tensor] = {}

    @property
    def pattern_heads(self) -> int:
        """How many head slices the mask has (1: shared by every head)."""
        return max(len(self.heads), 1 if self.tiles is None else self.tiles.shape[0])

    def head(self, index: int) -> HeadPattern:
        """The pattern of head slice ``index``."""
        return self.heads[index if len(self.heads) > 1 else 0]

    def check_heads(self, heads: int) -> None:
        """Raise RuntimeError unless the mask applies to an attention of ``heads`` heads."""
        if self.pattern_heads not in (1, heads):
            raise RuntimeError(f"sas: the mask has {self.pattern_heads} head patterns, the attention {heads} heads")

    def check_length(self, query_len: int, key_len: int) -> None:
        """Raise RuntimeError when ``tiles`` heads do not cover the lengths (other rules hold at any length)."""
        if self.tiles is None:
            return
        query_blocks, key_blocks = _blocks(query_len, self.block_size), _blocks(key_len, self.block_size)
        if query_blocks > self.tiles.shape[1] or key_blocks > self.tiles.shape[2]:
            raise RuntimeError(
                f"sas: attention of {query_len}×{key_len} tokens needs {query_blocks}×{key_blocks} tiles but the "
                f"block mask has {self.tiles.shape[1]}×{self.tiles.shape[2]} (tile {self.block_size}); compile the "
                "model at the longest sequence length it will see")

    def predicate(self, device: torch.device | str) -> Callable[[Any, Any, Any], torch.Tensor]:
        """``allowed(h, q, k)``: bool tensor, broadcasting integer tensors of head, query and key indices.
        Uses tensor ops only, so it also serves as FlexAttention's ``mask_mod`` (compiled or not)."""
        causal = self.causal
        tiles = self._tiles_on(device)
        bs = self.block_size
        if len(self.heads) == 1:
            rule = _scalar_rule(self.heads[0], tiles, bs)
        else:
            rule = _per_head_rule(self.heads, tiles, bs, device)

        def allowed(h: Any, q: Any, k: Any) -> torch.Tensor:
            keep = rule(h, q, k)
            return keep & (k <= q) if causal else keep
        return allowed

    def token_mask(self, query_len: int, key_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The dense token mask ``[heads or 1, query_len, key_len]`` (bool): O(S²), for references and tests."""
        self.check_length(query_len, key_len)
        h = torch.arange(self.pattern_heads, device=device)[:, None, None]
        q = torch.arange(query_len, device=device)[None, :, None]
        k = torch.arange(key_len, device=device)[None, None, :]
        return self.predicate(device)(h, q, k).expand(self.pattern_heads, query_len, key_len)

    def tile_classes(self, query_len: int, key_len: int) -> TileClasses:
        """Which tiles are kept, full and causally full at these lengths (exact, without visiting pairs)."""
        self.check_length(query_len, key_len)
        bounds = _tile_bounds(query_len, key_len, self.block_size)
        kept, full = [], []
        for index in range(self.pattern_heads):
            tiles = None if self.tiles is None else self.tiles[index if self.tiles.shape[0] > 1 else 0]
            any_term, all_term = _head_tiles(self.head(index), tiles, bounds, self.causal)
            kept.append(any_term)
            full.append(all_term & any_term)
        kept_t, all_t = torch.stack(kept), torch.stack(full)
        causally_below = bounds.k_last <= bounds.q_first  # every pair satisfies k ≤ q
        full_t = all_t & causally_below if self.causal else all_t
        return TileClasses(kept_t, full_t, all_t)

    def stats(self, query_len: int, key_len: int) -> MaskStats:
        """Exact token and tile counts at these lengths (partial tiles are evaluated pair by pair)."""
        classes = self.tile_classes(query_len, key_len)
        bounds = _tile_bounds(query_len, key_len, self.block_size)
        heads = classes.kept.shape[0]
        sizes = (bounds.q_last - bounds.q_first + 1) * (bounds.k_last - bounds.k_first + 1)
        kept_pairs = int((sizes * classes.full).sum())
        covered = classes.full.any(-1)  # [heads, nQ]: every query of the row attends some key
        partial = classes.kept & ~classes.full
        index = partial.nonzero()
        row_hits = torch.zeros(heads, query_len, dtype=torch.bool)
        allowed = self.predicate("cpu")
        bs = self.block_size
        per_batch = max(1, _PAIRS_PER_BATCH // (bs * bs))
        offsets = torch.arange(bs)
        for start in range(0, len(index), per_batch):
            chunk = index[start:start + per_batch]
            h = chunk[:, 0, None, None]
            q = chunk[:, 1, None, None] * bs + offsets[None, :, None]
            k = chunk[:, 2, None, None] * bs + offsets[None, None, :]
            inside = (q < query_len) & (k < key_len)
            keep = allowed(h, q.clamp(max=query_len - 1), k.clamp(max=key_len - 1)) & inside
            kept_pairs += int(keep.sum())
            rows = keep.any(-1)  # [n, bs]
            flat = (h[:, :, 0] * query_len + q[:, :, 0]).clamp(max=heads * query_len - 1)
            row_hits.view(-1).index_put_((flat[rows],), torch.ones((), dtype=torch.bool))
        row_hits |= covered.repeat_interleave(bs, 1)[:, :query_len]
        candidates = _candidate_tiles(bounds, self.causal)
        if self.causal:
            diagonal = min(query_len, key_len)  # query q < key_len sees q + 1 keys, later ones all of them
            candidate_pairs = (diagonal * (diagonal + 1) // 2 + (query_len - diagonal) * key_len) * heads
        else:
            candidate_pairs = query_len * key_len * heads
        return MaskStats(kept_pairs, candidate_pairs, int(classes.kept.sum()), int(candidates.sum()) * heads,
                         int(partial.sum()), int((~row_hits).sum()))

    def _tiles_on(self, device: torch.device | str) -> torch.Tensor | None:
        if self.tiles is None:
            return None
        name = str(device)
        if name not in self._device_tiles:
            self._device_tiles[name] = self.tiles.to(device)
        return self._device_tiles[name]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_device_tiles"] = {}
        return state


def _blocks(length: int, block_size: int) -> int:
    return math.ceil(length / block_size)


def _scalar_rule(head: HeadPattern, tiles: torch.Tensor | None, bs: int) -> Callable[[Any, Any, Any], torch.Tensor]:
    """One rule for every head, with Python constants (the cheapest FlexAttention mask_mod)."""
    def rule(h: Any, q: Any, k: Any) -> torch.Tensor:
        if head.dense:
            return (q >= 0) | (k >= 0)  # all True, broadcast to the pair's shape
        keep = (q - k).abs() < head.window if head.window else (q < 0) & (k < 0)
        if head.block:
            keep = keep | (q // head.block == k // head.block)
        if head.stride:
            keep = keep | ((q - k) % head.stride == 0)
        if head.n_global:
            keep = keep | (q < head.n_global) | (k < head.n_global)
        if head.tiles and tiles is not None:
            keep = keep | tiles[h if tiles.shape[0] > 1 else 0, q // bs, k // bs]
        return keep
    return rule


def _per_head_rule(heads: tuple[HeadPattern, ...], tiles: torch.Tensor | None, bs: int,
                   device: torch.device | str) -> Callable[[Any, Any, Any], torch.Tensor]:
    """Rules that differ by head: each part's size is looked up by head index (``0`` disables it)."""
    def column(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)

    window = column([h.window for h in heads])
    block = column([max(h.block, 1) for h in heads])
    use_block = column([int(h.block > 0) for h in heads]).bool()
    stride = column([max(h.stride, 1) for h in heads])
    use_stride = column([int(h.stride > 0) for h in heads]).bool()
    n_global = column([h.n_global for h in heads])
    dense = column([int(h.dense) for h in heads]).bool()
    use_tiles = column([int(h.tiles) for h in heads]).bool()
    any_tiles = tiles is not None and bool(use_tiles.any())

    def rule(h: Any, q: Any, k: Any) -> torch.Tensor:
        distance = q - k
        keep = dense[h] | (distance.abs() < window[h])
        keep = keep | (use_block[h] & (q // block[h] == k // block[h]))
        keep = keep | (use_stride[h] & (distance % stride[h] == 0))
        keep = keep | (q < n_global[h]) | (k < n_global[h])
        if any_tiles:
            assert tiles is not None
            keep = keep | (use_tiles[h] & tiles[h if tiles.shape[0] > 1 else 0, q // bs, k // bs])
        return keep
    return rule


@dataclass(frozen=True)
class _Bounds:
    """First/last query and key index of every tile, broadcast to ``[nQ, nK]`` (int64)."""

    q_first: torch.Tensor
    q_last: torch.Tensor
    k_first: torch.Tensor
    k_last: torch.Tensor


def _tile_bounds(query_len: int, key_len: int, bs: int) -> _Bounds:
    rows = torch.arange(_blocks(query_len, bs))[:, None]
    cols = torch.arange(_blocks(key_len, bs))[None, :]
    q_first, k_first = rows * bs, cols * bs
    q_last = ((rows + 1) * bs).clamp(max=query_len) - 1
    k_last = ((cols + 1) * bs).clamp(max=key_len) - 1
    shape = (rows.shape[0], cols.shape[1])
    return _Bounds(q_first.expand(shape), q_last.expand(shape), k_first.expand(shape), k_last.expand(shape))


def _candidate_tiles(bounds: _Bounds, causal: bool) -> torch.Tensor:
    return bounds.k_first <= bounds.q_last if causal else torch.ones_like(bounds.q_first, dtype=torch.bool)


def _head_tiles(head: HeadPattern, tiles: torch.Tensor | None, b: _Bounds,
                causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tile: does the head keep some causal pair (``any``), does it keep every pair (``all``)."""
    d_min, d_max = b.q_first - b.k_last, b.q_last - b.k_first  # q - k takes every value in between
    d_low = d_min.clamp(min=0) if causal else d_min
    reachable = d_max >= 0 if causal else torch.ones_like(d_max, dtype=torch.bool)
    none = torch.zeros_like(d_min, dtype=torch.bool)
    any_term, all_term = none.clone(), none.clone()
    if head.dense:
        return reachable.clone(), ~none
    if head.window:
        w = head.window - 1  # |d| ≤ w
        any_term |= reachable & (d_low <= w) & (d_max >= -w)
        all_term |= (d_min >= -w) & (d_max <= w)
    if head.block:
        blk = head.block
        overlap = torch.maximum(b.q_first // blk, b.k_first // blk) <= torch.minimum(b.q_last // blk, b.k_last // blk)
        any_term |= overlap & (b.k_first <= b.q_last if causal else True)
        all_term |= (b.q_first // blk == b.q_last // blk) & (b.k_first // blk == b.k_last // blk) & \
            (b.q_first // blk == b.k_first // blk)
    if head.stride:
        s = head.stride
        any_term |= reachable & (torch.div(d_max, s, rounding_mode="floor") * s >= d_low)
        all_term |= torch.full_like(none, s == 1) | ((d_min == d_max) & (d_min % s == 0))
    if head.n_global:
        g = head.n_global
        if causal:
            any_term |= ((b.q_first < g) & (b.k_first <= b.q_last.clamp(max=g - 1))) | \
                ((b.k_first < g) & (b.k_first <= b.q_last))
        else:
            any_term |= (b.q_first < g) | (b.k_first < g)
        all_term |= (b.q_last < g) | (b.k_last < g)
    if head.tiles and tiles is not None:
        kept = tiles[:d_min.shape[0], :d_min.shape[1]]
        any_term |= kept & reachable
        all_term |= kept
    return any_term, all_term


def candidate_tiles(query_blocks: int, key_blocks: int, causal: bool) -> torch.Tensor:
    """Tiles that may hold an attended pair: all of them, or those on/below the diagonal when causal.

    Returns a bool tensor ``[query_blocks, key_blocks]``."""
    rows = torch.arange(query_blocks)[:, None]
    cols = torch.arange(key_blocks)[None, :]
    if causal:
        return cols <= rows
    return torch.ones(query_blocks, key_blocks, dtype=torch.bool)


def diagonal_tiles(query_blocks: int, key_blocks: int) -> torch.Tensor:
    """The diagonal tiles ``(i, i)`` (bool ``[query_blocks, key_blocks]``)."""
    return torch.arange(query_blocks)[:, None] == torch.arange(key_blocks)[None, :]


def tile_density(tiles: torch.Tensor, causal: bool) -> float:
    """Kept tiles over candidate tiles (all tiles, or the causal ones), averaged over heads."""
    candidates = candidate_tiles(tiles.shape[-2], tiles.shape[-1], causal).to(tiles.device)
    return float((tiles & candidates).sum()) / float(candidates.sum() * tiles.shape[0])
