"""``amp``: casts as graph nodes — placement, simplification, agreement with torch.autocast, float32
master weights and gradients, GradScaler with float16, training, options and their errors."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

import effcompile
from effcompile.capture import capture
from effcompile.errors import OptionError, PassError
from effcompile.options import build_config
from effcompile.pass_manager import resolve_passes
from effcompile.passes.amp import CAST, Amp
from effcompile.passes.amp.policy import LOW_PRECISION_OPS, classify, keep_fp32_names, op_name
from effcompile.program import Program
from effcompile.spec import ModelSpec

from conftest import example_gpt_spec, tiny_spec

FP32_OPS = {"layer_norm", "softmax", "_softmax", "log_softmax", "cross_entropy", "cross_entropy_loss", "pow", "rsqrt",
            "LayerNorm"}
BF16_TOLERANCE = 2e-2  # relative, about 3 bf16 ulps of the output's scale


def _amp(spec: ModelSpec, verify: bool = True, **options) -> effcompile.CompileResult:
    return effcompile.compile(spec, passes=["amp"], options={"amp": options} if options else None, verify=verify,
                              measure=False)


@pytest.fixture(scope="module")
def compiled() -> dict[str, effcompile.CompileResult]:
    """amp (defaults) on tiny GPT-2, Llama (SDPA and eager attention) and the symbolic-trace example GPT."""
    return {"gpt2": _amp(tiny_spec("gpt2")), "llama": _amp(tiny_spec("llama")),
            "llama_eager": _amp(tiny_spec("llama", attn_implementation="eager")), "gpt": _amp(example_gpt_spec())}


def _dtypes(result: effcompile.CompileResult) -> dict[torch.fx.Node, torch.dtype | None]:
    """The dtype of every node's value on the example inputs."""
    seen: dict[torch.fx.Node, torch.dtype | None] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            value = super().run_node(node)
            seen[node] = value.dtype if isinstance(value, torch.Tensor) else None
            return value

    with torch.no_grad():
        Recorder(result.module).run(*result.program.flat_inputs())
    return seen


def _op(node: torch.fx.Node, gm: torch.fx.GraphModule) -> str | None:
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))).__name__
    return op_name(node)


def _casts(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is CAST]


@pytest.mark.parametrize("name", ["gpt2", "llama", "llama_eager", "gpt"])
def test_matmuls_run_in_bf16_and_softmax_norm_loss_in_fp32(compiled, name):
    result = compiled[name]
    dtypes = _dtypes(result)
    matmuls = fp32_ops = 0
    for node in result.module.graph.nodes:
        floats = [dtypes[v] for v in node.all_input_nodes if dtypes[v] is not None and dtypes[v].is_floating_point]
        op = _op(node, result.module)
        if op in LOW_PRECISION_OPS:
            matmuls += 1
            assert floats and set(floats) == {torch.bfloat16}, (node.name, floats)
            assert dtypes[node] == torch.bfloat16
        elif op in FP32_OPS:
            fp32_ops += 1
            assert set(floats) <= {torch.float32}, (node.name, floats)
    assert matmuls == {"gpt2": 11, "llama": 17, "llama_eager": 19, "gpt": 25}[name]
    assert fp32_ops > 0
    assert all(p.dtype == torch.float32 for p in result.module.parameters())
    if name == "llama_eager":  # explicit attention: the softmax itself is in float32
        softmaxes = [n for n in result.module.graph.nodes if op_name(n) in ("softmax", "_softmax")]
        assert softmaxes and all(dtypes[n] == torch.float32 for n in softmaxes)


# Casts left after simplification, derived by hand (2 layers each):
# GPT-2 block: c_attn x,W,b + c_proj W,b (its input is SDPA's bf16 output) + c_fc x,W,b + the GELU's pow
# input back to fp32 + mlp.c_proj x,W,b (GELU's output is fp32, as under autocast) = 12; lm_head x,W = 2.
# Llama layer: q/k/v share one cast of the normed x + 3 W + o W + gate/up share x + 2 W + down W = 9, plus
# q and k after the fp32 rotary embedding = 11; lm_head x,W = 2 (no cast back: the model's own
# .float() feeds the loss and output). Example GPT block: qkv x,W,b + softmax in/out + proj W,b + mlp.0
# x,W,b + mlp.2 W,b = 12 (GELU runs in bf16); lm_head x,W + logits back to fp32 for the output = 3.
EXPECTED_CASTS = {"gpt2": (26, 2), "llama": (24, 0), "gpt": (51, 5)}


