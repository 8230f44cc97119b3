"""ONNX export and ONNX Runtime training: the artifacts train with PyTorch's loss curve.

Each architecture is exported once (module-scoped fixture); ORT's AdamW (PyTorch mode) and
``torch.optim.AdamW`` start from the same weights with the same hyper-parameters.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime.training")
import onnx  # noqa: E402
import onnxruntime  # noqa: E402

import effcompile  # noqa: E402
from effcompile.export.onnx import ExportError, export_eval_model, export_training_artifacts  # noqa: E402
from effcompile.train.ort import OrtTrainer, load_trainer  # noqa: E402

from conftest import ARCHITECTURES, example_gpt_spec, tiny_spec  # noqa: E402

OPTIMIZER = dict(lr=2e-3, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01)
ROOT = Path(__file__).resolve().parents[2]


def _compile(spec, passes=(), options=None):
    return effcompile.compile(spec, passes=list(passes), options=options or {}, verify=False, measure=False).program


def _torch_losses(program, steps: int) -> list[float]:
    """``steps`` AdamW steps of the program's own module (a copy) on its example inputs."""
    reference = program.clone()
    trainable = [p for p in reference.gm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=OPTIMIZER["lr"], betas=OPTIMIZER["betas"], eps=OPTIMIZER["eps"],
                                  weight_decay=OPTIMIZER["weight_decay"], foreach=False)
    losses = []
    for _ in range(steps):
        loss = reference.objective(reference.run())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def _assert_same_curve(ort_losses: list[float], torch_losses: list[float]) -> None:
    relative = np.abs(np.array(ort_losses) - np.array(torch_losses)) / np.abs(np.array(torch_losses))
    assert relative.max() <= 1e-3, f"per-step relative difference {relative.max():.2e}: {ort_losses} vs {torch_losses}"
    assert torch_losses[-1] < torch_losses[0]  # it trains at all


@pytest.fixture(scope="module", params=ARCHITECTURES)
def exported(request, tmp_path_factory):
    """(architecture, program, artifacts folder) for each tiny architecture, no passes."""
    program = _compile(tiny_spec(request.param))
    folder = tmp_path_factory.mktemp(f"onnx_{request.param}")
    files = export_training_artifacts(program, folder, **OPTIMIZER)
    assert all(Path(path).exists() for path in files.values())
    return request.param, program, folder


def test_twenty_adamw_steps_match_pytorch(exported):
    _, program, folder = exported
    trainer = OrtTrainer(folder)
    feeds = program.flat_inputs()
    ort_losses = [trainer.step(feeds) for _ in range(20)]
    _assert_same_curve(ort_losses, _torch_losses(program, 20))


