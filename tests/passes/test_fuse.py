"""The ``fuse`` pass: sites matched per architecture, each fused op exact against the subgraph it replaced
(outputs and gradients at float32), idempotence, reasons, options, composition, torch.compile, ONNX export,
and the Liger backend's dispatch (with a fake Liger module: no GPU here)."""

from __future__ import annotations

import importlib.util
import types

import pytest
import torch
import torch.nn.functional as F

import effcompile
from effcompile.errors import OptionError
from effcompile.pass_manager import PassManager, resolve_passes
from effcompile.passes.fuse import fused_kind, liger, ops, reference

from conftest import example_gpt_spec, generic_tiny_overrides, tiny_spec

EXPECTED = {  # fused sites per tiny architecture (2 layers; the example GPT has 4 and its loss outside the graph)
    "llama": {"rms_norm": 5, "layer_norm": 0, "glu": 2, "rope": 2, "linear_cross_entropy": 1},
    "gpt2": {"rms_norm": 0, "layer_norm": 5, "glu": 0, "rope": 0, "linear_cross_entropy": 1},
    "bert": {"rms_norm": 0, "layer_norm": 6, "glu": 0, "rope": 0, "linear_cross_entropy": 1},
    "example": {"rms_norm": 0, "layer_norm": 9, "glu": 0, "rope": 0, "linear_cross_entropy": 0},
}


def _spec(arch: str):
    return example_gpt_spec() if arch == "example" else tiny_spec(arch)


def _run(spec, passes=("fuse",), options=None):
    program = effcompile.capture.capture(spec)
    return PassManager(resolve_passes(list(passes), options or {}), measure=False).run(program)


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_sites_per_architecture_and_exact(arch):
    run = _run(_spec(arch))
    record = run.records[0]
    assert record.details["counts"] == EXPECTED[arch]
    assert record.verify.ok and record.exact
    assert record.verify.output_max_rel < 1e-5
    kinds = [fused_kind(n) for n in run.program.gm.graph.nodes if fused_kind(n)]
    assert sum(1 for k in kinds) == sum(EXPECTED[arch].values())


@pytest.mark.parametrize("model_type,expected", [("gemma", {"rms_norm": 5, "glu": 2, "rope": 2}),
                                                 ("qwen2", {"rms_norm": 5, "glu": 2, "rope": 2})])
def test_other_architectures(model_type, expected):
    """Gemma: RMSNorm as (1 + w.float()) and a cast at the end, GeGLU with tanh GELU; Qwen2: biases in q/k/v."""
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers missing")
    spec = effcompile.spec.load_hf_spec(model_type, generic_tiny_overrides(model_type), batch=2, seq=16)
    record = _run(spec).records[0]
    assert {k: record.details["counts"][k] for k in expected} == expected
    assert record.verify.ok, record.verify.failures


def test_second_run_changes_nothing():
    program = effcompile.capture.capture(tiny_spec("llama"))
    manager = PassManager(resolve_passes(["fuse"], {}), measure=False, verify=False)
    once = manager.run(program).program
    again = PassManager(resolve_passes(["fuse"], {}), measure=False, verify=False).run(once).records[0]
    assert not again.changed and again.reason.startswith("already fused")
    assert again.details["already_fused"]["rms_norm"] == 5


def test_nothing_to_fuse_says_why():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    record = effcompile.compile(model, (torch.randn(4, 8),), passes=["fuse"], measure=False).report.records[0]
    assert not record.changed and "no norm" in record.reason


def test_unmatched_candidates_have_reasons():
    record = _run(tiny_spec("bert")).records[0]  # GELU MLP without a gate
    assert any("not used once, by a product" in reason for reason in record.details["not_matched"]["glu"])


def test_options_are_checked():
    with pytest.raises(OptionError, match="fusions swiglu unknown"):
        resolve_passes(["fuse"], {"fuse": {"fusions": "swiglu"}})
    with pytest.raises(OptionError, match="head_rows"):
        resolve_passes(["fuse"], {"fuse": {"head_rows": -1}})
    if not torch.cuda.is_available():
        with pytest.raises(OptionError, match="backend liger needs a CUDA GPU"):
            resolve_passes(["fuse"], {"fuse": {"backend": "liger"}})
    with pytest.raises(OptionError, match="must run after 'fuse'"):
        resolve_passes(["amp", "fuse"], {})


