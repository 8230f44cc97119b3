"""Block-sparse attention kernels for the ``sas`` pass. Each computes exactly the pairs a ``TokenMask`` keeps.

Semantics (``q [B, H, Sq, D]``, ``k, v [B, Hkv, Sk, D]``, ``H`` a multiple of ``Hkv``: query head ``h``
reads key/value head ``h // (H / Hkv)``, as SDPA's ``enable_gqa``; 3-D inputs are one head):
``softmax(q kᵀ · scale + mask) v`` over the pairs the token mask keeps (causality included) and a boolean
``attn_mask`` allows (an additive float mask is added to the scores).

1. ``reference_attention``: SDPA with the token mask materialised (O(S²); the tests' reference).
2. ``gather_attention``: plain PyTorch over the kept tiles only: rows (head, query block) grouped by kept-tile
   count gather their key/value tiles; element masks only in groups holding partial tiles. CPU default.
3. ``chunked_attention``: the ``block`` pattern as ONE dense SDPA call over chunks (flash on CUDA, no mask).
4. ``flex_sparse_attention`` with ``build_block_mask``: FlexAttention; full tiles need no mask function,
   partial tiles use the token predicate as ``mask_mod``.
5. ``flash_groups_attention`` (``flash.py``): dense flash over gathered key tiles for tile-aligned masks.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .patterns import TileClasses, TokenMask

BACKENDS = ("auto", "flex", "gather", "chunked", "flash", "reference")


def as_4d(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
          attn_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
    """Inputs as ``[B, H, S, D]`` (3-D inputs get a head axis; the flag says to drop it again)."""
    if query.dim() == 4:
        return query, key, value, attn_mask, False
    if attn_mask is not None and attn_mask.dim() == 3:
        attn_mask = attn_mask.unsqueeze(1)
    return query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1), attn_mask, True


def is_float_mask(attn_mask: torch.Tensor | None) -> bool:
    """Whether ``attn_mask`` is additive (float) rather than boolean."""
    return attn_mask is not None and attn_mask.dtype != torch.bool


def reference_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: TokenMask,
                        scale: float | torch.Tensor, attn_mask: torch.Tensor | None = None,
                        dropout_p: float = 0.0) -> torch.Tensor:
    """Sparse attention as dense SDPA with the token mask materialised (O(S²) work and memory)."""
    query, key, value, attn_mask, squeezed = as_4d(query, key, value, attn_mask)
    heads, query_len, key_len = query.shape[1], query.shape[2], key.shape[2]
    mask.check_heads(heads)
    allowed = mask.token_mask(query_len, key_len, query.device)
    if attn_mask is None:
        combined: torch.Tensor = allowed
    elif is_float_mask(attn_mask):
        combined = attn_mask.to(query.dtype).masked_fill(~allowed, -math.inf)
    else:
        combined = allowed & attn_mask
    output = F.scaled_dot_product_attention(query, key, value, attn_mask=combined, dropout_p=dropout_p,
                                            scale=float(scale), enable_gqa=key.shape[1] != heads)
    return output.squeeze(1) if squeezed else output


def pad_seq(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """``tensor`` (``[..., S, D]``) zero-padded along ``S`` to ``length``."""
    extra = length - tensor.shape[-2]
    return F.pad(tensor, (0, 0, 0, extra)) if extra else tensor


@dataclass
class _GatherGroup:
    rows: torch.Tensor  # (head, query block) rows of this group, flat index h * nQ + i
    indices: torch.Tensor  # [rows, width] kept key blocks (padded with block 0)
    heads: torch.Tensor  # [rows] head of each row
    blocks: torch.Tensor  # [rows] query block of each row
    allowed: torch.Tensor | None  # [rows, bs, width*bs] element mask, None when every gathered pair is kept


@dataclass
class GatherPlan:
    """What ``gather_attention`` computes for one (mask, shape, device): built once, shared by layers."""

    groups: list[_GatherGroup]
    inverse: torch.Tensor | None  # reorders the groups' concatenated rows to (head, block) order
    heads: int
    query_blocks: int
    key_blocks: int


def gather_plan(mask: TokenMask, classes: TileClasses, heads: int, query_len: int, key_len: int,
                device: torch.device) -> GatherPlan:
    """Group rows by kept-tile count (widths rounded up to powers of two: at most 2× padding) and build each
    group's key indices and, where a group holds partial tiles or padding, its element mask."""
    bs = mask.block_size
    kept = classes.kept.expand(heads, *classes.kept.shape[1:])
    full = classes.full.expand_as(kept)
    query_blocks, key_blocks = kept.shape[1], kept.shape[2]
    flat_kept, flat_full = kept.reshape(-1, key_blocks), full.reshape(-1, key_blocks)
    counts = flat_kept.sum(-1)
    order = torch.sort((~flat_kept).to(torch.int8), dim=-1, stable=True).indices
    row_head = torch.arange(heads).repeat_interleave(query_blocks)
    row_block = torch.arange(query_blocks).repeat(heads)
    widths = torch.where(counts <= 1, torch.ones_like(counts),
                         2 ** torch.ceil(torch.log2(counts.clamp(min=1).double())).long())
    widths = torch.minimum(widths, counts.max().clamp(min=1))
    allowed_fn = mask.predicate(device)
    offsets = torch.arange(bs, device=device)
    groups, concatenated = [], []
    for width in torch.unique(widths).tolist():
        rows = (widths == width).nonzero().flatten()
        indices = order[rows, :width]
        valid = torch.arange(width) < counts[rows, None]
        padded_keys = valid & (indices == key_blocks - 1) & (key_len % bs != 0)
        all_full = bool(flat_full[rows].gather(1, indices)[valid].all()) and not bool(padded_keys.any()) and \
            bool(valid.all())
        allowed = None
        if not all_full:
            head_index = row_head[rows].to(device)[:, None, None]
            query_pos = (row_block[rows].to(device)[:, None] * bs + offsets)[:, :, None]  # [rows, bs, 1]
            key_pos = (indices.to(device)[..., None] * bs + offsets).reshape(len(rows), 1, width * bs)
            slot_valid = valid.to(device)[..., None].expand(len(rows), width, bs).reshape(len(rows), 1, width * bs)
            mask_head = head_index if mask.pattern_heads > 1 else torch.zeros_like(head_index)
            allowed = allowed_fn(mask_head, query_pos.clamp(max=query_len - 1), key_pos.clamp(max=key_len - 1))
            allowed = allowed & slot_valid & (key_pos < key_len)
        groups.append(_GatherGroup(rows.to(device), indices.to(device), row_head[rows].to(device),
                                   row_block[rows].to(device), allowed))
        concatenated.append(rows)
    inverse = None if len(groups) == 1 else torch.argsort(torch.cat(concatenated)).to(device)
    return GatherPlan(groups, inverse, heads, query_blocks, key_blocks)


