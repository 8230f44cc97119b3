"""Tests of the ``sas`` pass: kernels against the masked reference, graph rewrites on every architecture,
importance selection, training, save/load, options and their errors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import effcompile
from effcompile.capture import capture
from effcompile.errors import OptionError
from effcompile.options import build_config
from effcompile.passes.sas import StructuredAttentionSparsity
from effcompile.passes.sas.kernels import SparseAttention, gather_attention, reference_attention
from effcompile.passes.sas.patterns import (
    candidate_tiles,
    diagonal_tiles,
    fixed_pattern,
    row_quotas,
    select_important_tiles,
)
from effcompile.patterns import find_attention

from conftest import example_gpt_spec, tiny_spec

warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
SAS = StructuredAttentionSparsity


def run_sas(program, **options):
    """Apply the pass to a clone of ``program``; returns (record, rewritten program)."""
    candidate = program.clone()
    record = SAS()(candidate, build_config("sas", SAS.Config, options))
    return record, candidate


@pytest.fixture(scope="module")
def programs():
    """Captured tiny programs, once per module (capture is the slow part)."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            if name == "example":
                spec = example_gpt_spec()
            elif name.endswith("_eager"):
                spec = tiny_spec(name.removesuffix("_eager"), attn_implementation="eager")
            else:
                spec = tiny_spec(name)
            cache[name] = capture(spec)
        return cache[name]
    return get


def _inputs(batch, heads, kv_heads, query_len, key_len, head_dim, seed):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, query_len, head_dim, generator=generator, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, key_len, head_dim, generator=generator, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, key_len, head_dim, generator=generator, dtype=torch.float64)
    return [t.requires_grad_() for t in (q, k, v)]


def _forward_backward(kernel, q, k, v, *args):
    output = kernel(q, k, v, *args)
    weights = torch.linspace(-1, 1, output.numel(), dtype=output.dtype).view_as(output)
    grads = torch.autograd.grad((output * weights).sum(), (q, k, v))
    return (output, *grads)


@settings(max_examples=10, deadline=None)
@given(batch=st.integers(1, 2), kv_heads=st.integers(1, 2), group=st.integers(1, 2), blocks=st.integers(1, 4),
       block_size=st.sampled_from([2, 4, 8]), trim=st.integers(0, 1), causal=st.booleans(),
       mask_kind=st.sampled_from(["none", "bool", "additive"]), seed=st.integers(0, 1000))
