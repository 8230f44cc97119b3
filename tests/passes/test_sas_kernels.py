"""``sas`` below the pass: token patterns and their tiles against brute force, every kernel against the
token-level masked reference (forward and gradients), importance selection and scoring, the mask cache."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from effcompile.passes.sas.flash import FlashPlan, flash_groups_attention, flash_plan
from effcompile.passes.sas.importance import row_quotas, scored_attention, select_important_tiles, tile_scores
from effcompile.passes.sas.kernels import (
    build_block_mask,
    chunked_attention,
    flex_sparse_attention,
    gather_attention,
    gather_plan,
    reference_attention,
)
from effcompile.passes.sas.module import SparseAttention
from effcompile.passes.sas.patterns import (
    HeadPattern,
    TokenMask,
    candidate_tiles,
    diagonal_tiles,
    head_pattern,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")
NAMES = ("local", "block", "strided", "global", "dense")


def _inputs(batch, heads, kv_heads, query_len, key_len, head_dim, seed):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, query_len, head_dim, generator=generator, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, key_len, head_dim, generator=generator, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, key_len, head_dim, generator=generator, dtype=torch.float64)
    return [t.requires_grad_() for t in (q, k, v)]


def _forward_backward(kernel, q, k, v):
    output = kernel(q, k, v)
    weights = torch.linspace(-1, 1, output.numel(), dtype=output.dtype).view_as(output)
    return (output, *torch.autograd.grad((output * weights).sum(), (q, k, v)))


def _assert_same(expected, got):
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10)


def _brute_pairs(mask: TokenMask, query_len: int, key_len: int) -> torch.Tensor:
    """The attended pairs by evaluating every rule literally (independent of ``TokenMask.predicate``)."""
    heads = mask.pattern_heads
    out = torch.zeros(heads, query_len, key_len, dtype=torch.bool)
    for h in range(heads):
        rule = mask.head(h)
        for q in range(query_len):
            for k in range(key_len):
                keep = rule.dense or abs(q - k) < rule.window or (rule.block and q // rule.block == k // rule.block) \
                    or (rule.stride and (q - k) % rule.stride == 0) or q < rule.n_global or k < rule.n_global
                if rule.tiles:
                    tiles = mask.tiles[h if mask.tiles.shape[0] > 1 else 0]
                    keep = keep or bool(tiles[q // mask.block_size, k // mask.block_size])
                out[h, q, k] = keep and (k <= q or not mask.causal)
    return out


patterns = st.tuples(st.sampled_from(NAMES), st.integers(1, 12), st.integers(1, 10), st.integers(1, 7),
                     st.integers(0, 5))


def _mask(specs, causal, block_size) -> TokenMask:
    return TokenMask(tuple(head_pattern(n, window=w, block=b, stride=s, n_global=g) for n, w, b, s, g in specs),
                     causal, block_size)


@settings(max_examples=40, deadline=None)
@given(specs=st.lists(patterns, min_size=1, max_size=3), causal=st.booleans(), block_size=st.sampled_from([1, 2, 3, 4, 8]),
       query_len=st.integers(1, 20), key_len=st.integers(1, 20))
def test_tiles_and_counts_equal_brute_force(specs, causal, block_size, query_len, key_len):
    """Token pairs, kept tiles (exact), full tiles (never claimed wrongly), pair counts and empty queries
    equal a literal evaluation of each rule, for every pattern, length and tile size (partial tiles too)."""
    mask = _mask(specs, causal, block_size)
    pairs = _brute_pairs(mask, query_len, key_len)
    assert torch.equal(mask.token_mask(query_len, key_len), pairs)
    classes = mask.tile_classes(query_len, key_len)
    padded = torch.zeros(pairs.shape[0], classes.kept.shape[1] * block_size, classes.kept.shape[2] * block_size,
                         dtype=torch.bool)
    padded[:, :query_len, :key_len] = pairs
    tiles = padded.unflatten(1, (-1, block_size)).unflatten(3, (-1, block_size))
    assert torch.equal(classes.kept, tiles.any(4).any(2))
    valid = torch.zeros_like(padded)
    valid[:, :query_len, :key_len] = True
    tile_valid = valid.unflatten(1, (-1, block_size)).unflatten(3, (-1, block_size))
    all_pairs = (tiles | ~tile_valid).all(4).all(2)
    assert not (classes.full & ~all_pairs).any()
    stats = mask.stats(query_len, key_len)
    assert stats.kept_pairs == int(pairs.sum())
    assert stats.empty_queries == int((~pairs.any(-1)).sum())


def test_local_window_semantics():
    """Causal: the last W keys including the query's own (Mistral); non-causal: W - 1 either side."""
    causal = TokenMask((head_pattern("local", window=3),), True, 4).token_mask(6, 6)[0]
    assert causal[5].nonzero().flatten().tolist() == [3, 4, 5]
    both = TokenMask((head_pattern("local", window=3),), False, 4).token_mask(6, 6)[0]
    assert both[2].nonzero().flatten().tolist() == [0, 1, 2, 3, 4]
    strided = TokenMask((head_pattern("strided", stride=3),), True, 4).token_mask(8, 8)[0]
    assert strided[7].nonzero().flatten().tolist() == [1, 4, 7]
    glob = TokenMask((head_pattern("global", window=1, n_global=2),), False, 4).token_mask(6, 6)[0]
    assert glob[4].nonzero().flatten().tolist() == [0, 1, 4] and glob[0].all()