def _mask_tiles(attn_mask: torch.Tensor, heads: int, query_len: int, key_len: int, block_size: int) -> torch.Tensor:
    """The user mask as tiles ``[Bm, H or 1, nQ, nK, bs, bs]`` (a view where no padding is needed)."""
    mask = attn_mask
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    mask_batch, mask_heads = mask.shape[0], mask.shape[1]
    if mask_heads not in (1, heads):
        raise RuntimeError(f"sas: attn_mask has {mask_heads} heads, the attention {heads}")
    mask = mask.expand(mask_batch, mask_heads, query_len, key_len)
    query_blocks, key_blocks = math.ceil(query_len / block_size), math.ceil(key_len / block_size)
    padded_q, padded_k = query_blocks * block_size, key_blocks * block_size
    if (padded_q, padded_k) != (query_len, key_len):
        # Padded query rows allow every key (so no row is empty); padded keys are masked by position.
        fill: Any = True if mask.dtype == torch.bool else 0.0
        full = mask.new_full((mask_batch, mask_heads, padded_q, padded_k), fill)
        full[..., :query_len, :key_len] = mask
        mask = full
    tiles = mask.reshape(mask_batch, mask_heads, query_blocks, block_size, key_blocks, block_size)
    return tiles.permute(0, 1, 2, 4, 3, 5)