def test_composes_with_lora_amp_remat():
    passes = ["lora", "fuse", "amp", "remat"]
    run = _run(tiny_spec("llama"), passes, {"lora": {"targets": "q_proj,v_proj,gate_proj,up_proj"},
                                            "remat": {"budget": 0.8}})
    records = {r.name: r for r in run.records}
    assert records["fuse"].details["counts"]["glu"] == 2 and records["fuse"].verify.ok
    assert records["remat"].verify.ok and records["remat"].details["chunked_loss_heads"] == []
    assert all(r.verify.ok for r in run.records)
    # amp ran the fused head's matmul in bf16 (its inputs cast to the low dtype) and the norms in float32
    head = next(n for n in run.program.gm.graph.nodes if fused_kind(n) == "linear_cross_entropy")
    assert any(a.meta.get("effcompile_amp") == "cast" for a in head.args[:2] if isinstance(a, torch.fx.Node))


# ------------------------------------------------------------------------------ op-level exactness

def _grads(fn, *tensors):
    tensors = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    out = fn(*tensors)
    outs = out if isinstance(out, tuple) else (out,)
    torch.manual_seed(1)
    total = sum((o.float() * torch.randn(o.shape)).sum() for o in outs if o is not None)
    total.backward()
    return [o.detach() for o in outs if o is not None], [t.grad for t in tensors if t.is_floating_point()]


def _assert_same(fused, plain, *tensors):
    out_f, grad_f = _grads(fused, *tensors)
    out_p, grad_p = _grads(plain, *tensors)
    for a, b in zip(out_f + grad_f, out_p + grad_p):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["llama", "gemma", "no_weight", "no_upcast"])
def test_rms_norm_op_equals_its_subgraph(variant):
    x, w = torch.randn(3, 5, 32), torch.randn(32)
    kwargs = {"llama": dict(mid_dtype=torch.float32), "gemma": dict(offset=1.0, weight_float=True,
                                                                   out_dtype=torch.float32),
              "no_weight": dict(), "no_upcast": dict(upcast=False)}[variant]
    weight = None if variant == "no_weight" else w

    def plain(x, w=None):
        xf = x.float() if kwargs.get("upcast", True) else x
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        y = y.to(kwargs["mid_dtype"]) if "mid_dtype" in kwargs else y
        if w is not None:
            y = ((1.0 + w.float()) if variant == "gemma" else w) * y
        return y

    def fused(x, w=None):
        return ops.rms_norm(x, w, 1e-6, backend="reference", **kwargs)

    _assert_same(fused, plain, *((x,) if weight is None else (x, weight)))