def _random_mask(kind, heads, blocks, block_size, causal, seed):
    generator = torch.Generator().manual_seed(seed)
    if kind == "importance":
        scores = torch.rand(heads, blocks, blocks, generator=generator)
        tiles = select_important_tiles(scores, causal, 0.5)
        return TokenMask((HeadPattern("importance", tiles=True),), causal, block_size, tiles)
    names = NAMES if kind == "mixed" else (kind,)
    sizes = torch.randint(1, 3 * block_size, (4,), generator=generator).tolist()
    specs = [(names[(seed + h) % len(names)], *sizes[:3], sizes[3] % 4) for h in range(heads if kind == "mixed" else 1)]
    return _mask(specs, causal, block_size)


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 2), kv_heads=st.integers(1, 2), group=st.integers(1, 2), length=st.integers(1, 19),
       block_size=st.sampled_from([2, 4, 8]), causal=st.booleans(),
       kind=st.sampled_from(["local", "block", "strided", "global", "mixed", "importance"]),
       mask_kind=st.sampled_from(["none", "bool", "additive"]), seed=st.integers(0, 1000))
# Heads of different patterns: a dense head's full tiles once made the diagonal head's partial tiles pass as
# full (gather_plan read the first rows' full flags, not the group's), so its mask was dropped.
@example(batch=1, kv_heads=1, group=2, length=4, block_size=2, causal=False, kind="mixed", mask_kind="none", seed=1)
def test_kernels_equal_token_masked_reference(batch, kv_heads, group, length, block_size, causal, kind, mask_kind, seed):
    """gather, flex (forward: no CPU backward), and flash where it applies equal SDPA with the token-level mask,
    forward and gradients: random shapes, GQA, partial tiles, windows smaller than a tile, ragged lengths,
    boolean or additive user masks."""
    heads = kv_heads * group
    mask = _random_mask(kind, heads, math.ceil(length / block_size), block_size, causal, seed)
    if mask.stats(length, length).empty_queries:
        return
    q, k, v = _inputs(batch, heads, kv_heads, length, length, 8, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    user = None
    if mask_kind == "bool":
        user = (torch.rand(batch, 1, length, length, generator=generator) < 0.7) | torch.eye(length, dtype=torch.bool)
    elif mask_kind == "additive":
        user = torch.randn(1, heads, length, length, generator=generator, dtype=torch.float64)
    expected = _forward_backward(lambda a, b, c: reference_attention(a, b, c, mask, 0.37, user), q, k, v)
    classes = mask.tile_classes(length, length)
    plan = gather_plan(mask, classes, heads, length, length, torch.device("cpu"))
    _assert_same(expected, _forward_backward(lambda a, b, c: gather_attention(a, b, c, plan, block_size, 0.37, user),
                                             q, k, v))
    if user is None:
        block_mask = build_block_mask(mask, classes, heads, length, length, torch.device("cpu"))
        flex = flex_sparse_attention(q.detach(), k.detach(), v.detach(), block_mask, 0.37)
        torch.testing.assert_close(flex, expected[0], rtol=1e-9, atol=1e-10)
        flash = flash_plan(classes, heads, kv_heads, causal, length, length, block_size, torch.device("cpu"))
        if isinstance(flash, FlashPlan):
            _assert_same(expected, _forward_backward(
                lambda a, b, c: flash_groups_attention(a, b, c, flash, block_size, 0.37), q, k, v))


@pytest.mark.parametrize("backend", ["gather", "flash", "reference"])
def test_importance_groups_run_as_flash(backend):
    """Grouped importance tiles (sas.group) form flash groups of that many query blocks; each backend of the
    module equals the reference."""
    tiles = select_important_tiles(torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(0)), True, 0.4, group=4)
    module = SparseAttention(4, True, 0.3, backend=backend, tile_mask=tiles,
                             head_patterns=(HeadPattern("importance", tiles=True),))
    plan = flash_plan(module.tile_classes(32, 32), 2, 1, True, 32, 32, 4, torch.device("cpu"))
    assert isinstance(plan, FlashPlan) and plan.groups == 4  # 2 heads × 2 groups of 4 query blocks
    q, k, v = _inputs(2, 2, 1, 32, 32, 8, 1)
    expected = _forward_backward(lambda a, b, c: reference_attention(a, b, c, module.mask, 0.3), q, k, v)
    _assert_same(expected, _forward_backward(module, q, k, v))