def gather_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: GatherPlan, block_size: int,
                     scale: float | torch.Tensor, attn_mask: torch.Tensor | None = None,
                     dropout_p: float = 0.0) -> torch.Tensor:
    """Sparse attention computing only the kept tiles of ``plan`` (see ``gather_plan``)."""
    query, key, value, attn_mask, squeezed = as_4d(query, key, value, attn_mask)
    batch, heads, query_len, head_dim = query.shape
    kv_heads, key_len, value_dim = key.shape[1], key.shape[2], value.shape[-1]
    bs = block_size
    rows_total = heads * plan.query_blocks
    q_rows = pad_seq(query, plan.query_blocks * bs).reshape(batch, rows_total, bs, head_dim)
    k_tiles = pad_seq(key, plan.key_blocks * bs).reshape(batch, kv_heads, plan.key_blocks, bs, head_dim)
    v_tiles = pad_seq(value, plan.key_blocks * bs).reshape(batch, kv_heads, plan.key_blocks, bs, value_dim)
    mask_tiles = _mask_tiles(attn_mask, heads, query_len, key_len, bs) if attn_mask is not None else None
    outputs = []
    for group in plan.groups:
        count, width = group.indices.shape
        kv_head = (group.heads // (heads // kv_heads))[:, None]
        keys = k_tiles[:, kv_head, group.indices].reshape(batch, count, width * bs, head_dim)
        values = v_tiles[:, kv_head, group.indices].reshape(batch, count, width * bs, value_dim)
        q_group = q_rows if count == rows_total else q_rows[:, group.rows]
        scores = torch.matmul(q_group, keys.transpose(-1, -2)) * scale  # [B, rows, bs, width*bs]
        if group.allowed is not None:
            scores = scores.masked_fill(~group.allowed, -math.inf)
        if mask_tiles is not None:
            mask_head = group.heads if mask_tiles.shape[1] == heads else torch.zeros_like(group.heads)
            gathered = mask_tiles[:, mask_head[:, None], group.blocks[:, None], group.indices]  # [Bm, rows, w, bs, bs]
            gathered = gathered.permute(0, 1, 3, 2, 4).reshape(gathered.shape[0], count, bs, width * bs)
            scores = scores + gathered.to(scores.dtype) if is_float_mask(attn_mask) else \
                scores.masked_fill(~gathered, -math.inf)
        probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
        if mask_tiles is not None:  # a row the user's mask empties gives 0, as SDPA does (not NaN)
            probs = torch.nan_to_num(probs, nan=0.0)
        probs = probs.to(value.dtype)
        if dropout_p > 0:
            probs = F.dropout(probs, dropout_p, training=True)
        outputs.append(torch.matmul(probs, values))  # [B, rows, bs, Dv]
    output = outputs[0] if plan.inverse is None else torch.cat(outputs, dim=1)[:, plan.inverse]
    output = output.reshape(batch, heads, plan.query_blocks * bs, value_dim)[:, :, :query_len]
    return output.squeeze(1) if squeezed else output


def chunked_applies(query_len: int, key_len: int, chunk: int, causal: bool) -> str | None:
    """None when ``chunked_attention`` computes the ``block`` pattern exactly, else why not."""
    if key_len != query_len:
        return "the chunked kernel needs self-attention (as many keys as queries)"
    if not causal and query_len % chunk:
        return f"non-causal chunks need a length that is a multiple of the block ({chunk} tokens)"
    return None


def chunked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, chunk: int, causal: bool,
                      scale: float | torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Block-diagonal self-attention (each query sees only its own chunk of ``chunk`` tokens) as ONE dense
    SDPA call whose batch is (batch·heads) and whose heads are the chunks: flash on CUDA, no mask, no
    gather. Equals the ``block`` pattern exactly. Raises ValueError where it does not apply
    (``chunked_applies``)."""
    query, key, value, _, squeezed = as_4d(query, key, value, None)
    batch, heads, length, _ = query.shape
    reason = chunked_applies(length, key.shape[2], chunk, causal)
    if reason:
        raise ValueError(f"sas: {reason}")
    if key.shape[1] != heads:
        key = key.repeat_interleave(heads // key.shape[1], dim=1)
        value = value.repeat_interleave(heads // value.shape[1], dim=1)
    padded = math.ceil(length / chunk) * chunk  # causal: padded keys lie after every real query
    chunks = padded // chunk
    query, key, value = (pad_seq(t, padded).reshape(batch * heads, chunks, chunk, t.shape[-1])
                         for t in (query, key, value))
    output = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout_p, is_causal=causal,
                                            scale=float(scale))
    output = output.reshape(batch, heads, padded, output.shape[-1])[:, :, :length]
    return output.squeeze(1) if squeezed else output


def build_block_mask(mask: TokenMask, classes: TileClasses, heads: int, query_len: int, key_len: int,
                     device: torch.device, user_mask_mod: Callable | None = None) -> Any:
    """A FlexAttention ``BlockMask`` holding exactly the kept tiles: *full* tiles run without a mask function,
    *partial* ones with the token predicate (and ``user_mask_mod``; then every kept tile is partial)."""
    from torch.nn.attention.flex_attention import BlockMask

    kept = classes.kept.to(device)
    full = torch.zeros_like(kept) if user_mask_mod is not None else classes.full.to(device)
    partial = kept & ~full
    allowed = mask.predicate(device)
    per_head = mask.pattern_heads > 1

    def block_lists(chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = chosen.sum(-1).to(torch.int32)[None]
        order = torch.sort((~chosen).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)[None]
        return counts, order.contiguous()

    def mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        keep = allowed(h if per_head else 0, q_idx, kv_idx)
        if user_mask_mod is not None:
            keep = keep & user_mask_mod(b, h, q_idx, kv_idx)
        return keep

    partial_counts, partial_indices = block_lists(partial)
    full_counts, full_indices = block_lists(full)
    return BlockMask.from_kv_blocks(partial_counts, partial_indices, full_counts, full_indices,
                                    BLOCK_SIZE=mask.block_size, mask_mod=mask_mod, seq_lengths=(query_len, key_len))


@functools.cache
def _compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_sparse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: Any,
                          scale: float, score_mod: Callable | None = None,
                          kernel_options: dict[str, Any] | None = None) -> torch.Tensor:
    """FlexAttention with ``block_mask`` (compiled on CUDA, eager elsewhere: forward only there; inside a
    model that torch.compile is tracing, the outer compilation compiles it)."""
    from torch.nn.attention.flex_attention import flex_attention

    function = _compiled_flex() if query.is_cuda and not torch.compiler.is_compiling() else flex_attention
    key, value = key.to(query.dtype), value.to(query.dtype)
    with torch.autocast(query.device.type, enabled=False):
        return function(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=float(scale),
                        enable_gqa=key.shape[1] != query.shape[1], kernel_options=kernel_options)
