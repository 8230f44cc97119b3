"""The ``flash`` kernel: tile-aligned sparse attention as dense flash attention over gathered key tiles.

Applies when every kept tile is full except causal diagonal tiles (importance masks, ``block``, and any
token pattern whose sizes are whole tiles and keeps no partial tile). Query blocks are grouped:
  1. causal: consecutive query blocks ``a … b`` whose kept key blocks are one shared set ``S`` of earlier
     blocks (all ``< a``) plus their own span up to themselves. The group's queries attend the gathered
     keys ``S + [a … b]`` with *lower-right* causal alignment (query ``t`` of the span sees ``S`` and the
     span up to ``t``), which flash attention runs without any mask;
  2. non-causal: query blocks with identical kept sets, attending the gathered keys unmasked.
Groups of equal (span, shared-set) size run as one batched SDPA call; gathered copies cost memory traffic
proportional to the kept tiles, shared by all query blocks of a group (``importance`` with
``sas.group > 1`` makes groups). Everything is ordinary autograd (index_select → index_add in backward).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kernels import as_4d, pad_seq
from .patterns import TileClasses


@dataclass
class _Bucket:
    span: int  # query blocks per group
    shared: int  # gathered key blocks before the span (causal) / all key blocks (non-causal: span unused)
    query_index: torch.Tensor  # [groups * span] flat (head * nQ + block) query-block indices
    key_index: torch.Tensor  # [groups * (shared + span)] flat (kv_head * nK + block) key-block indices


@dataclass
class FlashPlan:
    """The groups of one (mask, shape, device), bucketed by size: built once, shared by layers and steps."""

    buckets: list[_Bucket]
    inverse: torch.Tensor  # reorders the buckets' concatenated query blocks to (head, block) order
    query_blocks: int
    key_blocks: int
    causal: bool
    groups: int  # number of query-block groups (over heads)


def flash_plan(classes: TileClasses, heads: int, kv_heads: int, causal: bool, query_len: int, key_len: int,
               block_size: int, device: torch.device) -> FlashPlan | str:
    """The flash kernel's groups, or why it cannot run this mask exactly."""
    if heads % kv_heads:
        return f"{heads} query heads do not share {kv_heads} key/value heads evenly"
    kept = classes.kept.expand(heads, *classes.kept.shape[1:])
    full = classes.full.expand_as(kept)
    causal_full = classes.causal_full.expand_as(kept)
    query_blocks, key_blocks = kept.shape[1], kept.shape[2]
    diagonal = torch.eye(query_blocks, key_blocks, dtype=torch.bool)
    if causal:
        if query_len != key_len:
            return "causal groups need self-attention (as many keys as queries)"
        if bool((kept & ~full & ~diagonal).any()):
            return "the mask has partial tiles off the diagonal (token-level edges); use flex or gather"
        if bool((kept & diagonal & ~causal_full).any()) or not bool((kept | ~diagonal).all()):
            return "a diagonal tile is not kept whole (causally)"
        groups = _causal_groups(kept)
    else:
        if bool((kept & ~full).any()) or key_len % block_size:
            return "the mask has partial tiles (token-level edges or a ragged last key block); use flex or gather"
        groups = _equal_row_groups(kept)
    group_size = heads // kv_heads
    by_shape: dict[tuple[int, int], list[tuple[list[int], list[int]]]] = defaultdict(list)
    for head, rows, keys in groups:
        span = len(rows) if causal else 0
        flat_q = [head * query_blocks + r for r in rows]
        flat_k = [(head // group_size) * key_blocks + k for k in keys]
        by_shape[(len(rows), len(keys) - span)].append((flat_q, flat_k))
    buckets, order = [], []
    for (span, shared), members in sorted(by_shape.items()):
        query_index = torch.tensor([q for flat_q, _ in members for q in flat_q], dtype=torch.long)
        key_index = torch.tensor([k for _, flat_k in members for k in flat_k], dtype=torch.long)
        buckets.append(_Bucket(span, shared, query_index.to(device), key_index.to(device)))
        order.append(query_index)
    inverse = torch.argsort(torch.cat(order)).to(device)
    return FlashPlan(buckets, inverse, query_blocks, key_blocks, causal, len(groups))


def _causal_groups(kept: torch.Tensor) -> list[tuple[int, list[int], list[int]]]:
    """(head, query blocks a…b, gathered key blocks S + [a…b]) of maximal causal groups."""
    heads, query_blocks, _ = kept.shape
    eye = torch.eye(query_blocks, kept.shape[2], dtype=torch.bool)
    previous = torch.zeros_like(kept)
    previous[:, 1:] = kept[:, :-1]
    continues = (kept == (previous | eye[None])).all(-1)  # row i = row i-1 plus its own diagonal
    continues[:, 0] = False
    groups = []
    for head in range(heads):
        starts = (~continues[head]).nonzero().flatten().tolist() + [query_blocks]
        for start, stop in zip(starts[:-1], starts[1:]):
            shared = kept[head, start, :start].nonzero().flatten().tolist()
            groups.append((head, list(range(start, stop)), shared + list(range(start, stop))))
    return groups


def _equal_row_groups(kept: torch.Tensor) -> list[tuple[int, list[int], list[int]]]:
    """(head, query blocks, key blocks) of query blocks that keep identical key blocks."""
    groups = []
    for head in range(kept.shape[0]):
        unique, inverse = torch.unique(kept[head], dim=0, return_inverse=True)
        for index in range(unique.shape[0]):
            rows = (inverse == index).nonzero().flatten().tolist()
            groups.append((head, rows, unique[index].nonzero().flatten().tolist()))
    return groups


def flash_groups_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: FlashPlan,
                           block_size: int, scale: float | torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Sparse attention over ``plan``'s groups (see the module docstring): one SDPA call per bucket."""
    from torch.nn.attention.bias import causal_lower_right

    query, key, value, _, squeezed = as_4d(query, key, value, None)
    batch, heads, query_len, head_dim = query.shape
    kv_heads, value_dim = key.shape[1], value.shape[-1]
    bs = block_size
    q_flat = pad_seq(query, plan.query_blocks * bs).reshape(batch, heads * plan.query_blocks, bs * head_dim)
    k_flat = pad_seq(key, plan.key_blocks * bs).reshape(batch, kv_heads * plan.key_blocks, bs * head_dim)
    v_flat = pad_seq(value, plan.key_blocks * bs).reshape(batch, kv_heads * plan.key_blocks, bs * value_dim)
    outputs = []
    for bucket in plan.buckets:
        groups = bucket.query_index.numel() // bucket.span
        keys_per_group = bucket.key_index.numel() // groups
        q = q_flat.index_select(1, bucket.query_index).reshape(batch * groups, 1, bucket.span * bs, head_dim)
        k = k_flat.index_select(1, bucket.key_index).reshape(batch * groups, 1, keys_per_group * bs, head_dim)
        v = v_flat.index_select(1, bucket.key_index).reshape(batch * groups, 1, keys_per_group * bs, value_dim)
        if not plan.causal:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=float(scale))
        elif bucket.shared == 0:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=float(scale))
        else:
            bias = causal_lower_right(bucket.span * bs, keys_per_group * bs)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=float(scale))
        outputs.append(out.reshape(batch, groups * bucket.span, bs, value_dim))
    output = torch.cat(outputs, dim=1).index_select(1, plan.inverse)
    output = output.reshape(batch, heads, plan.query_blocks * bs, value_dim)[:, :, :query_len]
    return output.squeeze(1) if squeezed else output
