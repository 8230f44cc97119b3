"""Tile masks for the ``sas`` pass: which (query-block, key-block) tiles of each head's attention are kept.

A tile mask is a boolean tensor ``[heads, query_blocks, key_blocks]``; tile ``(i, j)`` covers queries
``i*block_size … (i+1)*block_size-1`` and keys ``j*block_size …``. Every pattern keeps the diagonal
tiles (each query block sees itself) and, for causal attention, only tiles on or below the diagonal
(top-left aligned, as ``scaled_dot_product_attention(is_causal=True)``).

Fixed patterns (sizes in tokens, rounded up to whole tiles):
  1. ``local``: a sliding window: key blocks less than ``ceil(window / block_size)`` blocks away.
  2. ``block``: attend within blocks of ``block`` tokens (``block`` a multiple of ``block_size``).
  3. ``strided``: key blocks whose distance is a multiple of ``stride / block_size`` (Sparse Transformer's
     strided head at tile granularity).
  4. ``global``: the first ``n_global`` tokens attend everywhere and are attended by every query, on top of
     the local window (Longformer / BigBird).
  5. ``mixed``: a pattern per head, cycling through a list (default: half local, half strided).
Learned pattern: ``select_important_tiles`` keeps, per head, the highest-scoring tiles up to a density, with
the same guaranteed number of tiles in every query-block row.
"""

from __future__ import annotations

import math

import torch

FIXED_PATTERNS = ("local", "block", "strided", "global", "dense")


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


def fixed_pattern(pattern: str, query_blocks: int, key_blocks: int, block_size: int, causal: bool, *,
                  window: int, block: int, stride: int, n_global: int) -> torch.Tensor:
    """The tile mask ``[query_blocks, key_blocks]`` (bool) of one head for a fixed ``pattern``.

    ``window``, ``block``, ``stride`` and ``n_global`` are in tokens; ``block_size`` is the tile size.
    Raises ValueError for an unknown pattern.
    """
    rows = torch.arange(query_blocks)[:, None]
    cols = torch.arange(key_blocks)[None, :]
    distance = (rows - cols).abs()
    window_blocks = max(1, math.ceil(window / block_size))
    if pattern == "dense":
        tiles = torch.ones(query_blocks, key_blocks, dtype=torch.bool)
    elif pattern == "local":
        tiles = distance < window_blocks
    elif pattern == "block":
        group = max(1, block // block_size)
        tiles = (rows // group) == (cols // group)
    elif pattern == "strided":
        step = max(1, stride // block_size)
        tiles = distance % step == 0
    elif pattern == "global":
        global_blocks = math.ceil(n_global / block_size)
        tiles = (distance < window_blocks) | (rows < global_blocks) | (cols < global_blocks)
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    tiles = tiles | diagonal_tiles(query_blocks, key_blocks)
    return tiles & candidate_tiles(query_blocks, key_blocks, causal)


def head_patterns(heads: int, pattern: str, per_head: tuple[str, ...]) -> list[str]:
    """The fixed pattern of each of ``heads`` heads: ``pattern`` for all, or for ``mixed`` the list
    ``per_head`` cycled (default: the first half ``local``, the second half ``strided``)."""
    if pattern != "mixed":
        return [pattern] * heads
    if per_head:
        return [per_head[h % len(per_head)] for h in range(heads)]
    return ["local" if h < (heads + 1) // 2 else "strided" for h in range(heads)]


def row_quotas(candidates: torch.Tensor, target: int) -> torch.Tensor:
    """Tiles each query-block row is guaranteed: the same number ``k`` for every row (a row with fewer
    candidates keeps them all), the largest ``k`` whose total stays within ``target``.

    ``candidates``: bool ``[query_blocks, key_blocks]``. Returns int64 ``[query_blocks]``."""
    counts = candidates.sum(-1)
    best = torch.ones_like(counts).minimum(counts)
    for level in range(1, int(counts.max()) + 1 if counts.numel() else 1):
        quota = counts.clamp(max=level)
        if int(quota.sum()) > target:
            break
        best = quota
    return best


def select_important_tiles(scores: torch.Tensor, causal: bool, density: float) -> torch.Tensor:
    """Per head, keep ``round(density × candidate tiles)`` tiles (exactly, unless the diagonal alone is more):
    the diagonal, then each query-block row's best tiles up to a common per-row quota (``row_quotas``: every
    query keeps context, as top-k-per-query-block selection does), then the best remaining tiles of the head.

    ``scores``: ``[heads, query_blocks, key_blocks]`` importance (e.g. Σ|A|·|∂L/∂A| over each tile).
    Returns the bool tile mask of the same shape. Ties break towards the lower flat index.
    """
    heads, query_blocks, key_blocks = scores.shape
    candidates = candidate_tiles(query_blocks, key_blocks, causal)
    diagonal = diagonal_tiles(query_blocks, key_blocks) & candidates
    target = max(int(diagonal.sum()), round(density * int(candidates.sum())))
    quotas = row_quotas(candidates, target).maximum(diagonal.sum(-1))
    order_key = scores.detach().double().cpu().clone()
    order_key[:, ~candidates] = -math.inf
    order_key[:, diagonal] = math.inf
    # A stable descending sort: equal scores keep their index order, so the choice is reproducible.
    ranked = torch.sort(order_key, dim=-1, descending=True, stable=True).indices  # per row, best first
    rank = torch.empty_like(ranked)
    rank.scatter_(-1, ranked, torch.arange(key_blocks).expand_as(ranked).contiguous())
    keep = (rank < quotas[None, :, None]) & candidates
    extra = target - int(keep[0].sum())
    if extra > 0:
        rest = order_key.masked_fill(keep, -math.inf).reshape(heads, -1)
        chosen = torch.sort(rest, dim=1, descending=True, stable=True).indices[:, :extra]
        keep.view(heads, -1).scatter_(1, chosen, True)
    return keep


def tile_density(tiles: torch.Tensor, causal: bool) -> float:
    """Kept tiles over candidate tiles (all tiles, or the causal ones), averaged over heads."""
    candidates = candidate_tiles(tiles.shape[-2], tiles.shape[-1], causal).to(tiles.device)
    return float((tiles & candidates).sum()) / float(candidates.sum() * tiles.shape[0])