def test_flash_refuses_partial_tiles():
    """A token-exact local window has partial tiles off the diagonal: the flash kernel says so and the module
    refuses to run it rather than rounding."""
    module = SparseAttention(4, True, None, backend="flash", head_patterns=(head_pattern("local", window=6),))
    q = torch.randn(1, 1, 16, 8)
    with pytest.raises(RuntimeError, match="partial tiles off the diagonal"):
        module(q, q, q)


def test_window_equal_to_sequence_is_dense():
    """window = sequence length keeps every pair: each backend equals dense causal SDPA to round-off."""
    q, k, v = _inputs(2, 4, 2, 20, 20, 8, 7)
    expected = _forward_backward(lambda a, b, c: F.scaled_dot_product_attention(
        a, b.repeat_interleave(2, 1), c.repeat_interleave(2, 1), is_causal=True, scale=0.3), q, k, v)
    for backend in ("gather", "reference", "flash"):
        module = SparseAttention(8, True, 0.3, backend=backend, head_patterns=(head_pattern("local", window=20),))
        _assert_same(expected, _forward_backward(module, q, k, v))


def test_window_smaller_than_tile_is_exact():
    """window 2 with 8-token tiles: every tile that holds a pair is computed, but only the window's pairs count."""
    module = SparseAttention(8, True, None, backend="gather", head_patterns=(head_pattern("local", window=2),))
    q, k, v = _inputs(1, 1, 1, 16, 16, 4, 3)
    out = module(q, k, v)
    scores = (q @ k.transpose(-1, -2)) / 2
    band = torch.ones(16, 16, dtype=torch.bool).tril() & ~torch.ones(16, 16, dtype=torch.bool).tril(-2)
    expected = torch.softmax(scores.masked_fill(~band, -math.inf), -1) @ v
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))


