"""Block-sparse attention for the ``sas`` pass: the module the pass installs and its three kernels.

Semantics of every kernel (``q [B, H, Sq, D]``, ``k, v [B, Hkv, Sk, D]``, ``H`` a multiple of ``Hkv``:
query head ``h`` reads key/value head ``h // (H / Hkv)``, as SDPA's ``enable_gqa``; 3-D inputs are one head):
``softmax(q kᵀ · scale + mask) v`` where a (query, key) pair is attended only if its tile is kept in the
tile mask ``[H or 1, Sq/bs, Sk/bs]``, the key is not after the query when ``causal`` (top-left aligned,
like ``is_causal``) and a boolean ``attn_mask`` allows it (an additive float mask is added to the scores).

1. ``reference_attention``: SDPA with the tile mask expanded to a dense token mask (tests' reference).
2. ``gather_attention``: plain PyTorch that computes only kept tiles: per query block, the kept key/value
   blocks are gathered (padded to the row with the most kept tiles), so work and memory scale with the
   density. Autograd runs through ordinary ops; used on CPU (FlexAttention has no CPU backward).
3. ``flex_sparse_attention``: ``torch.nn.attention.flex_attention`` (compiled on CUDA) with a ``BlockMask``
   built straight from the tile mask: tiles strictly below the diagonal are full blocks (no mask function
   evaluated), diagonal tiles partial with the causal mask function.
4. ``chunked_attention``: the ``block`` pattern (block-diagonal) as one dense SDPA call over chunks (flash
   on CUDA, no mask at all); ``backend=auto`` uses it whenever the mask is that pattern.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from effcompile.export.registry import serializable

log = logging.getLogger(__name__)

BACKENDS = ("auto", "flex", "gather", "reference")


def expand_tiles(tile_mask: torch.Tensor, heads: int, query_len: int, key_len: int,
                 block_size: int) -> torch.Tensor:
    """The tiles covering ``query_len × key_len`` tokens, one slice per head: ``[heads, nQ, nK]`` (bool).

    Raises RuntimeError when the sequence is longer than the mask or the head count does not match.
    """
    query_blocks, key_blocks = math.ceil(query_len / block_size), math.ceil(key_len / block_size)
    if query_blocks > tile_mask.shape[1] or key_blocks > tile_mask.shape[2]:
        raise RuntimeError(
            f"sas: attention of {query_len}×{key_len} tokens needs {query_blocks}×{key_blocks} tiles but the "
            f"block mask has {tile_mask.shape[1]}×{tile_mask.shape[2]} (tile {block_size}); compile the model "
            "at the longest sequence length it will see")
    if tile_mask.shape[0] not in (1, heads):
        raise RuntimeError(f"sas: the block mask has {tile_mask.shape[0]} heads, the attention {heads}")
    return tile_mask[:, :query_blocks, :key_blocks].expand(heads, query_blocks, key_blocks)


def kept_blocks(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each (head, query block): the kept key-block indices in ascending order, padded to the widest row,
    and which entries are real. Returns ``(indices [H, nQ, width] int64, valid [H, nQ, width] bool)``."""
    counts = tiles.sum(-1)
    width = max(int(counts.max()), 1) if counts.numel() else 1
    order = torch.sort((~tiles).to(torch.int8), dim=-1, stable=True).indices[..., :width]
    valid = torch.arange(width, device=tiles.device) < counts[..., None]
    return order, valid


def _as_4d(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           attn_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
    if query.dim() == 4:
        return query, key, value, attn_mask, False
    if attn_mask is not None and attn_mask.dim() == 3:
        attn_mask = attn_mask.unsqueeze(1)
    return query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1), attn_mask, True


def _is_float_mask(attn_mask: torch.Tensor | None) -> bool:
    return attn_mask is not None and attn_mask.dtype != torch.bool


