"""Tests of the ``sas`` pass on models: sites per architecture, token-exact windows, cross-attention left dense,
the view-after-SDPA model, the bmm (DeBERTa-v2) and nn.MultiheadAttention forms, importance and warm-up,
training, save/load, the mask cache across layers, options and every error message."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import effcompile
from effcompile.capture import capture
from effcompile.errors import OptionError, PassError
from effcompile.options import build_config
from effcompile.passes.sas import SasPlan, StructuredAttentionSparsity
from effcompile.passes.sas.importance import select_important_tiles
from effcompile.passes.sas.module import SparseAttention
from effcompile.patterns import find_attention
from effcompile.spec import ModelSpec, load_hf_spec

from conftest import example_gpt_spec, generic_tiny_overrides, tiny_spec

pytestmark = pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")
SAS = StructuredAttentionSparsity


def run_sas(program, **options):
    """Apply the pass to a clone of ``program``; returns (record, rewritten program)."""
    candidate = program.clone()
    record = SAS()(candidate, build_config("sas", SAS.Config, options))
    return record, candidate


def losses(program, rewritten):
    """The objective of the original and of the rewritten program (same seed)."""
    torch.manual_seed(0)
    expected = program.objective(program.run())
    torch.manual_seed(0)
    return expected, rewritten.objective(rewritten.run())


def modules_of(program):
    return [m for m in program.gm.modules() if isinstance(m, SparseAttention)]


@pytest.fixture(scope="module")
def programs():
    """Captured tiny programs, once per module (capture is the slow part)."""
    cache: dict = {}
    builders = {
        "example": example_gpt_spec,
        "llama_eager": lambda: tiny_spec("llama", attn_implementation="eager"),
        "gpt2_128": lambda: tiny_spec("gpt2", batch=1, seq=128, n_positions=128),
        "bart": lambda: load_hf_spec("bart", {**generic_tiny_overrides("bart"), "dropout": 0.0,
                                               "attention_dropout": 0.0}, batch=2, seq=16),
        "deberta": lambda: load_hf_spec("deberta-v2", {
            **generic_tiny_overrides("deberta-v2"), "relative_attention": True, "pos_att_type": ["p2c", "c2p"],
            "max_relative_positions": 16, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
            batch=2, seq=16),
    }

    def get(name: str):
        if name not in cache:
            cache[name] = capture(builders[name]() if name in builders else tiny_spec(name))
        return cache[name]
    return get


@pytest.mark.parametrize("name, sites, mask", [
    ("gpt2", 2, "none"),  # capture already gave SDPA is_causal=True for export's causal mask
    ("llama", 2, "none"),
    ("bert", 2, "bool mask applied within kept tiles"),
    ("llama_eager", 2, "causal mask replaced by causal tiles"),
    ("example", 4, "causal mask replaced by causal tiles"),
])
def test_sites_per_architecture(programs, name, sites, mask):
    """The plan lists the rewritten sites; a causal mask becomes causal tiles, BERT's padding mask is kept (not
    causal); no attention is left for the matcher; the dense pattern is exact."""
    program = programs(name)
    record, rewritten = run_sas(program, pattern="dense", block_size=4)
    assert record.changed and record.stats["rewritten"] == sites and record.stats["skipped"] == 0
    plan = rewritten.plan(SasPlan)
    assert {site.mask for site in plan.sites} == {mask}
    assert all(site.causal == (name != "bert") for site in plan.sites)
    assert find_attention(rewritten.gm) == [] and len(modules_of(rewritten)) == sites
    assert set(plan.block_masks(rewritten.gm)) == {n.target for n in rewritten.gm.graph.nodes
                                                   if n.op == "call_module" and "sas" in str(n.target)}
    expected, got = losses(program, rewritten)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_window_smaller_than_tile_changes_the_loss(programs):
    """window=16 with 128-token tiles at seq 128: one tile is computed (tile density 100%) but only the window's
    pairs are attended (token density < 1): the model changes. window=128 keeps every pair: not rewritten."""
    program = programs("gpt2_128")
    record, rewritten = run_sas(program, pattern="local", window=16, block_size=128)
    assert record.changed and record.stats["tile_density"] == 1.0
    assert record.stats["token_density"] == pytest.approx((16 * 17 / 2 + 112 * 16) / (128 * 129 / 2), abs=1e-4)
    expected, got = losses(program, rewritten)
    assert abs(float((got - expected).detach())) > 1e-4
    record, _ = run_sas(program, pattern="local", window=128, block_size=128)
    assert not record.changed and "keeps every token pair" in record.reason


def test_error_shrinks_as_window_grows(programs):
    """Approximate: the loss error falls as the local window grows."""
    program = programs("gpt2")
    errors = []
    for window in (2, 6, 12):
        _, rewritten = run_sas(program, pattern="local", block_size=4, window=window)
        expected, got = losses(program, rewritten)
        errors.append(float((got - expected).abs().detach()))
    assert errors[0] > errors[2] and errors[1] > errors[2]


def test_cross_attention_left_dense_unless_asked(programs):
    """BART: the decoder's cross-attention (keys from the encoder) is left dense and listed with the reason; the
    encoder's self-attention stays two-sided; sas.cross=true sparsifies it too."""
    program = programs("bart")
    record, rewritten = run_sas(program, pattern="local", block_size=4, window=4)
    assert record.stats["rewritten"] == 4 and record.stats["skipped"] == 2
    skipped = record.details["skipped"]
    assert all("encoder_attn" in s["path"] and "cross-attention" in s["reason"] and "sas.cross=true" in s["reason"]
               for s in skipped)
    causal = {site.path.rsplit(".", 1)[0].split(".")[1]: site.causal for site in rewritten.plan(SasPlan).sites}
    assert causal == {"encoder": False, "decoder": True}
    assert "2 non-causal (encoder) attentions: the window is two-sided" in record.details["summary"]
    record, rewritten = run_sas(program, pattern="local", block_size=4, window=4, cross=True)
    assert record.stats["rewritten"] == 6 and record.stats["skipped"] == 0
    expected, got = losses(program, rewritten)
    assert torch.isfinite(got) and abs(float((got - expected).detach())) > 0