@pytest.mark.parametrize("causal, seq, block", [(True, 14, 8), (True, 16, 5), (False, 16, 8)])
def test_chunked_kernel_equals_block_pattern(causal, seq, block):
    """The block pattern's fast path (one dense SDPA over chunks) equals the token-masked reference for any
    block size (here not a tile multiple), with GQA and a length that is not a block multiple."""
    q, k, v = _inputs(2, 4, 2, seq, seq, 8, 5)
    module = SparseAttention(4, causal, 0.3, backend="auto", head_patterns=(head_pattern("block", block=block),))
    assert module.chunk == block and module.resolve_backend(q, k) == "chunked"
    expected = _forward_backward(lambda a, b, c: reference_attention(a, b, c, module.mask, 0.3), q, k, v)
    _assert_same(expected, _forward_backward(module, q, k, v))
    direct = chunked_attention(q, k, v, block, causal, 0.3)
    torch.testing.assert_close(direct, expected[0], rtol=1e-9, atol=1e-10)


def test_gather_dropout_drops_probabilities():
    """Dropout is applied inside the sparse kernel (outputs vary with the seed)."""
    q, k, v = _inputs(1, 2, 2, 16, 16, 8, 1)
    module = SparseAttention(4, True, None, dropout_p=0.5, backend="gather", head_patterns=(head_pattern("local", window=5),))
    torch.manual_seed(0)
    first = module(q, k, v)
    torch.manual_seed(1)
    second = module(q, k, v)
    assert not torch.allclose(first, second) and torch.isfinite(first).all()


def test_sequence_longer_than_tiles_is_refused():
    """Importance tiles cover the compiled length only: longer is an error saying what to do; fixed rules
    hold at any length."""
    module = SparseAttention(4, True, None, backend="gather", tile_mask=torch.ones(1, 2, 2, dtype=torch.bool),
                             head_patterns=(HeadPattern("importance", tiles=True),))
    q = torch.randn(1, 1, 12, 8)
    with pytest.raises(RuntimeError, match="compile the model at the longest sequence"):
        module(q, q, q)
    local = SparseAttention(4, True, None, backend="gather", head_patterns=(head_pattern("local", window=3),))
    assert local(q, q, q).shape == q.shape


def test_mask_cache_is_shared_and_built_once():
    """Two modules with the same mask share one cache entry per shape; steps hit it; build time is recorded."""
    from effcompile.passes.sas.module import MaskCache

    cache = MaskCache()
    first, second = (SparseAttention(4, True, None, backend="gather", cache=cache,
                                     head_patterns=(head_pattern("local", window=5),)) for _ in range(2))
    q = torch.randn(1, 2, 16, 8)
    for _ in range(3):
        first(q, q, q)
        second(q, q, q)
    gather_keys = [key for key in cache.build_ms if key[0] == "gather"]
    assert len(gather_keys) == 1 and cache.build_ms[gather_keys[0]] >= 0
    assert cache.misses == 2 and cache.hits >= 1  # the gather plan and its tile classes, each built once


def test_scored_attention_gradients_and_scores():
    """The chunked scoring backward gives dense attention's gradients (mask gradient included) and the tile
    scores Σ|A|·|∂L/∂A| of the materialised probabilities."""
    q, k, v = _inputs(2, 2, 2, 12, 12, 4, 2)
    bias = torch.randn(2, 1, 12, 12, dtype=torch.float64, requires_grad=True)
    sink: list[torch.Tensor] = []
    got = scored_attention(q, k, v, bias, 0.4, True, 4, sink.append)
    weights = torch.randn_like(got)
    grads = torch.autograd.grad((got * weights).sum(), (q, k, v, bias))
    scores = (q @ k.transpose(-1, -2)) * 0.4 + bias
    scores = scores.masked_fill(~torch.ones(12, 12, dtype=torch.bool).tril(), -math.inf)
    probs = torch.softmax(scores, -1)
    probs.retain_grad()
    expected = probs @ v
    (expected * weights).sum().backward()
    torch.testing.assert_close(got, expected)
    for g, e in zip(grads, (q.grad, k.grad, v.grad, bias.grad)):
        torch.testing.assert_close(g, e)
    torch.testing.assert_close(sink[0], tile_scores(probs.detach(), probs.grad, 4).float())