def reference_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, tile_mask: torch.Tensor,
                        block_size: int, causal: bool, scale: float | torch.Tensor,
                        attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """Block-sparse attention as dense SDPA with the tiles expanded to a token mask (O(S²) work)."""
    query, key, value, attn_mask, squeezed = _as_4d(query, key, value, attn_mask)
    heads, query_len, key_len = query.shape[1], query.shape[2], key.shape[2]
    tiles = expand_tiles(tile_mask, heads, query_len, key_len, block_size)
    allowed = tiles.repeat_interleave(block_size, 1).repeat_interleave(block_size, 2)[:, :query_len, :key_len]
    if causal:
        allowed = allowed & torch.ones(query_len, key_len, dtype=torch.bool, device=query.device).tril()
    if attn_mask is None:
        mask: torch.Tensor = allowed
    elif _is_float_mask(attn_mask):
        mask = attn_mask.to(query.dtype).masked_fill(~allowed, -math.inf)
    else:
        mask = allowed & attn_mask
    output = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout_p,
                                            scale=float(scale), enable_gqa=key.shape[1] != heads)
    return output.squeeze(1) if squeezed else output


def _pad_seq(tensor: torch.Tensor, length: int) -> torch.Tensor:
    extra = length - tensor.shape[-2]
    return F.pad(tensor, (0, 0, 0, extra)) if extra else tensor


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


