"""Save + load round trips of every pass on tiny models: the loaded module is exact (loss and gradients, bit
for bit), keeps its parameter names, ties, trainable flags and modes, and saves the registered classes and
graph functions each pass puts into the graph; a loaded module compiles with torch.compile."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import effcompile
from effcompile.passes.sas.module import SparseAttention
from effcompile.spec import ModelSpec, load_hf_spec

from conftest import example_gpt_spec, generic_tiny_overrides, tiny_spec


class _TinyMHA(torch.nn.Module):
    """An encoder on ``nn.MultiheadAttention`` (a leaf module under symbolic_trace)."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = torch.nn.Linear(12, 16)
        self.blocks = torch.nn.ModuleList(torch.nn.MultiheadAttention(16, 4, batch_first=True) for _ in range(2))
        self.head = torch.nn.Linear(16, 3)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.patch(patches)
        for attention in self.blocks:
            x = x + attention(x, x, x, need_weights=False)[0]
        return self.head(x.mean(1))


def _deberta() -> ModelSpec:
    overrides = {**generic_tiny_overrides("deberta-v2"), "relative_attention": True, "pos_att_type": ["p2c", "c2p"],
                 "max_relative_positions": 16, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    return load_hf_spec("deberta-v2", overrides, batch=2, seq=16)


ROUND_TRIPS = {
    "demo-lora-sas-amp-remat": (example_gpt_spec, ["lora", "sas", "amp", "remat"],
                                {"lora": {"targets": "qkv,proj"}, "sas": {"block_size": 16, "window": 32},
                                 "remat": {"budget": 0.7}}),
    "gpt2-lora-sas-amp-remat": (lambda: tiny_spec("gpt2"), ["lora", "sas", "amp", "remat"],
                                {"sas": {"block_size": 8, "window": 8}, "remat": {"budget": 0.5}}),
    "llama-lowrank-amp_once-remat_blocks": (lambda: tiny_spec("llama"), ["lowrank", "amp", "remat"],
                                            {"lowrank": {"rank": 8}, "remat": {"policy": "blocks"},
                                             "amp": {"cast_params": "once"}}),
    "bert-pipeline": (lambda: tiny_spec("bert"), ["pipeline"], {}),
    "demo-lowrank-amp_once-remat_blocks": (example_gpt_spec, ["lowrank", "amp", "remat"],
                                           {"lowrank": {"rank": 8}, "remat": {"policy": "blocks"},
                                            "amp": {"cast_params": "once"}}),
    "llama-pipeline": (lambda: tiny_spec("llama"), ["pipeline"], {}),
    "llama-lora-fuse-amp-remat": (lambda: tiny_spec("llama"), ["lora", "fuse", "amp", "remat"],
                                  {"lora": {"targets": "q_proj,v_proj,gate_proj,up_proj"}, "remat": {"budget": 0.8}}),
    "gpt2-remat_offload": (lambda: tiny_spec("gpt2"), ["remat"],
                           {"remat": {"policy": "blocks", "offload": "on", "link_bandwidth": 1e18,
                                      "offload_min_bytes": 0}}),
    # sas's other attention forms: DeBERTa's bmm form with a bias and a bool mask (sas.masked_bias, heads in the
    # batch) and nn.MultiheadAttention calls rewritten as chunk/linear/unflatten around SparseAttention
    "deberta-sas": (lambda: _deberta(), ["sas"], {"sas": {"block_size": 4, "window": 8}}),
    "mha-sas": (lambda: ModelSpec(_TinyMHA(), (torch.randn(2, 10, 12),), {}, name="mha"), ["sas"],
                {"sas": {"block_size": 4, "window": 4, "backend": "gather"}}),
    "gpt2-sas_importance_warmup": (lambda: tiny_spec("gpt2"), ["sas"],
                                   {"sas": {"pattern": "importance", "block_size": 4, "density": 0.5, "warmup": 3,
                                            "calib_steps": 1}}),
    "llama-remat_head_chunked": (lambda: tiny_spec("llama"), ["remat"],
                                 {"remat": {"policy": "blocks", "head": "chunked", "head_rows": 8}}),
    "gpt2-lora_dropout": (lambda: tiny_spec("gpt2"), ["lora"], {"lora": {"dropout": 0.1}}),
    "bert-fuse-amp_fp16": (lambda: tiny_spec("bert"), ["fuse", "amp"], {"amp": {"dtype": "float16"}}),
}
# Module classes / graph functions a case must put into the saved folder (so a case that stops matching
# cannot pass by saving nothing new).
EXPECTED_NAMES = {
    "llama-lora-fuse-amp-remat": ("effcompile:LoraLinear", "effcompile:fuse.rms_norm",
                                  "effcompile:fuse.gated_activation", "effcompile:fuse.rotary_embedding",
                                  "effcompile:fuse.linear_cross_entropy"),
    "gpt2-remat_offload": ("effcompile:OffloadedSpan", "effcompile:offload_mark", "effcompile:offload_region_end",
                           "effcompile:no_session"),
    "demo-lora-sas-amp-remat": ("effcompile:SparseAttention", "effcompile:LoraLinear"),
    "deberta-sas": ("effcompile:SparseAttention", "effcompile:sas.masked_bias"),
    "mha-sas": ("effcompile:SparseAttention",),
    "gpt2-sas_importance_warmup": ("effcompile:SparseAttention",),
    "llama-remat_head_chunked": ("effcompile:CheckpointedSegment", "effcompile:chunked_linear_cross_entropy"),
    "gpt2-lora_dropout": ("effcompile:LoraLinear", "effcompile:autocast_input"),
    "bert-fuse-amp_fp16": ("effcompile:fuse.layer_norm",),
}


def _loss(output):
    if hasattr(output, "loss") and output.loss is not None:
        return output.loss
    return output.float().pow(2).mean()


def _run(module, args, kwargs):
    torch.manual_seed(0)
    loss = _loss(module(*args, **kwargs))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _tied_groups(module):
    groups = {}
    for name, tensor in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(tensor), []).append(name)
    return sorted(sorted(names) for names in groups.values() if len(names) > 1)


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_round_trip_is_exact_and_data_only(case, tmp_path):
    make_spec, passes, options = ROUND_TRIPS[case]
    result = effcompile.compile(make_spec(), passes=passes, options=options, measure=False, verify=False)
    folder = Path(result.save(str(tmp_path / "out")))
    module_dir = folder / "module"
    assert sorted(p.name for p in module_dir.iterdir()) == ["code.py", "structure.json", "weights.safetensors"]
    text = (module_dir / "structure.json").read_text()
    assert json.loads(text)["format"] == "effcompile-module"
    assert [name for name in EXPECTED_NAMES.get(case, ()) if f'"{name}"' not in text] == []
    loaded = effcompile.load(str(folder))
    original = result.module
    assert [n for n, _ in loaded.named_parameters()] == [n for n, _ in original.named_parameters()]
    assert [p.requires_grad for p in loaded.parameters()] == [p.requires_grad for p in original.parameters()]
    assert list(loaded.state_dict()) == list(original.state_dict())
    assert _tied_groups(loaded) == _tied_groups(original)
    assert [m.training for m in loaded.modules()] == [m.training for m in original.modules()]
    args, kwargs = result.program.args, result.program.kwargs
    expected_loss, expected_grads = _run(original, args, kwargs)
    loss, grads = _run(loaded, args, kwargs)
    assert torch.equal(loss, expected_loss)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert torch.equal(grad, expected_grads[name]), name
    if result.program.capture_path == "export":  # captured with a dynamic batch: another batch size runs
        bigger = {k: torch.cat([v, v[:1]]) for k, v in kwargs.items()}
        with torch.no_grad():
            torch.manual_seed(0)
            want = _loss(original(*args, **bigger))
            torch.manual_seed(0)
            assert torch.equal(_loss(loaded(*args, **bigger)), want)