@pytest.mark.parametrize("name", ["gpt2", "llama", "gpt"])
def test_cast_count_after_simplification(compiled, name):
    result = compiled[name]
    casts = _casts(result.module)
    total, to_fp32 = EXPECTED_CASTS[name]
    assert len(casts) == total
    assert sum(1 for c in casts if c.kwargs["dtype"] == torch.float32) == to_fp32
    details = result.report.records[0].details
    assert details["casts"] == total and details["casts_removed_by_simplification"] > 0
    dtypes = _dtypes(result)
    sources = Counter((c.args[0], c.kwargs["dtype"]) for c in casts)
    assert max(sources.values()) == 1  # one cast per value and dtype
    for cast in casts:
        assert dtypes[cast.args[0]] != cast.kwargs["dtype"]  # no no-op casts
        assert not (cast.args[0].op == "call_function" and cast.args[0].target is CAST)  # no cast pairs


@pytest.mark.parametrize("name,spec", [("gpt2", lambda: tiny_spec("gpt2")), ("llama", lambda: tiny_spec("llama")),
                                       ("gpt", example_gpt_spec)])
def test_agrees_with_torch_autocast(compiled, name, spec):
    spec = spec()
    model = spec.module
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(*spec.args, **spec.kwargs)
    with torch.no_grad():
        got = compiled[name].module(*spec.args, **spec.kwargs)
    expected = expected if isinstance(expected, torch.Tensor) else expected["logits"]
    got = got if isinstance(got, torch.Tensor) else got["logits"]
    error = float((got.float() - expected.float()).abs().max() / expected.float().abs().max())
    assert error < BF16_TOLERANCE
    record = compiled[name].report.records[0]
    assert record.details["autocast"]["output_max_rel"] < BF16_TOLERANCE  # recorded by the pass itself
    assert record.verify.output_max_rel < 5e-2 and not record.verify.exact  # vs the float32 original
    # cast_outputs=auto: a graph with its own loss returns what it computed, as under autocast (bf16 logits);
    # the example GPT's loss_fn reads the logits outside the graph, so they come back in float32
    assert got.dtype == (torch.float32 if name == "gpt" else torch.bfloat16) and expected.dtype == torch.bfloat16


def test_gradients_reach_float32_parameters(compiled):
    result = compiled["gpt2"]
    reference = capture(tiny_spec("gpt2"))
    losses = []
    for gm, program in ((reference.gm, reference), (result.module, result.program)):
        gm.zero_grad(set_to_none=True)
        loss = program.objective(program.run(gm))
        loss.backward()
        losses.append(loss)
    new_grads = dict(result.module.named_parameters(remove_duplicate=False))
    for name, parameter in reference.gm.named_parameters(remove_duplicate=False):
        mine = new_grads[name]
        assert mine.dtype == torch.float32 and mine.grad is not None and mine.grad.dtype == torch.float32, name
        scale = float(parameter.grad.abs().max())
        assert float((mine.grad - parameter.grad).abs().max()) <= 5e-2 * scale + 1e-6, name
    result.module.zero_grad(set_to_none=True)


def test_float16_with_grad_scaler_skips_the_overflowing_step():
    result = _amp(tiny_spec("gpt2"), verify=False, dtype="float16", compare_autocast=False)
    module, program = result.module, result.program
    assert {c.kwargs["dtype"] for c in _casts(module)} == {torch.float16, torch.float32}
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # loss × 2^40 overflows float16 gradients

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(program.objective(program.run(module))).backward()
        scaler.step(optimizer)
        scaler.update()

    before = {k: v.detach().clone() for k, v in module.named_parameters()}
    step()
    assert scaler.get_scale() == 2.0**39  # overflow seen: scale halved, step skipped
    assert all(torch.equal(before[k], v) for k, v in module.named_parameters())
    scaler.update(2.0**8)
    step()
    assert scaler.get_scale() == 2.0**8
    assert any(not torch.equal(before[k], v) for k, v in module.named_parameters())
    assert all(p.dtype == torch.float32 for p in module.parameters())


def test_thirty_training_steps_lower_the_loss():
    result = _amp(tiny_spec("gpt2"), verify=False, compare_autocast=False)
    module, program = result.module, result.program
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        optimizer.zero_grad(set_to_none=True)
        loss = program.objective(program.run(module))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0]


