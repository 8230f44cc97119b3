"""``lora``: sites per architecture, exactness at init, only adapters train, merge round trip, PEFT
equality and adapter files, options, errors, idempotence, save/load."""

from __future__ import annotations

import copy

import pytest
import torch

import effcompile
from effcompile.capture import capture
from effcompile.errors import OptionError, PassError
from effcompile.export.peft import load_peft_adapter, lora_state_dict, save_peft_adapter
from effcompile.pass_manager import PassManager, resolve_passes
from effcompile.passes.lora import LoraLinear, lora_modules, merge_lora, unmerge_lora

from conftest import example_gpt_spec, tiny_spec

# Default targets on each tiny architecture: GPT-2's c_attn + both c_proj (PEFT's suffix rule matches
# mlp.c_proj too), Llama's q/k/v/o, BERT's query/key/value and (found by the attention matcher) the
# attention's output dense.
EXPECTED_SITES = {"gpt2": 6, "llama": 8, "bert": 8}
WEIGHT = "transformer.h.0.attn.c_attn.weight"  # a Conv1D weight ([in, out]): merge must transpose B·A


@pytest.fixture(scope="module")
def specs():
    return {arch: tiny_spec(arch) for arch in EXPECTED_SITES}


@pytest.fixture(scope="module")
def programs(specs):
    return {arch: capture(spec) for arch, spec in specs.items()}


def run(program, options=None, passes=("lora",), verify=True):
    resolved = resolve_passes(list(passes), {"lora": options or {}} if "lora" in passes else options or {})
    result = PassManager(resolved, verify=verify, measure=False).run(program)
    return result.program, result.records[-1]


def randomise_adapters(module, seed=1, scale=0.05):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in lora_modules(module).values():
            adapter.lora_B.weight.copy_(torch.randn(adapter.lora_B.weight.shape, generator=generator) * scale)


def logits(output):
    return output.logits if hasattr(output, "logits") else output


@pytest.mark.parametrize("arch", list(EXPECTED_SITES))
def test_adapters_are_exact_at_init_and_only_they_train(programs, arch):
    program = programs[arch]
    adapted, record = run(program)
    assert record.changed and record.verify.ok and record.verify.output_max_abs == 0.0
    assert len(record.details["targets_matched"]) == EXPECTED_SITES[arch]
    calls = [n for n in adapted.gm.graph.nodes if n.op == "call_module"
             and isinstance(adapted.gm.get_submodule(n.target), LoraLinear)]
    assert len(calls) == EXPECTED_SITES[arch]
    assert record.details["trainable_after"] == sum(a.lora_A.weight.numel() + a.lora_B.weight.numel()
                                                    for a in lora_modules(adapted.gm).values())
    assert 0 < record.details["trainable_fraction"] < 0.2

    # Only adapters get gradients.
    adapted.gm.zero_grad(set_to_none=True)
    program.objective(adapted.run()).backward()
    with_grad = {name for name, p in adapted.gm.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora_A." in n or ".lora_B." in n for n in with_grad)
    assert all(not p.requires_grad for n, p in adapted.gm.named_parameters() if "lora_" not in n)

    # With every parameter trainable again, gradients of the base match the original graph's.
    reference = copy.deepcopy(program.gm)
    unfrozen = copy.deepcopy(adapted.gm)
    for p in unfrozen.parameters():
        p.requires_grad_(True)
    program.objective(program.run(reference)).backward()
    program.objective(program.run(unfrozen)).backward()
    reference_grads = dict(reference.named_parameters())
    for name, parameter in unfrozen.named_parameters():
        if name in reference_grads and reference_grads[name].grad is not None:
            torch.testing.assert_close(parameter.grad, reference_grads[name].grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_equals_peft_and_adapter_folder_loads_in_peft(specs, programs, arch, tmp_path):
    peft = pytest.importorskip("peft")
    spec = specs[arch]
    adapted, _ = run(programs[arch], {"rank": 4, "alpha": 8}, verify=False)
    randomise_adapters(adapted.gm)
    targets = ["c_attn", "c_proj"] if arch == "gpt2" else ["q_proj", "k_proj", "v_proj", "o_proj"]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0)
    peft_model = peft.get_peft_model(copy.deepcopy(spec.module), config)
    peft_model.train()
    peft_names = {n for n, _ in peft_model.named_parameters() if "lora_" in n}
    assert len(peft_names) == 2 * EXPECTED_SITES[arch]  # the same sites as ours
    outcome = peft.set_peft_model_state_dict(peft_model, lora_state_dict(adapted.gm))  # same A and B
    assert not outcome.unexpected_keys
    ours = adapted.run()
    theirs = peft_model(**spec.kwargs)
    torch.testing.assert_close(logits(ours), theirs.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-6)

    folder = save_peft_adapter(adapted, tmp_path / "adapter")
    assert (folder / "adapter_model.safetensors").exists() and (folder / "adapter_config.json").exists()
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(spec.module), str(folder))
    loaded.train()
    torch.testing.assert_close(loaded(**spec.kwargs).logits, logits(ours), rtol=1e-5, atol=1e-5)

    fresh, _ = run(programs[arch], {"rank": 4, "alpha": 8}, verify=False)
    assert load_peft_adapter(fresh.gm, folder) == 2 * EXPECTED_SITES[arch]
    torch.testing.assert_close(logits(fresh.run()), logits(ours))