def test_loaded_module_compiles_with_torch_compile(tmp_path):
    result = effcompile.compile(example_gpt_spec(), passes=["remat"], measure=False, verify=False)
    folder = result.save(str(tmp_path / "out"))
    assert (tmp_path / "out" / "module" / "structure.json").exists()
    loaded = effcompile.load(folder)
    tokens = result.program.args[0]
    with torch.no_grad():
        want = loaded(tokens)
        got = torch.compile(loaded, backend="aot_eager", fullgraph=False)(tokens)
    torch.testing.assert_close(got, want)


def test_sparse_attention_state_survives_the_round_trip(tmp_path):
    # Mid warm-up (importance pattern): the state, the passes left and the tiles are data and come back; the
    # accumulated scores and the mask caches are transient (rebuilt empty).
    _, passes, options = ROUND_TRIPS["gpt2-sas_importance_warmup"]
    result = effcompile.compile(tiny_spec("gpt2"), passes=passes, options=options, measure=False, verify=False)
    loaded = effcompile.load(result.save(str(tmp_path / "out")))
    pairs = [(a, b) for a, b in zip(result.module.modules(), loaded.modules()) if isinstance(a, SparseAttention)]
    assert pairs and all(isinstance(b, SparseAttention) for _, b in pairs)
    for original, copy in pairs:
        assert (copy.state, copy.warmup_left, copy.rules) == (original.state, original.warmup_left, original.rules)
        assert copy.state == "warmup" and copy.warmup_left == 3
        assert torch.equal(copy.tile_mask, original.tile_mask) and copy.importance is None
        copy.finish_warmup()  # nothing scored since loading: the saved tiles stay, and it runs sparse
        assert copy.state == "sparse" and torch.equal(copy.tile_mask, original.tile_mask)
