"""``remat``'s chunked loss head: which heads match on GPT-2, Llama and BERT; the loss, the logits output and
every gradient equal the unchunked head's (float32 to round-off, bf16 autocast within bf16 rounding); every
reduction and ``ignore_index``; heads it must leave alone; the pass's ``head`` option; saved bytes fall; the
export form is what ONNX export traces."""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.nn.functional as F

from effcompile.analysis import measure_saved_bytes
from effcompile.capture import capture
from effcompile.errors import OptionError
from effcompile.pass_manager import PassManager, resolve_passes
from effcompile.passes.remat.head import (
    auto_rows,
    chunk_loss_heads,
    chunked_linear_cross_entropy,
    find_loss_heads,
    head_names,
    is_chunked_head,
    plain_linear_cross_entropy,
)
from effcompile.program import Program

from conftest import tiny_spec

HEADS = {"gpt2": ["lm_head"], "llama": ["lm_head"], "bert": ["cls.predictions.decoder"]}


@pytest.fixture(scope="module")
def captured() -> dict[str, Program]:
    return {}


def program_for(captured: dict[str, Program], arch: str, **labels_kw) -> Program:
    if arch not in captured:
        spec = tiny_spec(arch)
        labels = spec.kwargs["labels"].clone()
        labels[0, :3] = -100  # some ignored positions
        spec.kwargs["labels"] = labels
        captured[arch] = capture(spec)
    return captured[arch].clone()


