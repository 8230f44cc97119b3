"""Capture: both paths give trainable GraphModules that equal the original and know module paths."""

import pytest
import torch

import effcompile
from effcompile.capture import capture
from effcompile.errors import CaptureError
from effcompile.graph import module_path
from effcompile.spec import ModelSpec

from conftest import ARCHITECTURES, example_gpt_spec, tiny_spec


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_hf_models_capture_with_export_equal_and_train(arch):
    spec = tiny_spec(arch)
    program = capture(spec)
    assert program.capture_path == "export"
    torch.manual_seed(0)
    expected = spec.module(**spec.kwargs)
    torch.manual_seed(0)
    got = program.run()
    assert type(got) is type(expected)
    torch.testing.assert_close(got.logits, expected.logits)
    torch.testing.assert_close(got.loss, expected.loss)
    paths = {module_path(n) for n in program.gm.graph.nodes if n.op == "call_function"}
    assert any(".0." in p for p in paths), "nodes must carry the module path they came from"
    # The captured module trains: 20 AdamW steps on the example batch lower the loss.
    optimizer = torch.optim.AdamW(program.gm.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = program.objective(program.run())
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_capture_never_touches_the_users_model():
    spec = tiny_spec("gpt2")
    before = {k: v.clone() for k, v in spec.module.state_dict().items()}
    result = effcompile.compile(spec.module, spec.kwargs, passes=["identity"])
    for parameter in result.module.parameters():
        parameter.data.add_(1.0)
    for key, value in spec.module.state_dict().items():
        assert torch.equal(value, before[key])


def test_plain_module_uses_symbolic_trace_and_records_paths():
    program = capture(example_gpt_spec())
    assert program.capture_path == "symbolic_trace"
    assert "h.0.attn.qkv" in {module_path(n) for n in program.gm.graph.nodes}


def test_exported_graph_takes_other_batch_sizes():
    spec = tiny_spec("llama", batch=2)
    program = capture(spec)
    ids = torch.randint(0, 128, (3, 16))
    output = program.gm(input_ids=ids, labels=ids.clone())
    assert output.logits.shape[0] == 3


class LeavesTorch(torch.nn.Module):
    def forward(self, x):
        return x * float(x.detach().numpy().max())  # a NumPy round trip: neither path can follow it


def test_uncapturable_model_names_the_line():
    spec = ModelSpec(LeavesTorch(), (torch.randn(2, 3),))
    with pytest.raises(CaptureError) as error:
        capture(spec)
    message = str(error.value)
    assert "test_capture.py" in message and "symbolic_trace" in message and "torch.export" in message


class DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 3)

    def forward(self, x):
        mask = x.lt(0)
        if not mask.any():  # a Python branch on a tensor's value (FSMT's padding mask, LED's global attention)
            mask = None
        y = self.linear(x)
        return y if mask is None else y.masked_fill(mask, 0.0)


def test_data_dependent_branch_is_captured_as_the_example_takes_it_and_checked_at_run_time(tmp_path):
    positive = torch.rand(2, 3) + 0.1
    model = DataDependent()
    program = capture(ModelSpec(model, (positive,)))
    [branch] = program.meta["data_branches"]
    assert "test_capture.py" in branch
    # Exact on inputs that branch as the example did, with gradients.
    other = torch.rand(4, 3) + 0.1
    torch.testing.assert_close(program.gm(other), model(other))
    # Any input that branches otherwise raises, naming the line; never the example's branch computed silently.
    negative = positive.clone()
    negative[0, 0] = -1.0
    with pytest.raises(RuntimeError, match="different branch on a tensor's value.*test_capture.py"):
        program.gm(negative)
    # The same holds for the compiled result, after a save and a load (the check is part of the saved graph).
    result = effcompile.compile(model, (positive,), passes=["identity"])
    assert result.report.records[0].verify.ok
    effcompile.save(result, str(tmp_path / "out"))
    loaded = effcompile.load(str(tmp_path / "out"))
    torch.testing.assert_close(loaded(other), model(other))
    with pytest.raises(RuntimeError, match="different branch on a tensor's value"):
        loaded(negative)


