"""Cost model and shared matcher."""

import pytest
import torch

from effcompile.analysis import analyze, measure_saved_bytes, parameter_count, to_networkx
from effcompile.capture import capture
from effcompile.patterns import find_attention, find_linears

from conftest import ARCHITECTURES, example_gpt_spec, tiny_spec

# Linear-like sites per tiny architecture (2 layers): GPT-2 Conv1D ×4 + lm_head; Llama q,k,v,o,gate,up,down
# ×2 + lm_head; BERT q,k,v,o,intermediate,output ×2 + pooler-free MLM transform + decoder.
EXPECTED_LINEARS = {"gpt2": 9, "llama": 15, "bert": 14}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_matcher_finds_every_linear_and_attention(arch):
    program = capture(tiny_spec(arch))
    linears = find_linears(program.gm)
    assert len(linears) == EXPECTED_LINEARS[arch]
    for site in linears:
        assert site.weight_target.startswith(site.path)
        assert site.in_features == 64 or site.out_features == 64
    attention = find_attention(program.gm)
    assert len(attention) == 2 and all(a.kind == "sdpa" for a in attention)
    assert all(".0." in a.path or ".1." in a.path for a in attention)


def test_matcher_on_symbolic_trace_graph_and_explicit_attention():
    program = capture(example_gpt_spec())
    linears = find_linears(program.gm)
    assert {s.kind for s in linears} == {"module"} and len(linears) == 4 * 4 + 1
    attention = find_attention(program.gm)
    assert len(attention) == 4 and {a.kind for a in attention} == {"explicit"}


def test_eager_attention_is_matched_in_export_graphs():
    program = capture(tiny_spec("llama", attn_implementation="eager"))
    attention = find_attention(program.gm)
    assert len(attention) == 2 and {a.kind for a in attention} == {"explicit"}


def test_costs_match_hand_counts():
    program = capture(example_gpt_spec())
    analysis = analyze(program)
    qkv = next(n for n in program.gm.graph.nodes if n.op == "call_module" and n.target == "h.0.attn.qkv")
    batch, seq = program.args[0].shape
    assert analysis[qkv].flops == 2 * batch * seq * 128 * 384  # 2·M·K·N
    assert analysis[qkv].shape == (batch, seq, 384)
    assert analysis[qkv].output_bytes == batch * seq * 384 * 4
    # The analysis and the direct measurement of saved tensors agree on one forward.
    assert analysis.saved_activation_bytes == measure_saved_bytes(program.gm, program)
    graph = to_networkx(program.gm, analysis)
    assert graph.number_of_nodes() == len(program.gm.graph.nodes)
    assert graph.nodes["h_0_attn_qkv"]["flops"] == analysis[qkv].flops
    assert parameter_count(program.gm) == sum(p.numel() for p in program.gm.parameters())


def test_tied_parameters_counted_once():
    program = capture(tiny_spec("gpt2"))
    shared = program.gm.get_submodule("lm_head").weight
    assert parameter_count(program.gm) == sum(p.numel() for p in {id(p): p for p in program.gm.parameters()}.values())
    assert isinstance(shared, torch.nn.Parameter)