def test_cast_params_once_caches_until_the_master_weight_changes(compiled):
    per_step = compiled["gpt2"].module
    result = _amp(tiny_spec("gpt2"), verify=False, cast_params="once", compare_autocast=False)
    module, program = result.module, result.program
    cache = module.amp_weights
    assert result.report.records[0].details["params_cached"] > 0 and not _any_low_cast_of_params(module)
    with torch.no_grad():
        torch.testing.assert_close(program.run(module)["logits"], program.run(per_step)["logits"])
    copies = {k: v[1] for k, v in cache._copies.items()}
    program.run(module)
    assert all(cache._copies[k][1] is copies[k] for k in copies)  # reused: weights did not change
    loss = program.objective(program.run(module))
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in module.parameters() if p.requires_grad)
    torch.optim.SGD(module.parameters(), lr=0.1).step()
    program.run(module)
    assert all(cache._copies[k][1] is not copies[k] for k in copies)  # refreshed after the step
    assert not copy.deepcopy(module).amp_weights._copies  # copies are not part of the module's state


def _any_low_cast_of_params(gm: torch.fx.GraphModule) -> bool:
    return any(c.args[0].op == "get_attr" and c.kwargs["dtype"] == torch.bfloat16 for c in _casts(gm))


def test_cast_params_once_stores_frozen_weights_in_low_precision():
    spec = tiny_spec("llama")
    for name, parameter in spec.module.named_parameters():
        parameter.requires_grad_("mlp" in name)  # freeze all but the MLPs
    result = _amp(spec, verify=False, cast_params="once", compare_autocast=False)
    stored = result.report.records[0].details["params_stored_low"]
    assert any("q_proj" in s for s in stored) and not any("mlp" in s for s in stored)
    dtypes = {n: p.dtype for n, p in result.module.named_parameters()}
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == torch.bfloat16
    assert dtypes["model.layers.0.mlp.up_proj.weight"] == torch.float32
    assert dtypes["model.embed_tokens.weight"] == torch.float32  # embedding lookups stay float32


def test_running_twice_changes_nothing_the_second_time():
    program = capture(tiny_spec("gpt2"))
    config = build_config("amp", Amp.Config, {"compare_autocast": "false"})
    first = Amp()(program, config)
    casts = len(_casts(program.gm))
    second = Amp()(program, config)
    assert first.changed and not second.changed and len(_casts(program.gm)) == casts
    with pytest.raises(PassError, match="already in bfloat16"):
        Amp()(program, build_config("amp", Amp.Config, {"dtype": "float16"}))


def test_nothing_to_run_in_low_precision_reports_unchanged():
    model = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.ReLU())
    result = effcompile.compile(model, torch.randn(2, 8), passes=["amp"])
    record = result.report.records[0]
    assert not record.changed and "no matmul" in record.reason


class _Kernel(torch.nn.Module):
    """Stands for an attention kernel another pass installs: it declares it takes bf16 inputs."""

    low_precision_ok = True

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return q * k


class _UsesKernel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.kernel = _Kernel()
        self.norm = torch.nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.kernel(x, self.proj(x)))


class _KeepKernel(torch.fx.Tracer):
    def is_leaf_module(self, module: torch.nn.Module, name: str) -> bool:
        return isinstance(module, _Kernel) or super().is_leaf_module(module, name)


def test_modules_declaring_low_precision_ok_get_low_precision_inputs():
    model = _UsesKernel()
    gm = torch.fx.GraphModule(model, _KeepKernel().trace(model))  # as another pass would leave it
    program = Program(gm, (torch.randn(2, 8),))
    record = Amp()(program, build_config("amp", Amp.Config, {}))
    assert record.changed
    dtypes = _dtypes(effcompile.CompileResult(program.gm, program, None))
    kernel = next(n for n in program.gm.graph.nodes if n.op == "call_module" and n.target == "kernel")
    assert classify(program.gm, kernel, keep_fp32_names(("norm",))) == "low"
    assert [dtypes[v] for v in kernel.all_input_nodes] == [torch.bfloat16, torch.bfloat16]
    norm = next(n for n in program.gm.graph.nodes if n.op == "call_module" and n.target == "norm")
    assert dtypes[norm.args[0]] == torch.float32