def run_once(gm: torch.nn.Module, program: Program, autocast: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Loss, logits and parameter gradients of one forward/backward that also uses the logits output."""
    gm.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = gm(*program.args, **program.kwargs)
    loss, logits = out[0], out[1]
    (loss + 0.1 * logits.float().square().mean()).backward()
    grads = {n: p.grad.detach().clone() for n, p in gm.named_parameters() if p.grad is not None}
    return loss.detach(), logits.detach(), grads


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_heads_match_and_are_exact_in_float32(captured, arch):
    program = program_for(captured, arch)
    reference = copy.deepcopy(program.gm)
    assert head_names(find_loss_heads(program.gm)) == HEADS[arch]
    assert chunk_loss_heads(program.gm, rows=5) == HEADS[arch]  # 5 rows: several chunks and a remainder
    assert sum(is_chunked_head(n) for n in program.gm.graph.nodes) == 1
    assert not any(op == "cross_entropy_loss" for op in (getattr(n.target, "__name__", "") for n in program.gm.graph.nodes))
    loss0, logits0, grads0 = run_once(reference, program)
    loss1, logits1, grads1 = run_once(program.gm, program)
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits1, logits0, rtol=1e-5, atol=1e-6)  # row chunks: another GEMM blocking
    assert set(grads1) == set(grads0)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-6, msg=name)


def test_autocast_gradients_within_bf16_rounding(captured):
    program = program_for(captured, "llama")
    reference = copy.deepcopy(program.gm)
    chunk_loss_heads(program.gm, rows=7)
    loss0, logits0, grads0 = run_once(reference, program, autocast=True)
    loss1, logits1, grads1 = run_once(program.gm, program, autocast=True)
    assert logits1.dtype == logits0.dtype == torch.bfloat16 and loss1.dtype == loss0.dtype == torch.float32
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits1.float(), logits0.float(), rtol=1e-2, atol=1e-2)
    for name in grads0:
        scale = grads0[name].abs().max().clamp_min(1e-12)
        assert float((grads1[name] - grads0[name]).abs().max() / scale) < 2e-2, name


@pytest.mark.parametrize("reduction", [0, 1, 2], ids=["none", "mean", "sum"])
@pytest.mark.parametrize("bias", [False, True])
def test_function_equals_plain_head(reduction, bias):
    torch.manual_seed(0)
    h = torch.randn(3, 7, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    b = torch.randn(50, requires_grad=True) if bias else None
    target = torch.randint(0, 50, (3, 7))
    target[1, 2:5] = -1
    results = []
    for fn in (plain_linear_cross_entropy, chunked_linear_cross_entropy):
        loss, logits = fn(h, weight, b, target, ignore_index=-1, reduction=reduction, upcast=torch.float32,
                          rows=4, want_logits=True)
        (loss.sum() + (logits * torch.linspace(-1, 1, 50)).sum()).backward()
        leaves = [t for t in (h, weight, b) if t is not None]
        results.append((loss.detach(), logits.detach(), [t.grad.clone() for t in leaves]))
        for t in leaves:
            t.grad = None
    (l0, z0, g0), (l1, z1, g1) = results
    assert l1.shape == l0.shape and z1.shape == z0.shape == (3, 7, 50)
    torch.testing.assert_close(l1, l0)
    torch.testing.assert_close(z1, z0)
    for a, b_ in zip(g1, g0):
        torch.testing.assert_close(a, b_)


def test_logits_not_returned_when_unused():
    torch.manual_seed(0)
    h = torch.randn(10, 8, requires_grad=True)
    loss, logits = chunked_linear_cross_entropy(h, torch.randn(30, 8), None, torch.randint(0, 30, (10,)), rows=3)
    assert logits is None and loss.dim() == 0
    loss.backward()
    assert h.grad is not None


def test_no_rows():
    h, weight = torch.randn(0, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long)
    for reduction in (0, 2):
        loss, _ = chunked_linear_cross_entropy(h, weight, None, target, reduction=reduction)
        expected, _ = plain_linear_cross_entropy(h, weight, None, target, reduction=reduction)
        assert loss.shape == expected.shape and loss.dtype == expected.dtype and float(loss.sum()) == 0.0


def test_rows_must_match_targets():
    with pytest.raises(ValueError, match="targets for"):
        chunked_linear_cross_entropy(torch.randn(4, 8), torch.randn(30, 8), None, torch.zeros(5, dtype=torch.long))


def test_auto_rows():
    assert auto_rows(50304) == 1280  # ≈ 256 MiB of float32 logits, a multiple of 64
    assert auto_rows(32000) == 2048
    assert auto_rows(2**30) == 1


class _Head(torch.nn.Module):
    def __init__(self, smoothing: float = 0.0, softcap: bool = False, shift: bool = False) -> None:
        super().__init__()
        self.body = torch.nn.Linear(8, 8)
        self.lm_head = torch.nn.Linear(8, 20, bias=False)
        self.smoothing, self.softcap, self.shift = smoothing, softcap, shift

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(torch.relu(self.body(x)))
        if self.softcap:
            logits = torch.tanh(logits / 30.0) * 30.0
        if self.shift:
            logits, labels = logits[:, :-1], labels[:, 1:]
        return F.cross_entropy(logits.float().reshape(-1, 20), labels.reshape(-1), label_smoothing=self.smoothing)


def _traced(module: torch.nn.Module, *inputs: torch.Tensor) -> torch.fx.GraphModule:
    gm = torch.fx.symbolic_trace(module)
    if inputs:  # ranks on the nodes: a slice of the logits is moved onto h only where its rank is known
        from torch.fx.passes.shape_prop import ShapeProp

        ShapeProp(gm).propagate(*inputs)
    return gm


def test_symbolic_trace_head_with_leading_slice_is_exact():
    torch.manual_seed(0)
    module = _Head(shift=True)
    x, labels = torch.randn(2, 6, 8), torch.randint(0, 20, (2, 6))
    assert chunk_loss_heads(_traced(module), rows=3) == []  # rank unknown: the slice might cut the vocabulary
    gm = _traced(module, x, labels)
    assert chunk_loss_heads(gm, rows=3) == ["lm_head"]
    torch.testing.assert_close(gm(x, labels), module(x, labels))
    gm(x, labels).backward()
    module(x, labels).backward()
    # the rewritten graph shares the modules' parameters, so each .grad holds both backward passes: compare
    # against a fresh reference instead
    reference = _Head(shift=True)
    reference.load_state_dict(module.state_dict())
    reference(x, labels).backward()
    for (name, p), (_, q) in zip(module.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, 2 * q.grad, msg=name)


@pytest.mark.parametrize("kind", ["smoothing", "softcap"])
def test_heads_left_alone(kind):
    module = _Head(smoothing=0.1) if kind == "smoothing" else _Head(softcap=True)
    gm = _traced(module)
    assert find_loss_heads(gm) == [] and chunk_loss_heads(gm) == []


def _remat(program: Program, **options):
    result = PassManager(resolve_passes(["remat"], {"remat": options}), verify=True, measure=False).run(program)
    return result.program, result.records[0]


def test_remat_chunks_the_head_when_saving_memory(captured):
    program, record = _remat(program_for(captured, "gpt2"), budget=0.6)
    assert record.changed and record.verify.ok, record.verify.failures
    assert record.details["chunked_loss_heads"] == ["lm_head"] and "loss head chunked (lm_head; recomputes its logits in backward)" in record.details["summary"]
    assert record.stats["remat_chunked_loss_heads"] == 1
    again, second = _remat(program.clone(), budget=0.6)
    assert not second.changed and "remat ran before" in second.reason


def test_remat_head_option(captured):
    kept, record = _remat(program_for(captured, "gpt2"), policy="blocks", head="keep")
    assert record.details["chunked_loss_heads"] == []
    assert not any(is_chunked_head(n) for n in kept.gm.graph.nodes)
    full, record = _remat(program_for(captured, "gpt2"), budget=1.0)
    assert not record.changed  # budget 1.0 changes nothing, the head included
    chunked, record = _remat(program_for(captured, "gpt2"), budget=1.0, head="chunked", head_rows=4)
    assert record.changed and record.details["chunked_loss_heads"] == ["lm_head"]
    call = next(n for n in chunked.gm.graph.nodes if is_chunked_head(n))
    assert call.kwargs["rows"] == 4 and call.kwargs["want_logits"]
    assert [u.target for u in call.users] == [operator.getitem, operator.getitem]
    with pytest.raises(OptionError, match="head_rows"):
        resolve_passes(["remat"], {"remat": {"head_rows": -1}})


def test_saved_bytes_fall(captured):
    program = program_for(captured, "llama")
    before = measure_saved_bytes(program.gm, program)
    chunk_loss_heads(program.gm, rows=8)
    after = measure_saved_bytes(program.gm, program)
    vocab, rows = 128, 2 * 16
    # the float32 log-softmax goes; a float32 log-sum-exp per row comes
    assert before - after >= rows * vocab * 4 - rows * 4 - 64


@pytest.mark.parametrize("model_type,head", [("opt", "lm_head"), ("t5", "lm_head"), ("roberta", "lm_head.decoder"),
                                             ("gemma2", None)])
def test_other_architectures_verify(model_type, head):
    """Heads beyond the three tuned architectures: OPT (whose key-projection bias gradient is zero in exact
    arithmetic, so verification must judge its round-off on the gradients' scale), T5 (encoder-decoder),
    RoBERTa's MLM head; Gemma 2's soft-capped logits are left alone."""
    from effcompile.spec import load_hf_spec

    from conftest import generic_tiny_overrides

    spec = load_hf_spec(model_type, generic_tiny_overrides(model_type), batch=2, seq=16)
    program = capture(spec)
    rewritten, record = _remat(program, budget=0.6)
    assert record.verify.ok, record.verify.failures
    assert record.details["chunked_loss_heads"] == ([head] if head else [])