def test_training_lowers_the_loss_and_merge_equals_unmerged(programs):
    program = programs["gpt2"]
    adapted, _ = run(program, {"rank": 8, "alpha": 16}, verify=False)
    module = adapted.gm
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(0)
    losses = []
    for _ in range(30):
        loss = program.objective(adapted.run())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.2, losses

    with torch.no_grad():
        unmerged = logits(adapted.run())
        base_weight = module.get_parameter(WEIGHT).clone()
        assert merge_lora(module) == EXPECTED_SITES["gpt2"]
        assert merge_lora(module) == 0  # already merged
        merged = logits(adapted.run())
        assert not torch.equal(module.get_parameter(WEIGHT), base_weight)
        assert unmerge_lora(module) == EXPECTED_SITES["gpt2"]
        again = logits(adapted.run())
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, unmerged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(module.get_parameter(WEIGHT), base_weight)


def test_merge_option_folds_a_loaded_adapter_and_gaussian_init(programs, tmp_path):
    program = programs["gpt2"]
    trained, _ = run(program, {"rank": 4, "init": "gaussian"}, verify=False)
    a = next(iter(lora_modules(trained.gm).values())).lora_A.weight.detach()
    assert abs(float(a.std()) - 1 / 4) < 0.05  # N(0, 1/r²)
    randomise_adapters(trained.gm)
    folder = save_peft_adapter(trained.gm, tmp_path / "adapter")

    merged, record = run(program, {"adapter": str(folder), "merge": True})
    assert record.changed and record.exact is False and record.details["merged"]
    assert all(a.merged and a.rank == 4 for a in lora_modules(merged.gm).values())
    torch.testing.assert_close(logits(merged.run()), logits(trained.run()), rtol=1e-5, atol=1e-5)
    # A merged model trains like the original: base parameters trainable, adapters not.
    assert all(p.requires_grad == ("lora_" not in n) for n, p in merged.gm.named_parameters())

    same, record = run(program, {"merge": True})  # fresh adapters (B = 0): merging changes nothing
    assert record.exact is True and record.verify.ok and record.verify.grads_compared > 0


def test_symbolic_trace_example_running_twice_and_save_load(tmp_path):
    result = effcompile.compile(example_gpt_spec(), passes=["lora"], options={"lora": {"targets": "qkv,proj"}},
                                measure=False)
    record = result.report.records[0]
    assert record.changed and record.verify.ok
    assert sorted(lora_modules(result.module)) == sorted(
        f"h.{i}.attn.{name}" for i in range(4) for name in ("qkv", "proj"))
    randomise_adapters(result.module)
    result.save(str(tmp_path / "out"))
    loaded = effcompile.load(str(tmp_path / "out"))
    assert len(lora_modules(loaded)) == 8
    torch.testing.assert_close(result.program.run(loaded), result.program.run(result.module))
    program = result.program
    again, second = run(program, {"targets": "qkv,proj"}, verify=False)
    assert not second.changed and "already adapted" in second.reason
    assert len(lora_modules(program.gm)) == 8
    # The default targets: the attention matcher finds the fused qkv projection and the output projection.
    plain = capture(example_gpt_spec())
    _, record = run(plain, verify=False)
    assert record.changed and record.details["module_names"] == ["proj", "qkv"]
    assert sorted(record.details["attention_projections"]) == sorted(record.details["targets_matched"])