def test_keep_fp32_option_controls_the_softmax(compiled):
    default = _dtypes(compiled["gpt"])
    result = _amp(example_gpt_spec(), verify=False, keep_fp32="norm", compare_autocast=False)
    dtypes = _dtypes(result)
    softmax = [n for n in result.module.graph.nodes if op_name(n) == "softmax"]
    assert softmax and all(dtypes[n] == torch.bfloat16 for n in softmax)
    assert all(v == torch.float32 for n, v in default.items() if op_name(n) == "softmax")
    assert len(_casts(result.module)) == EXPECTED_CASTS["gpt"][0] - 8  # no softmax in/out casts


def test_causal_mask_becomes_is_causal_only_without_a_padding_mask(compiled):
    sdpa = [n for n in compiled["gpt2"].module.graph.nodes if op_name(n) == "scaled_dot_product_attention"]
    assert len(sdpa) == 2 and all(n.kwargs.get("is_causal") for n in sdpa)
    spec = tiny_spec("gpt2")
    ids = spec.kwargs["input_ids"]
    padded = torch.ones_like(ids)
    padded[0, -3:] = 0
    padded_spec = ModelSpec(spec.module, (), {"input_ids": ids, "attention_mask": padded, "labels": ids},
                            name="gpt2-padded")
    result = _amp(padded_spec, verify=False, compare_autocast=False)
    assert result.report.records[0].details["sdpa_made_causal"] == 0
    assert _amp(tiny_spec("gpt2"), verify=False, causal_mask=False, compare_autocast=False).report.records[0].details["sdpa_made_causal"] == 0


def test_option_errors_name_the_option_and_the_fix():
    with pytest.raises(OptionError, match="float8 needs .*(Hopper|torchao)"):
        build_config("amp", Amp.Config, {"dtype": "float8"})
    with pytest.raises(OptionError, match="keep_fp32 entry 'softmaxx'"):
        build_config("amp", Amp.Config, {"keep_fp32": "softmaxx,norm"})
    with pytest.raises(OptionError, match="amp.cast_params"):
        build_config("amp", Amp.Config, {"cast_params": "always"})
    assert build_config("amp", Amp.Config, {"keep_fp32": "none"}).keep_fp32 == ()


def test_save_and_load_keep_the_casts(compiled, tmp_path):
    result = compiled["llama"]
    folder = result.save(str(tmp_path / "out"))
    loaded = effcompile.load(folder)
    assert len(_casts(loaded)) == EXPECTED_CASTS["llama"][0]
    with torch.no_grad():
        torch.testing.assert_close(result.program.run(loaded)["logits"], result.program.run(result.module)["logits"])


def test_amp_state_is_a_typed_plan():
    from effcompile.passes.amp import AmpState

    result = effcompile.compile(tiny_spec("gpt2"), passes=["amp"], verify=False, measure=False)
    state = result.program.plan(AmpState)
    assert state == AmpState("bfloat16", "per_step", None, ())
    assert result.program.clone().plan(AmpState) == state
    # The precision later exact passes are verified at (issue #18 B1).
    from effcompile.plans import ComputePrecision
    assert result.program.plan(ComputePrecision) == ComputePrecision(torch.bfloat16)


def test_float8_choice_rule():
    """The cost rule that keeps first/last and small GEMMs in bf16 (GPU numerics: tools/bench_fuse.py)."""
    from effcompile.analysis import float8_gemm_choice

    assert float8_gemm_choice(4096, 14336, False, False)[0]
    assert not float8_gemm_choice(4096, 14336, True, False)[0]
    assert not float8_gemm_choice(4096, 128256, False, True)[0]
    use, why = float8_gemm_choice(1024, 4096, False, False)
    assert not use and "small GEMM" in why
    assert float8_gemm_choice(1024, 4096, False, False, min_dim=1024)[0]
    assert not float8_gemm_choice(4100, 4096, False, False)[0]
    with pytest.raises(OptionError, match="float8_min_dim"):
        resolve_passes(["amp"], {"amp": {"float8_min_dim": 0}})


class _FourierMixer(torch.nn.Module):
    """FNet's token mixing: a linear, then a 2-D FFT's real part (no bfloat16 FFT kernel exists on CPU)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.fft.fftn(self.linear(x), dim=(-2, -1)).real.square().mean()


@pytest.mark.parametrize("exported", [False, True])
def test_ffts_stay_in_float32(exported):
    model = type("Mixer", (_FourierMixer,), {"__module__": "transformers.fake"})() if exported else _FourierMixer()
    result = effcompile.compile(model, (torch.randn(2, 4, 8),), passes=["amp"], loss_fn=lambda out, x: out)
    record = result.report.records[0]
    assert record.changed and record.verify.ok