def test_rms_norm_saves_only_x_and_rstd():
    x = torch.randn(4, 8, 64, requires_grad=True)
    w = torch.randn(64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ops.rms_norm(x, w, 1e-6, mid_dtype=torch.float32, backend="reference")
    assert sum(t.numel() for t in saved if t is not w) == x.numel() + 4 * 8


@pytest.mark.parametrize("kind", ["silu", "gelu_tanh", "gelu"])
def test_gated_activation_equals_its_subgraph(kind):
    a, b = torch.randn(2, 7, 24), torch.randn(2, 7, 24)
    act = {"silu": F.silu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "gelu": F.gelu}[kind]
    _assert_same(lambda a, b: ops.gated_activation(a, b, kind, backend="reference"), lambda a, b: act(a) * b, a, b)


def test_rope_pair_equals_its_subgraph():
    q, k = torch.randn(2, 4, 6, 16), torch.randn(2, 2, 6, 16)
    cos, sin = torch.randn(2, 1, 6, 16), torch.randn(2, 1, 6, 16)
    plain = lambda q, k: (reference.rope_forward(q, cos, sin), reference.rope_forward(k, cos, sin))  # noqa: E731
    _assert_same(lambda q, k: ops.rotary_embedding(q, k, cos, sin, 8, backend="reference"), plain, q, k)


def test_layer_norm_equals_the_op():
    x, w, b = torch.randn(3, 4, 16), torch.randn(16), torch.randn(16)
    _assert_same(lambda x, w, b: ops.layer_norm(x, w, b, 1e-5, backend="reference"),
                 lambda x, w, b: F.layer_norm(x, (16,), w, b, 1e-5), x, w, b)


@pytest.mark.parametrize("reduction,want_logits", [(1, False), (2, False), (1, True)])
def test_linear_cross_entropy_equals_its_subgraph(reduction, want_logits):
    h, w, bias = torch.randn(2, 9, 16), torch.randn(40, 16) * 0.3, torch.randn(40)
    target = torch.randint(0, 40, (2, 9))
    target[0, :3] = -100

    def plain(h, w, bias):
        logits = F.linear(h, w, bias)
        loss = F.cross_entropy(logits.float().view(-1, 40), target.view(-1), reduction=("mean", "sum")[reduction - 1])
        return (loss, logits) if want_logits else loss

    def fused(h, w, bias):
        loss, logits = ops.linear_cross_entropy(h, w, bias, target, reduction=reduction, upcast=torch.float32,
                                                want_logits=want_logits, backend="reference", rows=5)
        return (loss, logits) if want_logits else loss

    _assert_same(fused, plain, h, w, bias)


def test_fused_head_never_holds_all_logits():
    h, w = torch.randn(64, 16, requires_grad=True), torch.randn(1000, 16, requires_grad=True)
    target = torch.randint(0, 1000, (64,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ops.linear_cross_entropy(h, w, None, target, backend="reference", rows=8)
    assert max(t.numel() for t in saved) <= w.numel() and not any(t.shape == (64, 1000) for t in saved)


# ------------------------------------------------------------------------------ compile, export, liger

def test_torch_compile_of_a_fused_model_runs():
    """dynamo + AOTAutograd (aot_eager: no C++ compiler needed) see the loss head as one custom op."""
    run = _run(tiny_spec("llama"))
    module = run.program.gm
    eager = run.program.objective(run.program.run())
    compiled = torch.compile(module, backend="aot_eager", fullgraph=False)
    loss = run.program.objective(run.program.run(compiled))
    loss.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    assert all(p.grad is not None for p in module.parameters() if p.requires_grad)


def test_torch_compile_keeps_the_loss_head_one_custom_op():
    h, w = torch.randn(24, 16), torch.randn(50, 16)
    target = torch.randint(0, 50, (24,))
    head = lambda h, w: ops.linear_cross_entropy(h, w, None, target, backend="reference", rows=7)[0]  # noqa: E731
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm

    compiled = torch.compile(head, backend=backend, fullgraph=True)
    _assert_same(compiled, lambda h, w: F.cross_entropy(F.linear(h, w), target), h, w)
    targets = {str(n.target) for g in graphs for n in g.graph.nodes}
    assert any("effcompile.linear_cross_entropy" in t for t in targets)


def test_onnx_export_traces_the_plain_ops(tmp_path):
    pytest.importorskip("onnxruntime")
    from effcompile.export.onnx import export_training_artifacts
    from effcompile.train.ort import OrtTrainer

    program = effcompile.compile(tiny_spec("llama"), passes=["fuse"], verify=False, measure=False).program
    export_training_artifacts(program, tmp_path, lr=2e-3)
    trainer = OrtTrainer(tmp_path)
    first = trainer.step(program.flat_inputs())
    torch.testing.assert_close(torch.tensor(first), program.objective(program.run()).detach(), rtol=1e-4, atol=1e-5)


def test_liger_dispatch_with_a_fake_module(monkeypatch):
    """auto/liger take Liger's kernel where it exists, the reference where Liger returns None (erf GELU);
    reference never calls Liger."""
    calls = []

    def swiglu_forward(a, b):
        calls.append("swiglu")
        return a, b, F.silu(a) * b

    fake = types.SimpleNamespace(swiglu=types.SimpleNamespace(swiglu_forward=swiglu_forward))
    monkeypatch.setattr(liger, "_ops", lambda name: getattr(fake, name))
    monkeypatch.setattr(liger, "_cuda", lambda *tensors: True)
    monkeypatch.setattr(ops, "kernels", lambda backend, *t: liger if backend != "reference" else reference)
    a, b = torch.randn(3, 8), torch.randn(3, 8)
    torch.testing.assert_close(ops.gated_activation(a, b, "silu", backend="auto"), F.silu(a) * b)
    assert calls == ["swiglu"]
    ops.gated_activation(a, b, "gelu", backend="liger")  # no erf kernel in Liger: the reference runs
    ops.gated_activation(a, b, "silu", backend="reference")
    assert calls == ["swiglu"]


def test_float8_is_refused_without_a_hopper_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(OptionError, match="float8 needs"):
        resolve_passes(["amp"], {"amp": {"dtype": "float8"}})


def test_compiled_kernels_mode_keeps_rms_norm_and_glu_opaque():
    x, w = torch.randn(4, 32), torch.randn(32)
    a, b = torch.randn(4, 32), torch.randn(4, 32)
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm

    def fused(x, w, a, b):
        return (ops.rms_norm(x, w, 1e-6, mid_dtype=torch.float32, backend="reference", compiled="kernels"),
                ops.gated_activation(a, b, "silu", backend="reference", compiled="kernels"))

    def plain(x, w, a, b):
        return reference.rms_norm_plain(x, w, 1e-6, 0.0, True, torch.float32, False, None), F.silu(a) * b

    _assert_same(torch.compile(fused, backend=backend, fullgraph=True), plain, x, w, a, b)
    targets = {str(n.target) for g in graphs for n in g.graph.nodes}
    assert any("effcompile.rms_norm" in t for t in targets) and any("gated_activation" in t for t in targets)