def test_gather_and_flex_equal_masked_reference(batch, kv_heads, group, blocks, block_size, trim, causal, mask_kind,
                                                seed):
    """The block-gather kernel equals the masked-SDPA reference on random shapes (forward and gradients),
    causal or not, with GQA, boolean or additive user masks, lengths that are not tile multiples."""
    heads = kv_heads * group
    seq = max(1, blocks * block_size - trim)
    q, k, v = _inputs(batch, heads, kv_heads, seq, seq, 8, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    tiles = torch.rand(heads, blocks, blocks, generator=generator) < 0.5
    tiles |= diagonal_tiles(blocks, blocks)
    mask = None
    if mask_kind == "bool":
        mask = (torch.rand(batch, 1, seq, seq, generator=generator) < 0.7) | torch.eye(seq, dtype=torch.bool)
    elif mask_kind == "additive":
        mask = torch.randn(1, heads, seq, seq, generator=generator, dtype=torch.float64)
    args = (tiles, block_size, causal, 0.37, mask)
    expected = _forward_backward(reference_attention, q, k, v, *args)
    got = _forward_backward(gather_attention, q, k, v, *args)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("causal, mask_kind, seq", [(True, "bool", 14), (False, "additive", 16), (True, "none", 16)])
def test_flex_equals_masked_reference(causal, mask_kind, seq):
    """The flex backend's BlockMask (full/partial block lists + mask function) equals the reference (forward;
    FlexAttention has no CPU backward, and eager flex evaluates the mask function everywhere)."""
    q, k, v = _inputs(2, 4, 2, seq, seq, 8, 3)
    generator = torch.Generator().manual_seed(4)
    tiles = (torch.rand(4, 4, 4, generator=generator) < 0.5) | diagonal_tiles(4, 4)
    mask = None
    if mask_kind == "bool":
        mask = (torch.rand(2, 1, seq, seq, generator=generator) < 0.7) | torch.eye(seq, dtype=torch.bool)
    elif mask_kind == "additive":
        mask = torch.randn(1, 4, seq, seq, generator=generator)
    expected = reference_attention(q.float(), k.float(), v.float(), tiles, 4, causal, 0.37, mask)
    module = SparseAttention(4, causal, 0.37, backend="flex", tile_mask=tiles)
    with torch.no_grad():
        torch.testing.assert_close(module(q.float(), k.float(), v.float(), mask), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backend", ["gather", "reference", "flex"])
def test_full_density_equals_dense(backend, causal):
    """With every tile kept, each backend equals dense SDPA to round-off (GQA, length not a tile multiple)."""
    q, k, v = _inputs(2, 4, 2, 21, 21, 8, 0)
    module = SparseAttention(4, causal, None, backend=backend, tile_mask=torch.ones(1, 6, 6, dtype=torch.bool))
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    if backend == "flex":
        with torch.no_grad():
            torch.testing.assert_close(module(q.float(), k.float(), v.float()), dense.float(), rtol=1e-4, atol=1e-5)
        return
    expected = torch.autograd.grad(dense.sum(), (q, k, v))
    output = module(q, k, v)
    torch.testing.assert_close(output, dense, rtol=1e-10, atol=1e-10)
    for e, g in zip(expected, torch.autograd.grad(output.sum(), (q, k, v))):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def test_gather_dropout_drops_probabilities():
    """Dropout is applied inside the sparse kernel (outputs vary with the seed, the mean is kept)."""
    q, k, v = _inputs(1, 2, 2, 16, 16, 8, 1)
    module = SparseAttention(4, True, None, dropout_p=0.5, backend="gather", tile_mask=torch.ones(1, 4, 4, dtype=torch.bool))
    torch.manual_seed(0)
    first = module(q, k, v)
    torch.manual_seed(1)
    second = module(q, k, v)
    assert not torch.allclose(first, second)
    assert torch.isfinite(first).all()


def test_fixed_patterns_keep_diagonal_and_causality():
    """Each fixed pattern keeps the diagonal, stays causal, and has its documented shape."""
    for pattern in ("local", "block", "strided", "global", "dense"):
        tiles = fixed_pattern(pattern, 8, 8, 4, True, window=8, block=8, stride=12, n_global=4)
        assert tiles.diagonal().all()
        assert not (tiles & ~candidate_tiles(8, 8, True)).any()
    local = fixed_pattern("local", 8, 8, 4, True, window=8, block=4, stride=4, n_global=0)
    assert local.sum(1).tolist() == [1, 2, 2, 2, 2, 2, 2, 2]
    strided = fixed_pattern("strided", 8, 8, 4, True, window=4, block=4, stride=12, n_global=0)
    assert strided[7].nonzero().flatten().tolist() == [1, 4, 7]
    glob = fixed_pattern("global", 8, 8, 4, False, window=4, block=4, stride=4, n_global=4)
    assert glob[:, 0].all() and glob[0].all() and glob[5].sum() == 2


@settings(max_examples=10, deadline=None)
@given(heads=st.integers(1, 3), blocks=st.integers(2, 9), density=st.floats(0.05, 1.0), causal=st.booleans(),
       seed=st.integers(0, 100))
def test_importance_selection_keeps_exact_density(heads, blocks, density, causal, seed):
    """Per head: exactly round(density × candidates) tiles, the diagonal included; every row keeps at least the
    common quota (all its candidates if it has fewer), each row keeps its best tiles, and the tiles beyond
    the quotas are the best of the rest."""
    scores = torch.rand(heads, blocks, blocks, generator=torch.Generator().manual_seed(seed))
    tiles = select_important_tiles(scores, causal, density)
    candidates = candidate_tiles(blocks, blocks, causal)
    target = max(blocks, round(density * int(candidates.sum())))
    assert tiles.sum((1, 2)).tolist() == [target] * heads
    assert tiles.diagonal(dim1=1, dim2=2).all()
    assert not (tiles & ~candidates).any()
    quotas = row_quotas(candidates, target)
    assert (quotas >= 1).all() and int(quotas.sum()) <= target
    assert int(candidates.sum(-1).clamp(max=int(quotas.max()) + 1).sum()) > target or quotas.max() == blocks
    off_diagonal = candidates & ~diagonal_tiles(blocks, blocks)
    for head in range(heads):
        assert (tiles[head].sum(-1) >= quotas).all()
        for row in range(blocks):
            kept = scores[head, row][tiles[head, row] & off_diagonal[row]]
            dropped = scores[head, row][~tiles[head, row] & off_diagonal[row]]
            if kept.numel() and dropped.numel():
                assert kept.min() >= dropped.max()


@pytest.mark.parametrize("name, sites, mask", [
    ("gpt2", 2, "none"),  # capture already gave SDPA is_causal=True for export's causal mask
    ("llama", 2, "none"),
    ("bert", 2, "bool mask applied within kept tiles"),
    ("llama_eager", 2, "causal mask replaced by causal tiles"),
    ("example", 4, "causal mask replaced by causal tiles"),
])
def test_sites_per_architecture(programs, name, sites, mask):
    """The report counts the rewritten sites; a causal mask becomes causal tiles, BERT's padding
    mask is kept (not causal); no attention is left for the matcher; the full pattern is exact."""
    program = programs(name)
    record, rewritten = run_sas(program, pattern="dense", block_size=4)
    assert record.changed and record.stats["rewritten"] == sites and record.stats["skipped"] == 0
    assert {site["mask"] for site in record.details["sites"]} == {mask}
    assert all(site["causal"] == (name != "bert") for site in record.details["sites"])
    assert find_attention(rewritten.gm) == []
    modules = [m for m in rewritten.gm.modules() if isinstance(m, SparseAttention)]
    assert len(modules) == sites and set(rewritten.meta["sas.block_masks"]) == {
        n.target for n in rewritten.gm.graph.nodes if n.op == "call_module" and "sas" in str(n.target)}
    torch.manual_seed(0)
    expected = program.objective(program.run())
    torch.manual_seed(0)
    torch.testing.assert_close(rewritten.objective(rewritten.run()), expected, rtol=1e-5, atol=1e-6)


def test_error_shrinks_as_window_grows(programs):
    """Approximate: the output error falls as the local window grows and vanishes when it covers all."""
    program = programs("gpt2")
    torch.manual_seed(0)
    expected = program.objective(program.run())
    errors = []
    for window in (4, 8, 16):
        _, rewritten = run_sas(program, pattern="local", block_size=4, window=window)
        torch.manual_seed(0)
        errors.append(float((rewritten.objective(rewritten.run()) - expected).abs().detach()))
    assert errors[0] > errors[2] and errors[1] > errors[2] and errors[2] < 1e-5


def test_importance_pattern_on_model(programs):
    """pattern=importance keeps exactly the target density of causal tiles per head, the diagonal included,
    and leaves no gradients behind."""
    program = programs("llama")
    record, rewritten = run_sas(program, pattern="importance", block_size=4, density=0.5, calib_steps=1)
    for mask in rewritten.meta["sas.block_masks"].values():
        assert mask.shape == (4, 4, 4)
        assert mask.sum((1, 2)).tolist() == [5] * 4  # round(0.5 × 10 causal tiles)
        assert mask.diagonal(dim1=1, dim2=2).all()
    assert all(site["density"] == 0.5 for site in record.details["sites"])
    assert all(p.grad is None for p in rewritten.gm.parameters())


def test_importance_warmup_rescores_on_training_passes(programs):
    """sas.warmup=N: the first N forward passes with gradients run dense (validation passes do not count);
    the next one selects exactly ``density`` of the tiles from the scores of those passes and runs sparse."""
    program = programs("llama")
    _, rewritten = run_sas(program, pattern="importance", block_size=4, density=0.5, calib_steps=1, warmup=3)
    modules = [m for m in rewritten.gm.modules() if isinstance(m, SparseAttention)]
    compile_time = [m.tile_mask.clone() for m in modules]
    torch.manual_seed(0)
    dense = program.objective(program.run())
    assert all(m.mode == "warmup" and m.warmup_left == 3 for m in modules)
    for _ in range(3):
        torch.manual_seed(0)
        loss = rewritten.objective(rewritten.run())
        torch.testing.assert_close(loss, dense, rtol=1e-5, atol=1e-6)  # still dense
        loss.backward()
        with torch.no_grad():  # a validation pass: dense, not counted
            rewritten.run()
    assert all(m.mode == "warmup" and m.warmup_left == 0 and m.importance is not None for m in modules)
    scores = [m.importance.clone() for m in modules]
    torch.manual_seed(0)
    sparse = rewritten.objective(rewritten.run())
    assert all(m.mode == "sparse" and m.importance is None for m in modules)
    assert float((sparse - dense).abs()) > 1e-6
    for module, score, before in zip(modules, scores, compile_time, strict=True):
        assert module.tile_mask.sum((1, 2)).tolist() == [5] * 4 and module.tile_mask.diagonal(dim1=1, dim2=2).all()
        assert torch.equal(module.tile_mask, select_important_tiles(score, True, 0.5))
        assert before.shape == module.tile_mask.shape


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_rewritten_model_trains(programs, name):
    """The sparse GPT-2 / Llama graph trains: 30 AdamW steps lower the loss."""
    _, rewritten = run_sas(programs(name), pattern="local", block_size=4, window=8, backend="gather")
    gm = rewritten.gm
    optimizer = torch.optim.AdamW(gm.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = rewritten.objective(rewritten.run())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.7 * losses[0]


def test_mixed_heads_and_second_run(programs):
    """pattern=mixed gives each head its own mask; a second run finds nothing left to rewrite."""
    _, rewritten = run_sas(programs("example"), pattern="mixed", block_size=8, heads=("local", "strided"),
                           window=8, stride=32)
    mask = next(iter(rewritten.meta["sas.block_masks"].values()))
    assert mask.shape[0] == 4 and torch.equal(mask[0], mask[2]) and not torch.equal(mask[0], mask[1])
    record = SAS()(rewritten.clone(), SAS.Config())
    assert not record.changed and "already block-sparse" in record.reason


def test_compile_verify_save_load(tmp_path):
    """Through the front door: verification reports the error; the block mask saves with the module and
    the reloaded module computes the same output."""
    result = effcompile.compile(tiny_spec("gpt2"), passes=["sas"], measure=False,
                                options={"sas": {"pattern": "local", "block_size": 4, "window": 4}})
    record = result.report.records[0]
    assert not record.exact and record.verify.output_max_rel > 1e-4
    result.save(str(tmp_path / "out"))
    loaded = effcompile.load(str(tmp_path / "out"))
    for name, mask in result.program.meta["sas.block_masks"].items():
        assert torch.equal(loaded.get_buffer(f"{name}.tile_mask"), mask)
    torch.manual_seed(0)
    expected = result.program.run()
    torch.manual_seed(0)
    got = result.program.run(loaded)
    torch.testing.assert_close(got.loss, expected.loss)


def test_no_attention_is_not_changed():
    """A model without attention: changed=False with the reason."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    result = effcompile.compile(model, torch.randn(4, 8), passes=["sas"], measure=False)
    record = result.report.records[0]
    assert not record.changed and "no attention" in record.reason


@pytest.mark.parametrize("options, message", [
    ({"pattern": "sparse"}, "sas.pattern"),
    ({"density": 0}, "density 0"),
    ({"density": 1.5}, "density 1.5"),
    ({"block_size": 0}, "block_size 0"),
    ({"block": 100}, "block 100 is not a multiple of block_size 128"),
    ({"stride": 64, "block_size": 128}, "stride 64 is not a multiple"),
    ({"heads": "local,diagonal", "pattern": "mixed"}, "unknown pattern 'diagonal'"),
    ({"heads": "local"}, "only used with pattern=mixed"),
    ({"calib_steps": 0}, "calib_steps 0"),
    ({"warmup": -1}, "warmup -1"),
    ({"warmup": 10}, "pattern=importance"),
    ({"backend": "triton"}, "sas.backend"),
])
def test_bad_options(options, message):
    """Each bad option names itself and the fix."""
    with pytest.raises(OptionError, match=message.replace(".", r"\.").replace("(", r"\(")):
        build_config("sas", SAS.Config, options)


def test_sequence_longer_than_mask_is_refused():
    """Running past the compiled length is an error that says what to do."""
    module = SparseAttention(4, True, None, backend="gather", tile_mask=torch.ones(1, 2, 2, dtype=torch.bool))
    q = torch.randn(1, 1, 12, 8)
    with pytest.raises(RuntimeError, match="compile the model at the longest sequence"):
        module(q, q, q)


class _GqaAttention(torch.nn.Module):
    """SDPA with GQA (4 query heads, 2 key/value heads) and a mask given as an input."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.kv = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q(x).view(batch, seq, 4, 4).transpose(1, 2)
        k, v = self.kv(x).view(batch, seq, 2, 8).transpose(1, 2).split(4, dim=-1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def test_gqa_and_input_mask_are_kept():
    """A mask that comes from the inputs is kept even when it is causal on the examples (another batch may
    pad), attention is still treated as causal; GQA heads are shared; the full pattern is exact."""
    x = torch.randn(2, 12, 16)
    mask = torch.ones(12, 12, dtype=torch.bool).tril().expand(2, 1, 12, 12)
    result = effcompile.compile(_GqaAttention(), (x, mask), passes=["sas"], measure=False,
                                options={"sas": {"pattern": "dense", "block_size": 4}})
    site = result.report.records[0].details["sites"][0]
    assert (site["heads"], site["kv_heads"], site["causal"]) == (4, 2, True)
    assert site["mask"] == "bool mask applied within kept tiles"
    assert result.report.records[0].verify.output_max_rel < 1e-5
    padded = mask.clone()
    padded[0, :, :, :3] = False
    padded[0, :, :3, :3] = torch.eye(3, dtype=torch.bool)
    torch.testing.assert_close(result.module(x, padded), _reference_gqa(result, x, padded))


def _reference_gqa(result, x, mask):
    """The original module's output with the compiled module's weights."""
    original = _GqaAttention()
    original.load_state_dict({k: v for k, v in result.module.state_dict().items() if not k.endswith("tile_mask")})
    return original(x, mask)


@pytest.mark.parametrize("causal, seq", [(True, 14), (True, 16), (False, 16)])
def test_chunked_kernel_equals_block_pattern(causal, seq):
    """The block pattern's fast path (one dense SDPA over chunks) equals the masked reference of the same
    tiles, forward and gradients, with GQA and (causal) a length that is not a chunk multiple."""
    q, k, v = _inputs(2, 4, 2, seq, seq, 8, 5)
    blocks = math.ceil(seq / 4)
    tiles = fixed_pattern("block", blocks, blocks, 4, causal, window=4, block=8, stride=4, n_global=0)[None]
    module = SparseAttention(4, causal, 0.3, backend="auto", tile_mask=tiles)
    module.chunk = 8
    assert module.resolve_backend(q, k) == "chunked"
    expected = _forward_backward(reference_attention, q, k, v, tiles, 4, causal, 0.3)
    for e, g in zip(expected, _forward_backward(module, q, k, v)):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10)


def test_block_pattern_uses_chunked_kernel(programs):
    """pattern=block marks every module for the chunked fast path; the result equals the gather kernel."""
    program = programs("gpt2")
    _, chunked = run_sas(program, pattern="block", block_size=4, block=8)
    _, gathered = run_sas(program, pattern="block", block_size=4, block=8, backend="gather")
    modules = [m for m in chunked.gm.modules() if isinstance(m, SparseAttention)]
    assert modules and all(m.chunk == 8 for m in modules)
    torch.testing.assert_close(chunked.run().logits, gathered.run().logits, rtol=1e-5, atol=1e-6)