# Architectures beyond the three the passes are tested on: decoder variants, an encoder, seq2seq,
# and GPT-Neo's eager (explicit) attention.
OTHER_ARCHITECTURES = {"mistral": ("sdpa", 15), "qwen2": ("sdpa", 15), "gpt_neox": ("sdpa", 9),
                       "roberta": ("sdpa", 14), "t5": ("sdpa", 33), "gpt_neo": ("explicit", 13)}


@pytest.mark.parametrize("model_type", sorted(OTHER_ARCHITECTURES))
def test_other_hf_architectures_capture_verify_and_match(model_type):
    from effcompile.patterns import find_attention, find_linears
    from effcompile.spec import load_hf_spec

    from conftest import generic_tiny_overrides

    spec = load_hf_spec(model_type, generic_tiny_overrides(model_type), batch=2, seq=16)
    result = effcompile.compile(spec, passes=["identity"], measure=False)
    verify = result.report.record("identity").verify
    assert verify.ok and verify.output_max_abs == 0.0 and verify.grads_compared > 0
    kind, linears = OTHER_ARCHITECTURES[model_type]
    assert len(find_linears(result.module)) == linears
    attention = find_attention(result.module)
    assert attention and {a.kind for a in attention} == {kind}


def test_exported_graph_runs_under_autocast():
    program = capture(tiny_spec("llama"))
    with torch.autocast("cpu", torch.bfloat16):
        output = program.run()
    output.loss.backward()
    assert torch.isfinite(output.loss)


def test_static_batch_capture_equals_the_model():
    spec = tiny_spec("gpt2")
    program = capture(spec, dynamic_batch=False)
    assert not program.gm.meta.get("dynamic_batch")
    torch.manual_seed(0)
    expected = spec.module(**spec.kwargs)
    torch.testing.assert_close(program.run().logits, expected.logits)