def test_options_bias_rslora_dropout_and_globs(programs):
    program = programs["bert"]
    adapted, record = run(program, {"targets": ["*.attention.output.dense", r".*intermediate\.dense"],
                                    "train_bias": "lora_only", "rslora": True, "rank": 4, "alpha": 8,
                                    "dropout": 0.1})
    paths = record.details["targets_matched"]
    assert len(paths) == 4 and all("attention.output.dense" in p or "intermediate.dense" in p for p in paths)
    trainable = {n for n, p in adapted.gm.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.endswith(".bias")} == {f"{p}.bias" for p in paths}
    adapter = next(iter(lora_modules(adapted.gm).values()))
    assert adapter.scaling == pytest.approx(8 / 2) and isinstance(adapter.lora_dropout, torch.nn.Dropout)
    _, record = run(program, {"targets": "attention.self.query", "train_bias": "all"})
    assert record.details["targets_matched"] == [f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)]


def test_bfloat16_base_keeps_weights_low_and_is_reported_approximate(programs):
    adapted, record = run(programs["llama"], {"base_dtype": "bfloat16"}, verify=True)
    assert record.exact is False and record.verify.ok
    adapter = lora_modules(adapted.gm)["model.layers.0.self_attn.q_proj"]
    assert adapter.weight.dtype == torch.bfloat16 and adapter.lora_A.weight.dtype == torch.float32
    assert 0 < record.verify.output_max_rel < 0.05
    loss = adapted.objective(adapted.run())
    loss.backward()
    assert adapter.lora_A.weight.grad is not None and adapter.lora_A.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("options, error, message", [
    ({"rank": 0}, OptionError, "lora: rank 0 must be a positive integer"),
    ({"alpha": -1}, OptionError, "lora: alpha -1.0 must be a positive number"),
    ({"dropout": 1.0}, OptionError, "lora: dropout 1.0 must be in [0, 1)"),
    ({"init": "ones"}, OptionError, "lora.init: 'ones' is not one of zeros, gaussian"),
    ({"targets": "(q_proj"}, OptionError, "is not a valid regular expression"),
    ({"merge": True, "base_dtype": "bfloat16"}, OptionError, "use one of them"),
    ({"adapter": "/nonexistent"}, PassError, "lacks adapter_config.json"),
    ({"targets": "not_a_layer"}, PassError, "lora: targets not_a_layer match no linear layer; the linears here are named"),
])
def test_errors(programs, options, error, message):
    with pytest.raises(error, match=None) as raised:
        run(programs["gpt2"], options)
    assert message in str(raised.value)


def test_shared_input_cast_saves_memory_under_autocast(programs):
    from effcompile.analysis import measure_saved_bytes

    program = programs["llama"]
    shared, record = run(program, verify=False)
    separate, _ = run(program, {"share_cast": False}, verify=False)
    assert record.details["shared_input_casts"] == 4  # q/k/v share one input; o_proj its own; per layer
    for module in (shared.gm, separate.gm):  # export pins float32 in dtype checks; autocast changes it
        for node in module.graph.nodes:
            if node.target is torch.ops.aten._assert_tensor_metadata.default and node.kwargs.get("dtype") in (
                    torch.float32,):
                node.kwargs = {k: v for k, v in node.kwargs.items() if k != "dtype"}
        module.recompile()
    randomise_adapters(shared.gm)
    separate.gm.load_state_dict(shared.gm.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(logits(shared.run()), logits(separate.run()))
        saved_shared = measure_saved_bytes(shared.gm, shared)
        saved_separate = measure_saved_bytes(separate.gm, separate)
    # per layer, q/k/v's adapters keep one bf16 copy of their input instead of three
    assert saved_shared < saved_separate
    assert saved_separate - saved_shared >= 2 * 2 * (2 * 16 * 64 * 2)  # 2 layers × 2 copies × bf16 [2,16,64]