def _row_buckets(counts: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """Group rows by kept-tile count into widths that are powers of two (at most 2× padding): a list of
    ``(width, row indices)``."""
    widths = torch.where(counts <= 1, torch.ones_like(counts),
                         2 ** torch.ceil(torch.log2(counts.clamp(min=1).double())).long())
    widths = torch.minimum(widths, counts.max().clamp(min=1))
    return [(int(width), (widths == width).nonzero().flatten()) for width in torch.unique(widths).tolist()]


def gather_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, tile_mask: torch.Tensor,
                     block_size: int, causal: bool, scale: float | torch.Tensor,
                     attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """Block-sparse attention computing only the kept tiles (see the module docstring).

    Rows (head, query block) are grouped by how many tiles they keep; each group gathers its kept key/value
    blocks, padded to the group's width (a power of two), so work is at most twice the kept tiles'."""
    query, key, value, attn_mask, squeezed = _as_4d(query, key, value, attn_mask)
    batch, heads, query_len, head_dim = query.shape
    kv_heads, key_len, value_dim = key.shape[1], key.shape[2], value.shape[-1]
    bs = block_size
    tiles = expand_tiles(tile_mask, heads, query_len, key_len, bs)
    query_blocks, key_blocks = tiles.shape[1], tiles.shape[2]
    rows_total = heads * query_blocks
    device = query.device

    q_rows = _pad_seq(query, query_blocks * bs).reshape(batch, rows_total, bs, head_dim)
    k_tiles = _pad_seq(key, key_blocks * bs).reshape(batch, kv_heads, key_blocks, bs, head_dim)
    v_tiles = _pad_seq(value, key_blocks * bs).reshape(batch, kv_heads, key_blocks, bs, value_dim)
    flat_tiles = tiles.reshape(rows_total, key_blocks).cpu()
    counts = flat_tiles.sum(-1)
    order = torch.sort((~flat_tiles).to(torch.int8), dim=-1, stable=True).indices
    row_head = torch.arange(heads).repeat_interleave(query_blocks)
    row_block = torch.arange(query_blocks).repeat(heads)
    mask_tiles = _mask_tiles(attn_mask, heads, query_len, key_len, bs) if attn_mask is not None else None
    offsets = torch.arange(bs, device=device)
    outputs, row_groups = [], []
    for width, rows in _row_buckets(counts):
        indices = order[rows, :width].to(device)
        valid = (torch.arange(width) < counts[rows, None]).to(device)
        heads_of_rows, blocks_of_rows = row_head[rows].to(device), row_block[rows].to(device)
        kv_head = (heads_of_rows // (heads // kv_heads))[:, None]
        keys = k_tiles[:, kv_head, indices].reshape(batch, len(rows), width * bs, head_dim)
        values = v_tiles[:, kv_head, indices].reshape(batch, len(rows), width * bs, value_dim)
        q_group = q_rows if len(rows) == rows_total else q_rows[:, rows.to(device)]
        scores = torch.matmul(q_group, keys.transpose(-1, -2)) * scale  # [B, rows, bs, width*bs]
        key_pos = (indices[..., None] * bs + offsets).reshape(len(rows), 1, width * bs)
        allowed = valid[..., None].expand(len(rows), width, bs).reshape(len(rows), 1, width * bs)
        allowed = allowed & (key_pos < key_len)
        if causal:
            query_pos = (blocks_of_rows[:, None] * bs + offsets)[..., None]  # [rows, bs, 1]
            allowed = allowed & (key_pos <= query_pos)
        if mask_tiles is not None:
            mask_head = heads_of_rows if mask_tiles.shape[1] == heads else torch.zeros_like(heads_of_rows)
            gathered = mask_tiles[:, mask_head[:, None], blocks_of_rows[:, None], indices]  # [Bm, rows, w, bs, bs]
            gathered = gathered.permute(0, 1, 3, 2, 4).reshape(gathered.shape[0], len(rows), bs, width * bs)
            if _is_float_mask(attn_mask):
                scores = scores + gathered.to(scores.dtype)
            else:
                allowed = allowed & gathered
        scores = scores.masked_fill(~allowed, -math.inf)
        probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(value.dtype)
        if dropout_p > 0:
            probs = F.dropout(probs, dropout_p, training=True)
        outputs.append(torch.matmul(probs, values))  # [B, rows, bs, Dv]
        row_groups.append(rows)
    if len(outputs) == 1:
        output = outputs[0]
    else:
        inverse = torch.argsort(torch.cat(row_groups)).to(device)
        output = torch.cat(outputs, dim=1)[:, inverse]
    output = output.reshape(batch, heads, query_blocks * bs, value_dim)[:, :, :query_len]
    return output.squeeze(1) if squeezed else output


def chunked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, chunk: int, causal: bool,
                      scale: float | torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Block-diagonal self-attention (each query sees only its own chunk of ``chunk`` tokens) as ONE dense
    SDPA call whose batch is (batch·heads) and whose heads are the chunks: flash on CUDA, no mask, no
    gather. Equals the ``block`` tile pattern exactly. Raises ValueError where it does not apply
    (cross-attention, or a non-causal length that is not a multiple of ``chunk``)."""
    query, key, value, _, squeezed = _as_4d(query, key, value, None)
    batch, heads, length, head_dim = query.shape
    if key.shape[2] != length:
        raise ValueError("chunked attention needs self-attention (as many keys as queries)")
    if not causal and length % chunk:
        raise ValueError("non-causal chunked attention needs a length that is a multiple of the chunk")
    if key.shape[1] != heads:
        key = key.repeat_interleave(heads // key.shape[1], dim=1)
        value = value.repeat_interleave(heads // value.shape[1], dim=1)
    padded = math.ceil(length / chunk) * chunk  # causal: padded keys lie after every real query
    chunks = padded // chunk
    query, key, value = (_pad_seq(t, padded).reshape(batch * heads, chunks, chunk, t.shape[-1])
                         for t in (query, key, value))
    output = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout_p, is_causal=causal,
                                            scale=float(scale))
    output = output.reshape(batch, heads, padded, output.shape[-1])[:, :, :length]
    return output.squeeze(1) if squeezed else output


def build_block_mask(tiles: torch.Tensor, block_size: int, causal: bool, query_len: int, key_len: int,
                     mask_mod: Callable | None = None) -> Any:
    """A FlexAttention ``BlockMask`` holding exactly the kept ``tiles`` (``[H, nQ, nK]`` bool, on the device).

    Without ``mask_mod`` (a user mask), tiles that need no token mask are *full* blocks; the rest are partial
    with the causal mask function (and ``mask_mod``)."""
    from torch.nn.attention.flex_attention import BlockMask

    query_blocks, key_blocks = tiles.shape[1], tiles.shape[2]
    rows = torch.arange(query_blocks, device=tiles.device)[:, None]
    cols = torch.arange(key_blocks, device=tiles.device)[None, :]
    if mask_mod is not None:
        full = torch.zeros_like(tiles)
    elif causal:
        full = tiles & (cols < rows)
    else:
        full = tiles.clone()
    partial = tiles & ~full

    def block_lists(chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = chosen.sum(-1).to(torch.int32)[None]
        order = torch.sort((~chosen).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)[None]
        return counts, order.contiguous()

    # The mask function also checks tile membership: compiled kernels only call it on partial blocks (so
    # this costs nothing on full ones), and eager FlexAttention, which ignores the block lists, stays exact.
    def tile_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        keep = tiles[h, q_idx // block_size, kv_idx // block_size]
        if causal:
            keep = keep & (q_idx >= kv_idx)
        if mask_mod is not None:
            keep = keep & mask_mod(b, h, q_idx, kv_idx)
        return keep

    partial_counts, partial_indices = block_lists(partial)
    full_counts, full_indices = block_lists(full)
    return BlockMask.from_kv_blocks(partial_counts, partial_indices, full_counts, full_indices,
                                    BLOCK_SIZE=block_size, mask_mod=tile_mod, seq_lengths=(query_len, key_len))


@functools.cache
def _compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_sparse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: Any,
                          scale: float, score_mod: Callable | None = None,
                          kernel_options: dict[str, Any] | None = None) -> torch.Tensor:
    """FlexAttention with ``block_mask`` (compiled on CUDA, eager elsewhere: forward only there)."""
    from torch.nn.attention.flex_attention import flex_attention

    function = _compiled_flex() if query.is_cuda else flex_attention
    key, value = key.to(query.dtype), value.to(query.dtype)
    with torch.autocast(query.device.type, enabled=False):
        return function(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=float(scale),
                        enable_gqa=key.shape[1] != query.shape[1], kernel_options=kernel_options)


@serializable(transient={"_block_masks": dict})
class SparseAttention(torch.nn.Module):
    """Block-sparse attention replacing one attention of a captured graph.

    Called as ``(query, key, value, attn_mask=None, scale=None)`` with the original attention's semantics;
    ``tile_mask`` (a buffer ``[H or 1, nQ, nK]``, bool) says which tiles of each head are computed.
    ``mode`` is ``sparse`` after the pass; the pass uses ``probe`` (dense, records shapes and the mask) and
    ``calibrate`` (dense, accumulates Σ|A|·|∂L/∂A| per tile into ``importance``) while planning.

    ``warmup`` (``sas.warmup``, importance pattern): the module runs dense for its first ``warmup_left``
    forward passes with gradients (training micro-batches), scoring tiles on them with an exponential
    moving average (decay ``WARMUP_DECAY`` per pass, so the latest weights count most); the next such pass
    selects ``density`` of the tiles from those scores and switches to ``sparse``. Passes without gradients
    (validation) run dense and do not count.
    """

    WARMUP_DECAY = 0.95

    def __init__(self, block_size: int, causal: bool, scale: float | None, dropout_p: float = 0.0,
                 backend: str = "auto", tile_mask: torch.Tensor | None = None) -> None:
        super().__init__()
        self.block_size = block_size
        self.causal = causal
        self.scale = scale
        self.dropout_p = dropout_p
        self.backend = backend
        self.mode = "sparse"
        self.observed: dict[str, Any] = {}
        self.importance: torch.Tensor | None = None
        self.flex_kernel_options: dict[str, Any] | None = None
        # Set by the pass when every head's mask is the block-diagonal ``block`` pattern of this many tokens:
        # backend=auto then runs ``chunked_attention`` (dense SDPA over chunks: flash on CUDA).
        self.chunk = 0
        self.warmup_left = 0
        self.density = 1.0
        self.register_buffer("tile_mask", tile_mask if tile_mask is not None else
                             torch.ones(1, 1, 1, dtype=torch.bool))
        self._block_masks: dict[tuple, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_block_masks"] = {}  # BlockMasks hold closures: rebuilt on first use
        return state

    def extra_repr(self) -> str:
        heads, rows, cols = self.tile_mask.shape
        return (f"block_size={self.block_size}, causal={self.causal}, backend={self.backend}, "
                f"tiles={heads}x{rows}x{cols}, kept={float(self.tile_mask.float().mean()):.3f}")

    def resolve_backend(self, query: torch.Tensor, key: torch.Tensor | None = None,
                        attn_mask: torch.Tensor | None = None) -> str:
        """The kernel this call uses: the configured one; for ``auto``, ``chunked`` for a block-diagonal mask
        without a user mask (self-attention), else flex on CUDA without dropout and with tiles of a multiple
        of 128 tokens (compiled FlexAttention's training kernels use 128-token blocks on Hopper and refuse
        smaller tiles, seen on an H200), else gather."""
        if self.backend != "auto":
            return self.backend
        key_len = query.shape[-2] if key is None else key.shape[-2]
        if self.chunk and attn_mask is None and key_len == query.shape[-2] and \
                (self.causal or query.shape[-2] % self.chunk == 0):
            return "chunked"
        flex_ok = query.is_cuda and self.dropout_p == 0 and self.block_size % 128 == 0
        return "flex" if flex_ok else "gather"

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_mask: torch.Tensor | None = None, scale: float | torch.Tensor | None = None) -> torch.Tensor:
        """Attention output ``[B, H, Sq, Dv]`` (or ``[B, Sq, Dv]`` for 3-D inputs)."""
        if scale is None:
            scale = self.scale if self.scale is not None else 1.0 / math.sqrt(query.shape[-1])
        if self.mode == "probe":
            self._observe(query, key, attn_mask)
            return self._dense(query, key, value, attn_mask, scale, record=False)
        if self.mode == "calibrate":
            return self._dense(query, key, value, attn_mask, scale, record=True)
        if self.mode == "warmup":
            if not torch.is_grad_enabled():
                return self._dense(query, key, value, attn_mask, scale, record=False)
            if self.warmup_left > 0:
                self.warmup_left -= 1
                return self._dense(query, key, value, attn_mask, scale, record=True)
            self.finish_warmup()
        backend = self.resolve_backend(query, key, attn_mask)
        if backend == "chunked":
            return chunked_attention(query, key, value, self.chunk, self.causal, scale, self.dropout_p)
        if backend == "flex":
            return self._flex(query, key, value, attn_mask, scale)
        kernel = gather_attention if backend == "gather" else reference_attention
        return kernel(query, key, value, self.tile_mask, self.block_size, self.causal, scale, attn_mask,
                      self.dropout_p)

    def _flex(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attn_mask: torch.Tensor | None, scale: float | torch.Tensor) -> torch.Tensor:
        query4, key4, value4, mask4, squeezed = _as_4d(query, key, value, attn_mask)
        heads, query_len, key_len = query4.shape[1], query4.shape[2], key4.shape[2]
        score_mod = mask_mod = None
        if mask4 is not None:
            full_mask = mask4.expand(query4.shape[0], heads, query_len, key_len)
            if _is_float_mask(mask4):
                additive = full_mask.to(query4.dtype)

                def score_mod(score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
                    return score + additive[b, h, q_idx, kv_idx]
            else:
                def mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
                    return full_mask[b, h, q_idx, kv_idx]
        cache_key = (query_len, key_len, heads, str(query4.device))
        block_mask = self._block_masks.get(cache_key) if mask_mod is None else None
        if block_mask is None:
            tiles = expand_tiles(self.tile_mask.to(query4.device), heads, query_len, key_len, self.block_size).contiguous()
            block_mask = build_block_mask(tiles, self.block_size, self.causal, query_len, key_len, mask_mod)
            if mask_mod is None:
                self._block_masks[cache_key] = block_mask
        output = flex_sparse_attention(query4, key4, value4, block_mask, float(scale), score_mod,
                                       self.flex_kernel_options)
        return output.squeeze(1) if squeezed else output

    def _observe(self, query: torch.Tensor, key: torch.Tensor, attn_mask: torch.Tensor | None) -> None:
        query_len, key_len = query.shape[-2], key.shape[-2]
        observed: dict[str, Any] = {"heads": query.shape[1] if query.dim() == 4 else 1,
                                    "kv_heads": key.shape[1] if key.dim() == 4 else 1,
                                    "query_len": query_len, "key_len": key_len, "mask": None}
        if attn_mask is not None:
            with torch.no_grad():
                if attn_mask.dtype == torch.bool:
                    allowed, values_zero = attn_mask, True
                else:
                    allowed = attn_mask > torch.finfo(attn_mask.dtype).min / 2
                    values_zero = bool((attn_mask.masked_fill(~allowed, 0) == 0).all())
                tril = torch.ones(query_len, key_len, dtype=torch.bool, device=allowed.device).tril()
                subset = not bool((allowed & ~tril).any())
                exact = subset and values_zero and bool((allowed == tril).all())
            observed["mask"] = {"kind": "bool" if attn_mask.dtype == torch.bool else "additive",
                                "within_causal": subset, "exactly_causal": exact}
        self.observed = observed

    def _dense(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attn_mask: torch.Tensor | None, scale: float | torch.Tensor, record: bool) -> torch.Tensor:
        """Dense attention with this module's semantics; with ``record``, hooks the probabilities' gradient
        to accumulate the per-tile importance Σ_batch Σ_tile |A|·|∂L/∂A| into ``self.importance``."""
        query4, key4, value4, mask4, squeezed = _as_4d(query, key, value, attn_mask)
        heads, kv_heads = query4.shape[1], key4.shape[1]
        if kv_heads != heads:
            key4 = key4.repeat_interleave(heads // kv_heads, dim=1)
            value4 = value4.repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.matmul(query4, key4.transpose(-1, -2)) * scale
        query_len, key_len = scores.shape[-2], scores.shape[-1]
        if self.causal:
            tril = torch.ones(query_len, key_len, dtype=torch.bool, device=scores.device).tril()
            scores = scores.masked_fill(~tril, -math.inf)
        if mask4 is not None:
            scores = scores + mask4.to(scores.dtype) if _is_float_mask(mask4) else \
                scores.masked_fill(~mask4, -math.inf)
        probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
        if record and probs.requires_grad:
            probs.register_hook(functools.partial(self._accumulate, probs.detach()))
        if self.dropout_p > 0:
            probs = F.dropout(probs, self.dropout_p, training=True)
        output = torch.matmul(probs.to(value4.dtype), value4)
        return output.squeeze(1) if squeezed else output

    def finish_warmup(self) -> None:
        """Select ``density`` of the tiles from the importance scored so far and switch to ``sparse``
        (the tiles chosen at compile time stay if nothing was scored)."""
        from .patterns import select_important_tiles

        if self.importance is not None:
            tiles = select_important_tiles(self.importance, self.causal, self.density)
            self.tile_mask = tiles.to(self.tile_mask.device)
            self._block_masks = {}
        self.mode, self.importance, self.warmup_left = "sparse", None, 0

    def _accumulate(self, probs: torch.Tensor, grad: torch.Tensor) -> None:
        bs = self.block_size
        score = (probs.float() * grad.float()).abs().sum(0)  # [H, Sq, Sk]
        heads, query_len, key_len = score.shape
        rows, cols = math.ceil(query_len / bs), math.ceil(key_len / bs)
        score = F.pad(score, (0, cols * bs - key_len, 0, rows * bs - query_len))
        tiles = score.view(heads, rows, bs, cols, bs).sum((2, 4))
        if self.importance is None:
            self.importance = tiles
        elif self.mode == "warmup":
            self.importance = self.importance.to(tiles.device) * self.WARMUP_DECAY + tiles
        else:
            self.importance = self.importance.to(tiles.device) + tiles