def test_artifacts_are_legal_for_ort_training(exported):
    arch, program, folder = exported
    model = onnx.load(str(folder / "training_model.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert model.ir_version <= 10
    assert not {"SplitToSequence", "SequenceAt", "CastLike"} & set(ops)
    assert all(len(n.output) == 3 for n in model.graph.node if n.op_type == "LayerNormalization")
    manifest = json.loads((folder / "effcompile_onnx.json").read_text())
    # every parameter keeps its module name and trains (tied ones once, under their first name)
    names = {n for n, _ in program.gm.named_parameters()}
    assert set(manifest["requires_grad"]) | set(manifest["unused_params"]) == names
    state = OrtTrainer(folder).parameters()
    module_state = dict(program.gm.named_parameters())
    for name in manifest["requires_grad"]:
        np.testing.assert_array_equal(state[name], module_state[name].detach().numpy())
    legalisation = manifest["legalisation"]
    assert legalisation["cross_entropy_split"] == 1 and "SoftmaxCrossEntropyLoss" not in ops
    assert not {"ReduceLogSumExp", "LayerNormalization", "Sum"} & set(ops)  # the speed rewrites' slow kernels
    assert legalisation["training_sums_as_adds"] > 0
    if arch == "gpt2":
        assert legalisation["split_from_sequence"] == 2 and legalisation["tanh_gelu_as_sigmoid"] == 2
        assert legalisation["layer_norm_decomposed"] == 5 and "Tanh" not in ops
        assert legalisation["embedding_gathers_as_elements"] == 2  # token and position embeddings


def test_eval_matches_module(exported, tmp_path):
    _, program, folder = exported
    with torch.no_grad():
        expected = program.run()
    assert OrtTrainer(folder).eval(program.flat_inputs()) == pytest.approx(float(expected.loss), rel=1e-5)
    # the inference model: every output tensor (loss, logits) equals the module's
    path = export_eval_model(program, tmp_path)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feeds = dict(zip(names, [t.numpy() for t in program.flat_inputs()]))
    outputs = session.run(None, feeds)
    assert [o.name for o in session.get_outputs()][:2] == ["loss", "logits"]
    np.testing.assert_allclose(outputs[0], expected.loss.numpy(), rtol=1e-5)
    np.testing.assert_allclose(outputs[1], expected.logits.numpy(), rtol=1e-4, atol=1e-5)


def test_checkpoint_save_and_resume(exported, tmp_path):
    arch, program, folder = exported
    if arch != "gpt2":
        pytest.skip("one architecture is enough for the checkpoint round trip")
    feeds = program.flat_inputs()
    trainer = OrtTrainer(folder)
    for _ in range(3):
        trainer.step(feeds)
    checkpoint = trainer.save_checkpoint(tmp_path / "step3.ckpt")
    continued = [trainer.step(feeds) for _ in range(2)]
    resumed = load_trainer(folder, checkpoint)
    assert resumed.steps_done == 3
    assert [resumed.step(feeds) for _ in range(2)] == pytest.approx(continued, rel=1e-6)
    # the batch dimension stays dynamic: another batch size evaluates to PyTorch's loss
    manifest = json.loads((folder / "effcompile_onnx.json").read_text())
    assert manifest["dynamic_batch"]
    ids = torch.randint(0, 128, (3, feeds[0].shape[1]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = float(program.gm(input_ids=ids, labels=ids).loss)
    assert OrtTrainer(folder).eval({"input_ids": ids, "labels": ids}) == pytest.approx(expected, rel=1e-5)


def test_plain_gpt_with_inf_mask_and_loss_fn(tmp_path):
    # examples/gpt.py: symbolic_trace capture, masked_fill(-inf), the loss from the spec's loss_fn
    spec = example_gpt_spec()
    spec.module.h = spec.module.h[:1]  # one block and a shorter batch keep the test quick
    spec = effcompile.ModelSpec(spec.module, (spec.args[0][:2, :32],), {}, spec.loss_fn, spec.name)
    program = _compile(spec)
    export_training_artifacts(program, tmp_path, **OPTIMIZER)
    manifest = json.loads((tmp_path / "effcompile_onnx.json").read_text())
    assert manifest["legalisation"]["neg_inf_constants"] >= 1
    trainer = OrtTrainer(tmp_path)
    ort_losses = [trainer.step(program.flat_inputs()) for _ in range(3)]
    assert all(np.isfinite(ort_losses))
    _assert_same_curve(ort_losses, _torch_losses(program, 3))


def test_dropout_keeps_its_mask_output_and_trains(tmp_path):
    # dropout > 0: ORT's Dropout gradient reads the mask output, which the exporter leaves unnamed
    program = _compile(tiny_spec("gpt2", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1))
    export_training_artifacts(program, tmp_path, **OPTIMIZER)
    model = onnx.load(str(tmp_path / "training_model.onnx"))
    dropouts = [n for n in model.graph.node if n.op_type == "Dropout"]
    assert dropouts and all(len(n.output) == 2 for n in dropouts)
    trainer = OrtTrainer(tmp_path)
    losses = [trainer.step(program.flat_inputs()) for _ in range(3)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]  # ORT's dropout draws its own masks


def test_external_data_path(tmp_path, monkeypatch):
    # models over 2 GB keep their tensors in an external file: exercise that path on a tiny model
    import effcompile.export.onnx.exporter as onnx_export

    monkeypatch.setattr(onnx_export, "PROTOBUF_LIMIT", 0)
    program = _compile(tiny_spec("bert"))
    export_training_artifacts(program, tmp_path / "train", **OPTIMIZER)
    assert json.loads((tmp_path / "train" / "effcompile_onnx.json").read_text())["external_data"]
    trainer = OrtTrainer(tmp_path / "train")
    ort_losses = [trainer.step(program.flat_inputs()) for _ in range(3)]
    _assert_same_curve(ort_losses, _torch_losses(program, 3))


class _Atan(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.atan(self.proj(x)))


def test_op_without_ort_gradient_is_named(tmp_path):
    spec = effcompile.ModelSpec(_Atan(), (torch.randn(4, 8),), {}, lambda out, x: out.square().mean(), "atan")
    program = _compile(spec)
    with pytest.raises(ExportError) as error:
        export_training_artifacts(program, tmp_path)
    message = str(error.value)
    assert "Atan at <root module> (node atan)" in message and "proj.weight" in message and "proj.bias" in message
    assert "head.weight" not in message.split("no gradient:")[-1]  # head is above the atan: it trains


class _Tagger(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 8)
        self.head = torch.nn.Linear(8, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.embed(ids)))


@pytest.mark.parametrize("kind", ["mse", "cross_entropy"])
def test_builtin_loss_when_the_model_has_none(kind, tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(0, 10, (2, 5))
    regressor = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    module, inputs = (regressor, (torch.randn(6, 8),)) if kind == "mse" else (_Tagger(), (ids,))
    program = _compile(effcompile.ModelSpec(module, inputs, {}, None, kind))
    export_training_artifacts(program, tmp_path, **OPTIMIZER)  # loss="auto": no loss in the model
    trainer = OrtTrainer(tmp_path)
    assert trainer.manifest["loss"] == kind
    target = torch.randn(6, 1) if kind == "mse" else ids.reshape(-1)
    reference = program.clone()
    optimizer = torch.optim.AdamW(reference.gm.parameters(), lr=OPTIMIZER["lr"], betas=OPTIMIZER["betas"],
                                  eps=OPTIMIZER["eps"], weight_decay=OPTIMIZER["weight_decay"], foreach=False)
    ort_losses, torch_losses = [], []
    for _ in range(3):
        ort_losses.append(trainer.step([inputs[0], target]))
        output = reference.gm(*inputs)
        loss = torch.nn.functional.mse_loss(output, target) if kind == "mse" else \
            torch.nn.functional.cross_entropy(output.reshape(-1, 10), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        torch_losses.append(float(loss.detach()))
    _assert_same_curve(ort_losses, torch_losses)


def test_unknown_loss_kind_is_refused(tmp_path):
    program = _compile(effcompile.ModelSpec(_Atan(), (torch.randn(4, 8),), {}, lambda out, x: out.mean(), "atan"))
    with pytest.raises(ExportError, match="loss 'hinge'"):
        export_training_artifacts(program, tmp_path, loss="hinge")


_HAVE = {name: importlib.util.find_spec(f"effcompile.passes.{name}") is not None for name in ("lora", "amp", "remat")}


@pytest.mark.skipif(not _HAVE["lora"], reason="passes/lora.py not present")
def test_after_lora_base_weights_stay_unchanged(tmp_path):
    program = _compile(tiny_spec("gpt2"), ["lora"], {"lora": {"rank": 4}})
    export_training_artifacts(program, tmp_path, **OPTIMIZER)
    manifest = json.loads((tmp_path / "effcompile_onnx.json").read_text())
    assert manifest["requires_grad"] and all("lora_" in n for n in manifest["requires_grad"])
    assert manifest["frozen_params"]
    trainer = OrtTrainer(tmp_path)
    before = trainer.parameters()
    ort_losses = [trainer.step(program.flat_inputs()) for _ in range(20)]
    after = trainer.parameters()
    assert all(np.array_equal(before[n], after[n]) for n in manifest["frozen_params"])
    assert any(not np.array_equal(before[n], after[n]) for n in manifest["requires_grad"])
    _assert_same_curve(ort_losses, _torch_losses(program, 20))


@pytest.mark.skipif(not _HAVE["lora"], reason="passes/lora.py not present")
def test_after_lora_merge_the_inference_model_alone(tmp_path):
    program = _compile(tiny_spec("llama"), ["lora"], {"lora": {"rank": 4, "merge": True}})
    path = export_eval_model(program, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["effcompile_onnx.json", "eval_model.onnx"]
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = dict(zip([i.name for i in session.get_inputs()], [t.numpy() for t in program.flat_inputs()]))
    with torch.no_grad():
        expected = program.run()
    np.testing.assert_allclose(session.run(["logits"], feeds)[0], expected.logits.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not _HAVE["amp"], reason="passes/amp.py not present")
def test_after_amp_casts_are_exported_and_train(tmp_path):
    program = _compile(tiny_spec("llama"), ["amp"], {"amp": {"compare_autocast": False}})
    export_training_artifacts(program, tmp_path, **OPTIMIZER)
    model = onnx.load(str(tmp_path / "training_model.onnx"))
    casts = [n for n in model.graph.node if n.op_type == "Cast"
             and n.attribute[0].i == onnx.TensorProto.BFLOAT16]
    assert casts
    trainer = OrtTrainer(tmp_path)
    ort_losses = [trainer.step(program.flat_inputs()) for _ in range(5)]
    torch_losses = _torch_losses(program, 5)
    # bf16 matmuls: ORT and PyTorch round differently, so compare the curves loosely
    np.testing.assert_allclose(ort_losses, torch_losses, rtol=2e-2)
    assert ort_losses[-1] < ort_losses[0]


@pytest.mark.parametrize("speed_rewrites", [True, False])
def test_phi_after_amp_exports_and_trains(tmp_path, speed_rewrites):
    """Phi's tanh GELU after ``amp`` reads its input through two float32 → float32 casts; ONNX Runtime's
    FastGeluFusion crashed the whole process on it inside generate_artifacts. Redundant casts are dropped
    first: the export succeeds, with or without the speed rewrites, and trains like PyTorch."""
    from effcompile.spec import load_hf_spec

    from conftest import generic_tiny_overrides

    spec = load_hf_spec("phi", generic_tiny_overrides("phi"), batch=2, seq=16)
    program = _compile(spec, ["amp"], {"amp": {"compare_autocast": False}})
    export_training_artifacts(program, tmp_path, speed_rewrites=speed_rewrites, **OPTIMIZER)
    trainer = OrtTrainer(tmp_path)
    assert trainer.manifest["legalisation"]["redundant_casts_dropped"] > 0
    ort_losses = [trainer.step(program.flat_inputs()) for _ in range(4)]
    np.testing.assert_allclose(ort_losses, _torch_losses(program, 4), rtol=2e-2)
    assert ort_losses[-1] < ort_losses[0]


@pytest.mark.skipif(not _HAVE["remat"], reason="passes/remat.py not present")
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_after_remat_training_matches(tmp_path, arch):
    """Checkpointed segments and the chunked loss head export as their plain forward. Llama's segments keep
    SDPA's ``enable_gqa``, whose ONNX translation unsqueezes with a scalar axis: ORT's Squeeze (the gradient
    of that Unsqueeze) needs it as a vector."""
    program = _compile(tiny_spec(arch), ["remat"], {"remat": {"policy": "blocks"}})
    export_training_artifacts(program, tmp_path, **OPTIMIZER)
    trainer = OrtTrainer(tmp_path)
    ort_losses = [trainer.step(program.flat_inputs()) for _ in range(10)]
    _assert_same_curve(ort_losses, _torch_losses(program, 10))


def test_tied_embeddings_with_gqa_train_every_parameter(tmp_path):
    """A GQA model (SDPA with ``enable_gqa``) with tied embeddings, as Qwen2 and many small models are: every
    parameter trains, the tied embedding included, and the curve equals PyTorch's (an earlier export re-expanded
    the key/value heads on a copy of the graph, whose tied parameter got a name the trainable list lacked)."""
    from effcompile.spec import load_hf_spec

    from conftest import generic_tiny_overrides

    spec = load_hf_spec("qwen2", {**generic_tiny_overrides("qwen2"), "tie_word_embeddings": True}, batch=2, seq=16)
    program = _compile(spec)
    export_training_artifacts(program, tmp_path, **OPTIMIZER)
    manifest = json.loads((tmp_path / "effcompile_onnx.json").read_text())
    assert manifest["unused_params"] == [] and "model.embed_tokens.weight" in manifest["requires_grad"]
    trainer = OrtTrainer(tmp_path)
    _assert_same_curve([trainer.step(program.flat_inputs()) for _ in range(5)], _torch_losses(program, 5))


@pytest.mark.parametrize("model_type", ["mistral", "gpt_neox", "olmo"])
def test_other_architectures_export_and_train(model_type, tmp_path):
    """Architectures the passes are not tuned on still export and train in ORT (loss falls); OLMo's
    parameter-free LayerNorm needs constant scale/bias initializers for ORT's gradient builder."""
    from effcompile.spec import load_hf_spec

    from conftest import generic_tiny_overrides

    spec = load_hf_spec(model_type, generic_tiny_overrides(model_type), batch=2, seq=16)
    result = effcompile.compile(spec, passes=[], measure=False, verify=False)
    export_training_artifacts(result.program, tmp_path, **OPTIMIZER)
    trainer = OrtTrainer(tmp_path)
    losses = [trainer.step(dict(spec.kwargs)) for _ in range(4)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    if model_type == "olmo":
        torch_losses = _torch_losses(result.program, 4)
        assert trainer.manifest["legalisation"]["layer_norm_decomposed"] > 0
        _assert_same_curve(losses, torch_losses)
        # without the speed rewrites the norms stay LayerNormalization and get their constant scale/bias
        export_training_artifacts(result.program, tmp_path / "plain", speed_rewrites=False, **OPTIMIZER)
        plain = OrtTrainer(tmp_path / "plain")
        assert plain.manifest["legalisation"]["layer_norm_bias_added"] > 0
        _assert_same_curve([plain.step(dict(spec.kwargs)) for _ in range(4)], torch_losses)


class _ComplexRotary(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pairs = torch.view_as_complex(self.proj(x).reshape(*x.shape[:-1], 4, 2))
        return torch.view_as_real(pairs * pairs).flatten(-2).sum()


def test_complex_numbers_are_refused_by_name(tmp_path):
    """ONNX has no complex tensors: the export names the op and where it is (as for Llama 4's rotary
    embedding) instead of the exporter's generic failure, and writes nothing."""
    result = effcompile.compile(_ComplexRotary(), (torch.randn(2, 3, 8),), measure=False, verify=False)
    with pytest.raises(ExportError, match="view_as_complex .*complex numbers"):
        export_training_artifacts(result.program, tmp_path / "artifacts")
    assert not (tmp_path / "artifacts").exists()


@pytest.mark.parametrize("ignore_index", [None, -100])
def test_split_cross_entropy_equals_the_fused_loss_at_extreme_scores(ignore_index):
    """The split loss (gathered score − log-sum-exp with an integer-truncated row maximum as shift) equals
    PyTorch's cross-entropy for scores far from zero, with -1e9-masked columns, and with ignored labels."""
    from effcompile.export.onnx.legalize import SplitCrossEntropy

    scores = torch.randn(6, 50, dtype=torch.float32) * 30
    scores[0] += 5e3
    scores[1] -= 5e3
    scores[2, :40] = -1e9
    labels = torch.randint(0, 40, (6,))
    if ignore_index is not None:
        labels[3] = ignore_index
    attrs = {"reduction": "mean"} | ({"ignore_index": ignore_index} if ignore_index is not None else {})
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("SoftmaxCrossEntropyLoss", ["s", "y"], ["loss"], **attrs)], "g",
        [onnx.helper.make_tensor_value_info("s", onnx.TensorProto.FLOAT, [6, 50]),
         onnx.helper.make_tensor_value_info("y", onnx.TensorProto.INT64, [6])],
        [onnx.helper.make_tensor_value_info("loss", onnx.TensorProto.FLOAT, [])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    model.ir_version = 9
    assert SplitCrossEntropy().call(model) == 1
    ops = {n.op_type for n in model.graph.node}
    assert "SoftmaxCrossEntropyLoss" not in ops and "ReduceLogSumExp" not in ops and "ReduceMax" in ops
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (loss,) = session.run(None, {"s": scores.numpy(), "y": labels.numpy()})
    expected = torch.nn.functional.cross_entropy(scores.double(), labels, ignore_index=ignore_index or -100)
    np.testing.assert_allclose(loss, float(expected), rtol=1e-5)


@pytest.mark.parametrize("axis", [-1, -2, 1])
def test_decomposed_layer_norm_equals_the_op(axis):
    """float32 LayerNormalization → elementwise ops and reductions over the same trailing axes, equal to
    PyTorch's layer_norm to round-off; with and without a bias."""
    from effcompile.export.onnx.legalize import DecomposeLayerNorm

    x = torch.randn(2, 5, 7, 8) * 3 + 1
    shape = {-1: [8], -2: [7, 8], 1: [5, 7, 8]}[axis]
    for bias in (True, False):
        weight, offset = torch.randn(shape), torch.randn(shape)
        inputs = ["x", "w", "b"] if bias else ["x", "w"]
        graph = onnx.helper.make_graph(
            [onnx.helper.make_node("LayerNormalization", inputs, ["y"], axis=axis, epsilon=1e-3)], "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(x.shape))],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, list(x.shape))],
            [onnx.numpy_helper.from_array(weight.numpy(), "w"), onnx.numpy_helper.from_array(offset.numpy(), "b")])
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
        model.ir_version = 9
        assert DecomposeLayerNorm().call(model) == 1
        assert "LayerNormalization" not in {n.op_type for n in model.graph.node}
        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        (y,) = session.run(None, {"x": x.numpy()})
        expected = torch.nn.functional.layer_norm(x, shape, weight, offset if bias else None, eps=1e-3)
        np.testing.assert_allclose(y, expected.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="the guard needs fork")
def test_a_native_crash_in_generate_artifacts_is_an_export_error(tmp_path, monkeypatch):
    """A segfault inside ONNX Runtime's artifact generation (a bug of ORT's on some graphs) raises a one-line
    ExportError naming the signal, and leaves no output folder, instead of killing the process."""
    import ctypes

    from onnxruntime.training import artifacts

    monkeypatch.setattr(artifacts, "generate_artifacts", lambda *args, **kwargs: ctypes.string_at(0))
    program = _compile(tiny_spec("gpt2"))
    with pytest.raises(ExportError, match=r"crashed \(signal 11\)"):
        export_training_artifacts(program, tmp_path / "out", **OPTIMIZER)
    assert not (tmp_path / "out").exists()


class _DefaultedArguments(torch.nn.Module):
    """A forward with defaulted arguments the example does not give (issue #18 item 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x, attn_mask=None, is_causal=True):
        return self.proj(x)


def test_loss_fn_is_called_as_the_spec_calls_it(tmp_path):
    # loss_fn(output, x) takes only the spec's inputs: the export must not pass attn_mask/is_causal as keywords
    def loss_fn(output, x):
        return torch.nn.functional.mse_loss(output, x)

    torch.manual_seed(0)
    spec = effcompile.ModelSpec(_DefaultedArguments(), (torch.randn(2, 16),), {}, loss_fn, "defaults")
    program = _compile(spec)
    export_training_artifacts(program, tmp_path, **OPTIMIZER)
    trainer = OrtTrainer(tmp_path)
    feeds = [v for v in program.flat_inputs() if isinstance(v, torch.Tensor)]  # the defaults are constants
    ort_losses = [trainer.step(feeds) for _ in range(5)]
    _assert_same_curve(ort_losses, _torch_losses(program, 5))


@torch.library.custom_op("effcompile_test::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_twice.register_fake
def _(x):
    return torch.empty_like(x)


class _Inner(torch.nn.Module):
    def forward(self, x):
        return torch.ops.effcompile_test.twice(x)


class _WithCustomOp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.block = _Inner()

    def forward(self, x):
        return self.block(self.proj(x))


def test_an_op_without_onnx_translation_is_named_with_its_module(tmp_path):
    # the exporter's banner (ANSI colours, "step 3/3") named no op: the message names op, module path and fix
    spec = effcompile.ModelSpec(_WithCustomOp(), (torch.randn(2, 8),), {}, lambda out, x: out.square().mean(),
                                "custom_op")
    program = _compile(spec)
    with pytest.raises(ExportError) as caught:
        export_training_artifacts(program, tmp_path / "out", **OPTIMIZER)
    message = str(caught.value)
    assert "\x1b[" not in message and "step 3/3" not in message
    assert "effcompile_test.twice.default at block (node" in message and "no ONNX translation" in message
    assert not (tmp_path / "out").exists()


def test_describe_export_failure_gives_the_experts_fix():
    from effcompile.export.onnx.failures import describe_export_failure

    cause = RuntimeError("No ONNX function found for <OpOverload(op='transformers.grouped_mm_fallback', "
                         "overload='default')>. Failure message: No decompositions registered")
    error = RuntimeError("Failed to convert the exported program to an ONNX model. \x1b[96mThis is step 3/3\x1b[0m")
    error.__cause__ = cause
    message = describe_export_failure(error)
    assert message.startswith("transformers.grouped_mm_fallback.default has no ONNX translation")
    assert "experts_implementation=batched_mm" in message and "\x1b" not in message


def test_t5_attention_output_view_exports(tmp_path):
    # hf:t5 at 32 tokens: SDPA → transpose → contiguous → view; the exporter's decomposition step dropped the
    # contiguous() and failed on the view ("Failed to decompose the FX graph for ONNX compatibility")
    from effcompile.spec import load_hf_spec

    config = dict(vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, dropout_rate=0.0)
    program = _compile(load_hf_spec("t5", config, batch=2, seq=32))
    with torch.no_grad():
        expected = program.run()
    session = onnxruntime.InferenceSession(export_eval_model(program, tmp_path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feeds = dict(zip(names, [t.numpy() for t in program.flat_inputs() if isinstance(t, torch.Tensor)]))
    outputs = session.run(None, feeds)
    np.testing.assert_allclose(outputs[0], expected.loss.numpy(), rtol=1e-5)
    np.testing.assert_allclose(outputs[1], expected.logits.numpy(), rtol=1e-4, atol=1e-5)
    # Training: T5's position bias [1, H, Sq, Sk] is selected by Where against a [B, 1, Sq, Sk] mask, and ORT's
    # Where gradient does not reduce broadcast dimensions (a Squeeze of the full gradient failed in TrainStep):
    # the legalisation expands such inputs, and 3 AdamW steps follow PyTorch's.
    export_training_artifacts(program, tmp_path / "train", **OPTIMIZER)
    trainer = OrtTrainer(tmp_path / "train")
    feeds = program.flat_inputs()
    _assert_same_curve([trainer.step(feeds) for _ in range(3)], _torch_losses(program, 3))


class _PadBranch(_Tagger):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pad = ids.eq(1)
        if not pad.any():  # FSMT's padding mask: a Python branch on the ids' values
            pad = None
        hidden = self.embed(ids)
        return self.head(hidden if pad is None else hidden.masked_fill(pad[..., None], 0.0))


def test_graph_captured_on_its_examples_data_is_not_exported_to_onnx(tmp_path):
    # ONNX has no runtime check: the exported model would take the example's branch for padded ids too.
    spec = effcompile.ModelSpec(_PadBranch(), (torch.randint(2, 10, (2, 6)),), {},
                                lambda out, ids: out.square().mean(), "pad")
    program = _compile(spec)
    with pytest.raises(ExportError, match=r"specialised on its example's data \(at .*test_export_onnx.py"):
        export_training_artifacts(program, tmp_path / "out")
    assert not (tmp_path / "out").exists()