@settings(max_examples=10, deadline=None)
@given(heads=st.integers(1, 3), blocks=st.integers(2, 9), density=st.floats(0.05, 1.0), causal=st.booleans(),
       seed=st.integers(0, 100))
def test_importance_selection_keeps_exact_density(heads, blocks, density, causal, seed):
    """Per head: exactly round(density × candidates) tiles, the diagonal included; every row keeps at least the
    common quota, each row keeps its best tiles."""
    scores = torch.rand(heads, blocks, blocks, generator=torch.Generator().manual_seed(seed))
    tiles = select_important_tiles(scores, causal, density)
    candidates = candidate_tiles(blocks, blocks, causal)
    target = max(blocks, round(density * int(candidates.sum())))
    assert tiles.sum((1, 2)).tolist() == [target] * heads
    assert tiles.diagonal(dim1=1, dim2=2).all() and not (tiles & ~candidates).any()
    quotas = row_quotas(candidates, target)
    off_diagonal = candidates & ~diagonal_tiles(blocks, blocks)
    for head in range(heads):
        assert (tiles[head].sum(-1) >= quotas).all()
        for row in range(blocks):
            kept = scores[head, row][tiles[head, row] & off_diagonal[row]]
            dropped = scores[head, row][~tiles[head, row] & off_diagonal[row]]
            if kept.numel() and dropped.numel():
                assert kept.min() >= dropped.max()


@settings(max_examples=10, deadline=None)
@given(blocks=st.integers(2, 12), group=st.integers(2, 4), density=st.floats(0.05, 1.0), seed=st.integers(0, 100))
def test_grouped_selection_shares_key_sets(blocks, group, density, seed):
    """group > 1: the query blocks of a group keep their own span (causal) and one shared set of earlier key
    blocks; the kept tiles stay within group - 1 of the target (never above it unless the spans alone are)."""
    scores = torch.rand(2, blocks, blocks, generator=torch.Generator().manual_seed(seed))
    tiles = select_important_tiles(scores, True, density, group)
    candidates = candidate_tiles(blocks, blocks, True)
    assert not (tiles & ~candidates).any()
    spans = (torch.arange(blocks)[:, None] // group == torch.arange(blocks)[None, :] // group) & candidates
    target = max(int(spans.sum()), round(density * int(candidates.sum())))
    for head in range(2):
        assert (tiles[head] | ~spans).all()
        assert target - group < int(tiles[head].sum()) <= target
        for start in range(0, blocks, group):
            rows = tiles[head, start:start + group, :start]
            assert (rows == rows[0]).all()


def test_row_emptied_by_the_user_mask_gives_zero():
    """A query row the user's mask empties (a padding query) gives 0 and finite gradients, as SDPA does."""
    q, k, v = _inputs(1, 2, 2, 8, 8, 4, 4)
    user = torch.ones(8, 8, dtype=torch.bool)
    user[5] = False
    mask = TokenMask((head_pattern("local", window=3),), False, 4)
    expected = _forward_backward(lambda a, b, c: reference_attention(a, b, c, mask, 0.5, user), q, k, v)
    plan = gather_plan(mask, mask.tile_classes(8, 8), 2, 8, 8, torch.device("cpu"))
    got = _forward_backward(lambda a, b, c: gather_attention(a, b, c, plan, 4, 0.5, user), q, k, v)
    _assert_same(expected, got)
    assert (got[0][:, :, 5] == 0).all() and all(torch.isfinite(g).all() for g in got)
