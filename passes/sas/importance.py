"""Learned (``importance``) tile masks: score each tile by Σ|A|·|∂L/∂A| and keep the best.

1. ``scored_attention``: dense attention whose backward, computed a query chunk at a time (memory
   O(chunk × keys), so it runs at 32k tokens), also adds each tile's Σ_batch Σ_pairs |A|·|∂L/∂A| to a sink.
   Outputs and gradients are those of dense attention.
2. ``select_important_tiles``: per head, exactly ``round(density × candidate tiles)`` tiles: the diagonal,
   then every query-block row's best tiles up to a common quota (every query keeps context), then the
   best of the rest. With ``group > 1`` rows are chosen ``group`` query blocks at a time: the blocks of a
   group share one set of earlier key blocks and keep their own span whole (causal), the structure the
   ``flash`` kernel runs as dense flash attention over gathered keys.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .patterns import candidate_tiles, diagonal_tiles

# Elements of one query chunk's score matrix in the scored backward (float32: 1 GiB).
_CHUNK_ELEMENTS = 1 << 28


def row_quotas(candidates: torch.Tensor, target: int, cost: torch.Tensor | None = None) -> torch.Tensor:
    """Tiles each row is guaranteed: the same number ``k`` for every row (a row with fewer candidates keeps
    them all), the largest ``k`` whose total cost stays within ``target`` (``cost``: tiles per choice of
    each row, default 1). ``candidates``: bool ``[rows, key_blocks]``. Returns int64 ``[rows]``."""
    counts = candidates.sum(-1)
    cost = torch.ones_like(counts) if cost is None else cost
    best = torch.ones_like(counts).minimum(counts)
    for level in range(1, int(counts.max()) + 1 if counts.numel() else 1):
        quota = counts.clamp(max=level)
        if int((quota * cost).sum()) > target:
            break
        best = quota
    return best


def select_important_tiles(scores: torch.Tensor, causal: bool, density: float, group: int = 1) -> torch.Tensor:
    """Keep, per head, ``round(density × candidate tiles)`` tiles (exactly for ``group=1``, unless the diagonal
    alone is more; within ``group - 1`` tiles otherwise), the best by ``scores`` (see the module docstring).

    ``scores``: ``[heads, query_blocks, key_blocks]``. Returns the bool tile mask of the same shape. Ties
    break towards the lower index. Raises ValueError for ``group < 1``."""
    if group < 1:
        raise ValueError(f"group {group} must be ≥ 1 query blocks")
    if group > 1:
        return _select_grouped(scores, causal, density, group)
    heads, query_blocks, key_blocks = scores.shape
    candidates = candidate_tiles(query_blocks, key_blocks, causal)
    diagonal = diagonal_tiles(query_blocks, key_blocks) & candidates
    target = max(int(diagonal.sum()), round(density * int(candidates.sum())))
    quotas = row_quotas(candidates, target).maximum(diagonal.sum(-1))
    order_key = scores.detach().double().cpu().clone()
    order_key[:, ~candidates] = -math.inf
    order_key[:, diagonal] = math.inf
    return _keep_best(order_key, candidates, quotas, target)


def _keep_best(order_key: torch.Tensor, candidates: torch.Tensor, quotas: torch.Tensor, target: int,
               cost: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's best ``quotas[row]`` entries, then the best remaining entries while the total cost (tiles
    per entry of its row, default 1) stays within ``target``. ``order_key``: ``[heads, rows, cols]``."""
    heads, rows, cols = order_key.shape
    ranked = torch.sort(order_key, dim=-1, descending=True, stable=True).indices  # per row, best first
    rank = torch.empty_like(ranked)
    rank.scatter_(-1, ranked, torch.arange(cols).expand_as(ranked).contiguous())
    keep = (rank < quotas[None, :, None]) & candidates
    cost = torch.ones(rows, dtype=torch.int64) if cost is None else cost
    for head in range(heads):
        spent = int((keep[head].sum(-1) * cost).sum())
        rest = order_key[head].masked_fill(keep[head] | ~candidates, -math.inf).flatten()
        for flat in torch.sort(rest, descending=True, stable=True).indices.tolist():
            if rest[flat] == -math.inf or spent >= target:
                break
            row_cost = int(cost[flat // cols])
            if spent + row_cost <= target:
                keep[head].view(-1)[flat] = True
                spent += row_cost
    return keep


def _select_grouped(scores: torch.Tensor, causal: bool, density: float, group: int) -> torch.Tensor:
    heads, query_blocks, key_blocks = scores.shape
    candidates = candidate_tiles(query_blocks, key_blocks, causal)
    groups = math.ceil(query_blocks / group)
    starts = torch.arange(groups) * group
    sizes = (starts + group).clamp(max=query_blocks) - starts
    rows = torch.arange(query_blocks)[:, None]
    cols = torch.arange(key_blocks)[None, :]
    row_group = rows // group
    own_span = (cols // group == row_group) & candidates  # each group keeps its own span (causal part)
    group_candidates = torch.zeros(groups, key_blocks, dtype=torch.bool)
    for g in range(groups):  # key blocks a group may add: earlier ones (causal) or any outside its span
        outside = cols[0] // group != g
        group_candidates[g] = outside & (cols[0] < starts[g] if causal else True)
    mandatory = int(own_span.sum())
    target = max(mandatory, round(density * int(candidates.sum())))
    budget = target - mandatory
    group_scores = torch.zeros(heads, groups, key_blocks, dtype=torch.float64)
    group_scores.index_add_(1, row_group[:, 0], scores.detach().double().cpu())
    group_scores[:, ~group_candidates] = -math.inf
    quotas = row_quotas(group_candidates, budget, sizes) if budget > 0 else torch.zeros(groups, dtype=torch.int64)
    if budget > 0 and int((quotas * sizes).sum()) > budget:
        quotas = torch.zeros_like(quotas)
    chosen = _keep_best(group_scores, group_candidates, quotas, budget, sizes)
    return own_span[None] | (chosen[:, row_group[:, 0]] & candidates)


def tile_scores(probs: torch.Tensor, grad: torch.Tensor, block_size: int) -> torch.Tensor:
    """Σ_batch Σ_tile |A|·|∂L/∂A| of probabilities ``probs`` and their gradient ``grad`` (``[B, H, Sq, Sk]``):
    float32 ``[H, ceil(Sq/bs), ceil(Sk/bs)]``."""
    score = (probs.float() * grad.float()).abs().sum(0)
    heads, query_len, key_len = score.shape
    rows, cols = math.ceil(query_len / block_size), math.ceil(key_len / block_size)
    score = torch.nn.functional.pad(score, (0, cols * block_size - key_len, 0, rows * block_size - query_len))
    return score.view(heads, rows, block_size, cols, block_size).sum((2, 4))


class _ScoredAttention(torch.autograd.Function):
    """Dense attention (``[B, H, S, D]``, keys already expanded to ``H`` heads) whose backward scores tiles."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                scale: float, causal: bool, block_size: int, sink: Callable[[torch.Tensor], None]) -> torch.Tensor:
        attn_mask = _with_causal(mask, query, key) if causal and mask is not None else mask
        output = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, is_causal=causal and mask is None, scale=scale)
        ctx.save_for_backward(query, key, value, output, mask)
        ctx.scale, ctx.causal, ctx.block_size, ctx.sink = scale, causal, block_size, sink
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        query, key, value, output, mask = ctx.saved_tensors
        batch, heads, query_len, _ = query.shape
        key_len = key.shape[2]
        bs = ctx.block_size
        rows = max(1, _CHUNK_ELEMENTS // max(batch * heads * key_len, 1) // bs) * bs
        acc = torch.promote_types(query.dtype, torch.float32)  # at least float32 for the sums
        grad_q = torch.zeros_like(query, dtype=acc)
        grad_k = torch.zeros_like(key, dtype=acc)
        grad_v = torch.zeros_like(value, dtype=acc)
        grad_mask = torch.zeros_like(mask, dtype=acc) if mask is not None and ctx.needs_input_grad[3] else None
        delta = (grad_output.to(acc) * output.to(acc)).sum(-1, keepdim=True)  # [B, H, Sq, 1]
        scores_total = []
        k32, v32 = key.to(acc), value.to(acc)
        for start in range(0, query_len, rows):
            stop = min(start + rows, query_len)
            q_chunk, g_chunk = query[:, :, start:stop].to(acc), grad_output[:, :, start:stop].to(acc)
            scores = torch.matmul(q_chunk, k32.transpose(-1, -2)) * ctx.scale
            chunk_mask = None if mask is None else mask[..., start:stop, :] if mask.shape[-2] > 1 else mask
            if chunk_mask is not None:
                scores = scores + chunk_mask.to(acc) if chunk_mask.dtype != torch.bool else \
                    scores.masked_fill(~chunk_mask, -math.inf)
            if ctx.causal:
                visible = torch.arange(start, stop, device=query.device)[:, None] >= \
                    torch.arange(key_len, device=query.device)[None, :]
                scores = scores.masked_fill(~visible, -math.inf)
            probs = torch.softmax(scores, dim=-1)
            grad_probs = torch.matmul(g_chunk, v32.transpose(-1, -2))
            scores_total.append(tile_scores(probs, grad_probs, bs))
            grad_v += torch.matmul(probs.transpose(-1, -2), g_chunk)
            grad_scores = probs * (grad_probs - delta[:, :, start:stop])
            grad_q[:, :, start:stop] = torch.matmul(grad_scores, k32) * ctx.scale
            grad_k += torch.matmul(grad_scores.transpose(-1, -2), q_chunk) * ctx.scale
            if grad_mask is not None:
                target = grad_mask if grad_mask.shape[-2] == 1 else grad_mask[..., start:stop, :]
                target += _reduce_to(grad_scores, target.shape)
        ctx.sink(torch.cat(scores_total, dim=1))
        return (grad_q.to(query.dtype), grad_k.to(key.dtype), grad_v.to(value.dtype),
                None if grad_mask is None else grad_mask.to(mask.dtype), None, None, None, None)


def _with_causal(mask: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    visible = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
    if mask.dtype == torch.bool:
        return mask & visible
    return mask.masked_fill(~visible, -math.inf)


def _reduce_to(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum ``tensor`` over the dimensions that ``shape`` broadcasts (size 1 there)."""
    while tensor.dim() > len(shape):
        tensor = tensor.sum(0)
    dims = [d for d, size in enumerate(shape) if size == 1 and tensor.shape[d] != 1]
    return tensor.sum(dims, keepdim=True) if dims else tensor


def scored_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scale: float, causal: bool, block_size: int,
                     sink: Callable[[torch.Tensor], None]) -> torch.Tensor:
    """Dense attention (4-D, GQA expanded by the caller) whose backward passes the tile scores
    ``[H, nQ, nK]`` (float32) to ``sink``; outputs and gradients equal dense attention's."""
    return _ScoredAttention.apply(query, key, value, mask, scale, causal, block_size, sink)