class _CrossLonger(torch.nn.Module):
    """Cross-attention whose 12 queries read 3 keys (a local window leaves late queries with no key)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.kv = torch.nn.Linear(8, 8), torch.nn.Linear(8, 16)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        q = self.q(x).unsqueeze(1)
        k, v = self.kv(memory).unsqueeze(1).chunk(2, dim=-1)
        return F.scaled_dot_product_attention(q, k, v)


def test_pattern_that_keeps_nothing_for_a_query_is_refused():
    """A window that leaves some query with no key is an error naming the attention and the fix."""
    model, inputs = _CrossLonger(), (torch.randn(2, 12, 8), torch.randn(2, 3, 8))
    with pytest.raises(PassError, match=r"leaves 8 \(head, query\) pairs of scaled_dot_product_attention \(12×3 tokens\) with no key to attend; widen sas.window"):
        effcompile.compile(model, inputs, passes=["sas"], measure=False, verify=False,
                           options={"sas": {"pattern": "local", "window": 2, "block_size": 4, "cross": True}})


class _ViewAfterSdpa(torch.nn.Module):
    """Attention output reshaped with ``.view`` after a transpose (legal only for SDPA's output layout)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = torch.nn.Linear(16, 48), torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, 4, 4).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out.transpose(1, 2).view(batch, seq, width))


class _ViewAfterReshapedSdpa(_ViewAfterSdpa):
    """afmoe's layout: the output goes through reshape (no copy when the strides allow) before transpose → view."""

    def forward(self, x):
        batch, seq, width = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, 4, 4).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True).reshape(batch, 4, seq, 4)
        return self.proj(out.transpose(1, 2).view(batch, seq, width))