@pytest.mark.parametrize("arch, gqa", [("gpt2", False), ("llama", True), ("bert", False)])
def test_capture_gives_sdpa_its_eager_arguments(arch, gqa):
    """Export materialises Hugging Face's causal mask and repeat_kv copies; capture gives SDPA is_causal=True
    (and enable_gqa on the un-repeated key/value where the model groups heads) back, exactly. BERT's
    padding mask is not causal and stays."""
    from effcompile.patterns import find_attention

    spec = tiny_spec(arch, num_key_value_heads=2) if arch == "llama" else tiny_spec(arch)
    program = capture(spec)
    plain = capture(spec, canonical=False)
    sites = find_attention(program.gm)
    assert sites and all(s.kind == "sdpa" for s in sites)
    causal = arch != "bert"
    assert program.meta["causal_sdpa"] == (len(sites) if causal else 0)
    assert all(s.is_causal == causal and (s.attn_mask is None) == causal for s in sites)
    assert all(bool(s.node.kwargs.get("enable_gqa")) == gqa for s in sites)
    torch.manual_seed(0)
    expected = plain.objective(plain.run())
    expected.backward()
    torch.manual_seed(0)
    got = program.objective(program.run())
    got.backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for (name, a), (_, b) in zip(program.gm.named_parameters(), plain.gm.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_capture_returns_logits_before_the_loss_upcast():
    """HF returns the lm_head logits and upcasts a copy for its loss; at float32 capture the upcast was a
    no-op, so export returned its result. Capture returns the logits themselves: under low precision the
    graph then returns low-precision logits (as eager autocast does) and torch.compile keeps no float32 copy."""
    program = capture(tiny_spec("gpt2"))
    assert program.meta["uncast_outputs"] == 1
    output = next(n for n in program.gm.graph.nodes if n.op == "output")
    logits = output.args[0][1]
    assert logits.target is torch.ops.aten.linear.default
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = program.run()
    assert result["logits"].dtype == torch.bfloat16 and result["loss"].dtype == torch.float32


def test_loss_boundary_splits_compiled_graph_at_the_logits():
    """The logits are returned and read by the loss head. Compiled as one graph, a loop that drops the
    logits output leaves AOTAutograd a missing tangent, which it fills with an all-zero logits-sized tensor
    at the start of backward; capture marks a graph break after the logits (as HF's loss function breaks the
    graph), so the logits' gradient arrives from the loss instead. Eager results do not change."""
    from torch._dynamo.backends.common import aot_autograd

    from effcompile.canonical import is_loss_boundary

    program = capture(tiny_spec("gpt2"))
    assert program.meta["loss_boundary"] == 1
    marker = next(n for n in program.gm.graph.nodes if is_loss_boundary(n))
    assert marker.prev.target is torch.ops.aten.linear.default  # right after the logits
    program.gm.graph.eliminate_dead_code()  # passes clean up with DCE: the marker must survive it
    assert any(is_loss_boundary(n) for n in program.gm.graph.nodes)
    logits_shape = tuple(program.run()["logits"].shape)
    zero_tangents: list[bool] = []
    graphs: list[int] = []

    def backward_compiler(gm, example_inputs):
        def run(args):
            zero_tangents.extend(bool((a == 0).all()) for a in args
                                 if isinstance(a, torch.Tensor) and tuple(a.shape) == logits_shape)
            return torch.fx.Interpreter(gm).boxed_run(args)
        run._boxed_call = True
        return run

    def forward_compiler(gm, example_inputs):
        graphs.append(1)
        return gm

    torch._dynamo.reset()
    compiled = torch.compile(program.gm, backend=aot_autograd(fw_compiler=forward_compiler, bw_compiler=backward_compiler))
    loss = compiled(*program.args, **program.kwargs)[0]  # the logits output is dropped, as training loops do
    loss.backward()
    torch._dynamo.reset()
    assert len(graphs) == 2  # body, then the loss head
    assert zero_tangents and not any(zero_tangents)


def test_data_dependent_capture_does_not_depend_on_logging_being_on():
    import logging

    logging.disable(logging.WARNING)  # as the zoo and quiet applications run
    try:
        program = capture(ModelSpec(DataDependent(), (torch.rand(2, 3) + 0.1,)))
    finally:
        logging.disable(logging.NOTSET)
    assert len(program.meta["data_branches"]) == 1


class _PaddedGPT(torch.nn.Module):
    """The bundled GPT behind a Python branch on its ids' values (pad ids 0 become 1 only when present)."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    def forward(self, idx):
        pad = idx.eq(0)
        if pad.any():
            idx = idx.masked_fill(pad, 1)
        return self.gpt(idx)


@pytest.mark.parametrize("passes", [["lora", "amp", "remat"], ["sas"], ["lowrank"], ["pipeline"]])
def test_every_pass_keeps_the_data_branch_checks(passes):
    from effcompile.data_branches import data_branch_checks

    gpt = example_gpt_spec()
    ids = gpt.args[0].clamp(min=1)  # no pad id: the branch is not taken
    spec = ModelSpec(_PaddedGPT(gpt.module), (ids,), {}, gpt.loss_fn, "padded-gpt")
    options = {"lowrank": {"rank": 8}, "sas": {"window": 8, "block_size": 8}}
    result = effcompile.compile(spec, passes=passes, options={k: v for k, v in options.items() if k in passes})
    assert all(record.changed and (record.verify is None or record.verify.ok) for record in result.report.records)
    assert data_branch_checks(result.module), f"{passes} dropped the runtime check of the captured branch"
    padded = ids.clone()
    padded[0, 0] = 0
    with pytest.raises(RuntimeError, match="different branch on a tensor's value"):
        result.module(padded)


class _ConvertsItsRouter(torch.nn.Module):
    """Switch Transformers' router converts its own classifier inside forward (a no-op in float32)."""

    def __init__(self):
        super().__init__()
        self.classifier = torch.nn.Linear(4, 4)

    def forward(self, x):
        self.classifier = self.classifier.to(torch.float32)
        return self.classifier(x)


def test_a_no_op_module_conversion_inside_forward_is_captured():
    ConvertsItsRouter = type("ConvertsItsRouter", (_ConvertsItsRouter,), {"__module__": "transformers.fake"})
    model = ConvertsItsRouter()  # an HF-looking class: export, not symbolic tracing
    x = torch.randn(3, 4)
    original_to = torch.nn.Module.to
    program = capture(ModelSpec(model, (x,)))
    assert program.capture_path == "export"
    torch.testing.assert_close(program.gm(x), model(x))
    assert torch.nn.Module.to is original_to  # the export-time stand-in is gone after capture