def test_view_after_reshape_of_sdpa():
    """A view reached through reshape (and clone) of the sparse output is a reshape too (hf:afmoe)."""
    x = torch.randn(2, 12, 16)
    program = capture(ModelSpec(_ViewAfterReshapedSdpa(), (x,), {}, name="view"), path="symbolic_trace")
    record, rewritten = run_sas(program, pattern="dense", block_size=4, backend="gather")
    assert record.changed and rewritten.plan(SasPlan).sites[0].views_reshaped == 1
    torch.testing.assert_close(rewritten.run(), program.run(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", ["symbolic_trace", "export"])
def test_view_after_sdpa(path):
    """The view reading the sparse output (through the transpose) becomes a reshape: the model runs, trains
    and, with every pair kept, equals the original."""
    x = torch.randn(2, 12, 16)
    program = capture(ModelSpec(_ViewAfterSdpa(), (x,), {}, name="view"), path=path)
    record, rewritten = run_sas(program, pattern="dense", block_size=4, backend="gather")
    assert record.changed and rewritten.plan(SasPlan).sites[0].views_reshaped == 1
    torch.testing.assert_close(rewritten.run(), program.run(), rtol=1e-5, atol=1e-6)
    _, sparse = run_sas(program, pattern="local", window=3, block_size=4)
    sparse.objective(sparse.run()).backward()
    assert all(p.grad is not None for p in sparse.gm.parameters())


def test_bmm_form_with_relative_position_bias(programs):
    """DeBERTa-v2 (``bmm → + relative-position bias → view → masked_fill → softmax → view → bmm``, heads in the
    batch): matched with its head count; the bias is kept as an additive mask; dense is exact, local changes."""
    program = programs("deberta")
    sites = find_attention(program.gm)
    assert [(s.kind, s.heads_in_batch) for s in sites] == [("explicit", 4)] * 2
    record, rewritten = run_sas(program, pattern="dense", block_size=4)
    assert record.stats["rewritten"] == 2
    assert {s.mask for s in rewritten.plan(SasPlan).sites} == {"additive bias + bool mask applied within kept tiles"}
    expected, got = losses(program, rewritten)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    _, local = run_sas(program, pattern="local", block_size=4, window=3)
    expected, got = losses(program, local)
    assert abs(float((got - expected).detach())) > 1e-6


class _TinyViT(torch.nn.Module):
    """A ViT-style encoder on ``nn.MultiheadAttention`` (a leaf module under symbolic_trace)."""

    def __init__(self, batch_first: bool = True, use_weights: bool = False) -> None:
        super().__init__()
        self.patch = torch.nn.Linear(12, 16)
        self.blocks = torch.nn.ModuleList(torch.nn.MultiheadAttention(16, 4, batch_first=batch_first) for _ in range(2))
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(16) for _ in range(2))
        self.head = torch.nn.Linear(16, 3)
        self.batch_first, self.use_weights = batch_first, use_weights

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.patch(patches)
        if not self.batch_first:
            x = x.transpose(0, 1)
        for attention, norm in zip(self.blocks, self.norms):
            y = norm(x)
            out, weights = attention(y, y, y, need_weights=self.use_weights)
            x = x + out + (weights.sum() if self.use_weights else 0)
        return self.head(x.mean(1 if self.batch_first else 0))


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_modules(batch_first):
    """nn.MultiheadAttention calls become projections (the module's own parameters) around SparseAttention:
    dense is exact (outputs and gradients); local changes the output; the parameters keep their names."""
    x = torch.randn(2, 10, 12)
    program = capture(ModelSpec(_TinyViT(batch_first), (x,), {}, name="vit"))
    record, rewritten = run_sas(program, pattern="dense", block_size=4, backend="gather")
    assert record.stats["rewritten"] == 2 and {s.kind for s in rewritten.plan(SasPlan).sites} == {"module"}
    assert {n for n, _ in rewritten.gm.named_parameters()} == {n for n, _ in program.gm.named_parameters()}
    torch.testing.assert_close(rewritten.run(), program.run(), rtol=1e-5, atol=1e-6)
    grads = [torch.autograd.grad(p.run().sum(), list(p.gm.parameters())) for p in (program, rewritten)]
    for expected, got in zip(*grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    _, local = run_sas(program, pattern="local", block_size=4, window=2)
    assert not torch.allclose(local.run(), program.run())


def test_multihead_attention_weights_used_is_a_reason():
    """When the attention weights are used, the call is not rewritten and the record names the node."""
    program = capture(ModelSpec(_TinyViT(use_weights=True), (torch.randn(2, 10, 12),), {}, name="vit"))
    record, _ = run_sas(program, pattern="local", block_size=4, window=2)
    assert not record.changed and "no attention found" in record.reason
    unmatched = record.details["unmatched"]
    assert len(unmatched) == 2 and "attention weights (output 1) are used" in unmatched[0]["reason"]
    assert unmatched[0]["node"] in unmatched[0]["reason"]


def test_mask_built_once_and_shared_by_layers(programs):
    """Layers with the same mask share its kernel data: the first builds it (timed), the others reuse it; the
    record shows mask-building time beside attention time."""
    record, rewritten = run_sas(programs("gpt2"), pattern="local", block_size=4, window=5, backend="gather")
    first, second = rewritten.plan(SasPlan).sites
    assert first.mask_build_ms is not None and first.mask_build_ms > 0 and first.mask_shared_with is None
    assert second.mask_build_ms is None and second.mask_shared_with == first.target
    assert first.attention_ms > 0 and first.backend == "gather"
    assert record.stats["mask_build_ms"] > 0 and "masks built in" in record.details["summary"]
    caches = {id(m.cache) for m in modules_of(rewritten)}
    assert len(caches) == 1 and modules_of(rewritten)[0].cache.hits >= 1


def test_importance_pattern_on_model(programs):
    """pattern=importance keeps exactly the target density of causal tiles per head, the diagonal included,
    and leaves no gradients behind; density 1 is no rewrite."""
    program = programs("llama")
    record, rewritten = run_sas(program, pattern="importance", block_size=4, density=0.5, calib_steps=1)
    for mask in rewritten.plan(SasPlan).block_masks(rewritten.gm).values():
        assert mask.shape == (4, 4, 4) and mask.sum((1, 2)).tolist() == [5] * 4  # round(0.5 × 10 causal tiles)
        assert mask.diagonal(dim1=1, dim2=2).all()
    assert all(site.tile_density == 0.5 and site.token_density < 0.5 for site in rewritten.plan(SasPlan).sites)
    assert all(p.grad is None for p in rewritten.gm.parameters())
    record, _ = run_sas(program, pattern="importance", density=1.0)
    assert not record.changed and "keeps every tile" in record.reason


def test_importance_warmup_rescores_on_training_passes(programs):
    """sas.warmup=N: the first N forward passes with gradients run dense (validation passes do not count);
    the next one selects exactly ``density`` of the tiles from the scores of those passes and runs sparse."""
    program = programs("llama")
    _, rewritten = run_sas(program, pattern="importance", block_size=4, density=0.5, calib_steps=1, warmup=3)
    modules = modules_of(rewritten)
    torch.manual_seed(0)
    dense = program.objective(program.run())
    assert all(m.state == "warmup" and m.warmup_left == 3 for m in modules)
    for _ in range(3):
        torch.manual_seed(0)
        loss = rewritten.objective(rewritten.run())
        torch.testing.assert_close(loss, dense, rtol=1e-5, atol=1e-6)  # still dense
        loss.backward()
        with torch.no_grad():  # a validation pass: dense, not counted
            rewritten.run()
    assert all(m.state == "warmup" and m.warmup_left == 0 and m.importance is not None for m in modules)
    scores = [m.importance.clone() for m in modules]
    torch.manual_seed(0)
    sparse = rewritten.objective(rewritten.run())
    assert all(m.state == "sparse" and m.importance is None for m in modules)
    assert float((sparse - dense).abs()) > 1e-6
    for module, score in zip(modules, scores, strict=True):
        assert torch.equal(module.tile_mask, select_important_tiles(score, True, 0.5))


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_rewritten_model_trains(programs, name):
    """The sparse GPT-2 / Llama graph trains: 12 AdamW steps lower the loss."""
    _, rewritten = run_sas(programs(name), pattern="local", block_size=4, window=6, backend="gather")
    optimizer = torch.optim.AdamW(rewritten.gm.parameters(), lr=5e-3)
    history = []
    for _ in range(12):
        loss = rewritten.objective(rewritten.run())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append(loss.item())
    assert all(math.isfinite(x) for x in history) and history[-1] < 0.85 * history[0]


def test_mixed_heads_and_second_run(programs):
    """pattern=mixed gives each head its own rule; a second run finds nothing left to rewrite."""
    _, rewritten = run_sas(programs("example"), pattern="mixed", block_size=8, heads=("local", "strided"),
                           window=8, stride=32)
    mask = next(iter(rewritten.plan(SasPlan).block_masks(rewritten.gm).values()))
    assert mask.shape[0] == 4 and torch.equal(mask[0], mask[2]) and not torch.equal(mask[0], mask[1])
    assert rewritten.plan(SasPlan).sites[0].patterns == ("local", "strided", "local", "strided")
    record = SAS()(rewritten.clone(), SAS.Config())
    assert not record.changed and "already sparse" in record.reason


def test_compile_verify_save_load(tmp_path):
    """Through the front door: verification reports the error; the mask saves with the module and the reloaded
    module computes the same output."""
    result = effcompile.compile(tiny_spec("gpt2"), passes=["sas"], measure=False,
                                options={"sas": {"pattern": "local", "block_size": 4, "window": 4}})
    record = result.report.records[0]
    assert not record.exact and record.verify.output_max_rel > 1e-4
    result.save(str(tmp_path / "out"))
    loaded = effcompile.load(str(tmp_path / "out"))
    for name, mask in result.program.plan(SasPlan).block_masks(result.program.gm).items():
        assert torch.equal(loaded.get_buffer(f"{name}.tile_mask"), mask)
    torch.manual_seed(0)
    expected = result.program.run()
    torch.manual_seed(0)
    torch.testing.assert_close(result.program.run(loaded).loss, expected.loss)


def test_no_attention_is_not_changed():
    """A model without attention: changed=False with the reason."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    record = effcompile.compile(model, torch.randn(4, 8), passes=["sas"], measure=False).report.records[0]
    assert not record.changed and "no attention" in record.reason


def test_forced_kernel_that_cannot_run_the_mask_is_an_error(programs):
    """backend=flash on a token-exact window (partial tiles off the diagonal) is refused, not rounded."""
    with pytest.raises(PassError, match="backend=flash cannot run this mask exactly"):
        run_sas(programs("gpt2"), pattern="local", window=3, block_size=4, backend="flash")


@pytest.mark.parametrize("options, message", [
    ({"pattern": "sparse"}, "sas.pattern"),
    ({"density": 0}, "density 0"),
    ({"density": 1.5}, "density 1.5"),
    ({"block_size": 0}, "block_size 0"),
    ({"window": 0}, "window 0 must be at least 1"),
    ({"group": 2}, "group selects importance tiles"),
    ({"heads": "local,diagonal", "pattern": "mixed"}, "unknown pattern 'diagonal'"),
    ({"heads": "local"}, "only used with pattern=mixed"),
    ({"calib_steps": 0}, "calib_steps 0"),
    ({"warmup": -1}, "warmup -1"),
    ({"warmup": 10}, "pattern=importance"),
    ({"backend": "triton"}, "sas.backend"),
    ({"backend": "chunked"}, "computes the block pattern only"),
    ({"cross": "maybe"}, "sas.cross"),
])
def test_bad_options(options, message):
    """Each bad option names itself and the fix."""
    with pytest.raises(OptionError, match=message.replace(".", r"\.").replace("(", r"\(")):
        build_config("sas", SAS.Config, options)


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
    pad), attention is still treated as causal; GQA heads are shared; the dense pattern is exact."""
    x = torch.randn(2, 12, 16)
    mask = torch.ones(12, 12, dtype=torch.bool).tril().expand(2, 1, 12, 12)
    result = effcompile.compile(_GqaAttention(), (x, mask), passes=["sas"], measure=False,
                                options={"sas": {"pattern": "dense", "block_size": 4}})
    site = result.program.plan(SasPlan).sites[0]
    assert (site.heads, site.kv_heads, site.causal) == (4, 2, True)
    assert site.mask == "bool mask applied within kept tiles"
    assert result.report.records[0].verify.output_max_rel < 1e-5
    padded = mask.clone()
    padded[0, :, :, :3] = False
    padded[0, :, :3, :3] = torch.eye(3, dtype=torch.bool)
    original = _GqaAttention()
    original.load_state_dict({k: v for k, v in result.module.state_dict().items() if not k.endswith("tile_mask")})
    torch.testing.assert_close(result.module(x, padded), original(x, padded))


def test_block_pattern_uses_chunked_kernel(programs):
    """pattern=block runs the chunked kernel; the result equals the gather kernel's."""
    program = programs("gpt2")
    record, chunked = run_sas(program, pattern="block", block_size=4, block=6)
    _, gathered = run_sas(program, pattern="block", block_size=4, block=6, backend="gather")
    assert {s.backend for s in chunked.plan(SasPlan).sites} == {"chunked"}
    assert all(m.chunk == 6 for m in modules_of(chunked))
    torch.testing.assert_close(chunked.run().logits, gathered.run().logits, rtol=1e-5, atol=1e-6)


def test_projection_source_skips_norm_weights():
    """QK-norm written ``weight * normed`` (AFMoE, Gemma 3) puts a parameter first: the walk to the projection
    input follows the activations, so self-attention is not mistaken for cross-attention."""
    from effcompile.passes.sas.rewrite import projection_source
    from effcompile.patterns import find_linears

    class _QkNorm(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
            self.q_norm, self.k_norm = torch.nn.Parameter(torch.ones(8)), torch.nn.Parameter(torch.ones(8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (self.q_norm * self.q(x)) @ (self.k_norm * self.k(x)).transpose(-1, -2)

    gm = torch.fx.symbolic_trace(_QkNorm())
    linears = {site.node: site for site in find_linears(gm)}
    matmul = next(n for n in gm.graph.nodes if n.op == "call_function" and "matmul" in str(n.target))
    query, key_t = matmul.args
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    assert projection_source(query, linears) is x and projection_source(key_t, linears) is x


class _WindowedAttention(torch.nn.Module):
    """Hiera's layout: attention over [batch, heads, windows, length, head_dim]."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(8, 24)

    def forward(self, x):  # x: [batch, windows, length, 8]
        q, k, v = self.qkv(x).view(*x.shape[:3], 3, 2, 4).permute(3, 0, 4, 1, 2, 5).unbind(0)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).sum()


def test_attention_of_another_rank_is_left_dense_with_the_reason():
    model = type("Windowed", (_WindowedAttention,), {"__module__": "transformers.fake"})()  # exported
    result = effcompile.compile(model, (torch.randn(2, 3, 16, 8),), passes=["sas"],
                                options={"sas": {"block_size": 8, "window": 8}}, loss_fn=lambda out, x: out)
    record = result.report.records[0]
    assert not record.changed and "query has 5 dimensions" in record.reason
