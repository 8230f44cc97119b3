"""The conformance zoo's own machinery: configs shrink from their own fields, each modality gets its
inputs, and the judges catch the defects they claim to (on synthetic models that have each defect)."""

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tools.zoo import judges  # noqa: E402
from tools.zoo.build import build  # noqa: E402
from tools.zoo.catalog import arch_from_key, hf_architectures  # noqa: E402
from tools.zoo.checks import judge_error  # noqa: E402
from tools.zoo.runner import latest, pending, select_shard  # noqa: E402
from tools.zoo.shrink import shrink_overrides  # noqa: E402
from tools.zoo.table import conformance_markdown  # noqa: E402

# ------------------------------------------------------------------------------------------- shrinking

def _config(model_type):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type]()


def test_gpt2_shrinks_by_its_own_field_names_and_renumbers_special_tokens():
    overrides = shrink_overrides(_config("gpt2"))
    assert (overrides["n_layer"], overrides["n_embd"], overrides["n_head"], overrides["vocab_size"]) == (2, 64, 4, 256)
    assert overrides["bos_token_id"] == overrides["eos_token_id"] == 255  # 50256 → the top of the new vocabulary
    assert all(overrides[k] == 0.0 for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop"))


def test_grouped_heads_stay_grouped_and_derived_fields_are_left_to_the_config():
    overrides = shrink_overrides(_config("mistral"))  # 32 heads, 8 key/value heads, head_dim derived
    assert (overrides["num_attention_heads"], overrides["num_key_value_heads"]) == (4, 2)
    assert "head_dim" not in overrides
    assert overrides["sliding_window"] == 16


def test_heads_times_head_dim_keeps_equalling_the_width_it_equalled():
    overrides = shrink_overrides(_config("mamba2"))  # heads · head_dim = expand · hidden
    config = _config("mamba2")
    assert overrides["num_heads"] * overrides.get("head_dim", config.head_dim) == config.expand * overrides["hidden_size"]


class HybridConfig:
    """A config (any object with fields) whose layers are of three kinds, named per layer."""

    model_type = "hybrid"

    def __init__(self):
        self.num_hidden_layers, self.hidden_size, self.num_attention_heads = 6, 512, 8
        self.layer_types = ["mamba", "mamba", "attention", "mamba", "moe", "mamba"]
        self.hybrid_override_pattern = "MM*MEM"

    def to_dict(self):
        return dict(vars(self))


def test_a_hybrid_keeps_one_layer_of_each_kind():
    overrides = shrink_overrides(HybridConfig())
    assert overrides["layer_types"] == ["mamba", "attention", "moe"] and overrides["num_hidden_layers"] == 3
    assert overrides["hybrid_override_pattern"] == "M*E"
    assert (overrides["hidden_size"], overrides["num_attention_heads"]) == (64, 4)


def test_a_router_top_k_the_default_config_leaves_unset_gets_a_count():
    overrides = shrink_overrides(_config("deepseek_v2"))  # num_experts_per_tok=None: its topk() cannot run
    assert overrides["num_experts_per_tok"] == 2 and overrides["n_routed_experts"] == 4


def test_per_layer_fields_of_a_heterogeneous_config_shrink_too():
    overrides = shrink_overrides(_config("dots3_note_text"))  # reading num_attention_heads globally raises
    assert (overrides["num_attention_heads"], overrides["num_key_value_heads"]) == (4, 4)


def test_layer_counts_of_parts_keep_summing_to_the_layer_count():
    overrides = shrink_overrides(_config("dory"))  # input 16 + recurrent 40 (derived) + output 16 = 72 layers
    assert (overrides["n_input_layers"], overrides["n_output_layers"], overrides["num_hidden_layers"]) == (1, 1, 3)


def test_a_loss_over_a_fixed_number_of_positions_gets_that_many_tokens():
    from tools.zoo.build import _fixed_output_length

    mismatch = ValueError("Expected input batch_size (256) to match target batch_size (64).")
    assert _fixed_output_length(mismatch, 2, 32) == 128  # Perceiver: 128 decoded positions per example
    empty = ValueError("Expected input batch_size (0) to match target batch_size (62).")
    assert _fixed_output_length(empty, 2, 32) is None  # GIT's shifted labels: not a length to retry with
    assert _fixed_output_length(ValueError("other"), 2, 32) is None


@pytest.mark.parametrize("key, inputs", [("hf:llama", {"input_ids", "labels"}), ("hf:vit", {"pixel_values", "labels"}),
                                         ("hf:whisper", {"input_features", "labels"})])
def test_one_architecture_per_modality_builds_tiny_with_its_inputs(key, inputs):
    built = build(arch_from_key(key))
    assert built.level == "tiny" and built.parameters < 2_000_000
    assert set(built.spec.kwargs) == inputs
    assert built.command().startswith(f"effcompile {key} --model-arg ")


def test_the_catalogue_comes_from_the_auto_mappings():
    keys = {a.key: a for a in hf_architectures()}
    assert {"hf:gpt2", "hf:bert", "hf:bert:causal-lm", "hf:t5", "hf:vit", "hf:whisper"} <= set(keys)
    assert keys["hf:whisper"].task == "speech-seq2seq" and keys["hf:vit"].modality == "vision"
    assert "hf:bart:masked-lm" not in keys  # the same class as its seq2seq entry: listed once


# ------------------------------------------------------------------------------------------- judges

class ClosureBlock(torch.nn.Module):
    """minGPT's pattern: the MLP is called through a lambda closing over a ModuleDict."""

    def __init__(self):
        super().__init__()
        self.attn = torch.nn.Linear(8, 8)
        self.mlp = torch.nn.ModuleDict({"fc": torch.nn.Linear(8, 8)})
        self.unused = torch.nn.Linear(8, 8)  # no gradient in the original either
        m = self.mlp
        self.mlpf = lambda x: m.fc(x)

    def forward(self, x, y):
        h = x + self.attn(x)
        return torch.nn.functional.mse_loss(h + self.mlpf(h), y)


def _objective(module, args, kwargs):
    return module(*args, **kwargs)


def _inputs():
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(4, 8, generator=generator), torch.randn(4, 8, generator=generator)), {}


def test_dead_parameters_are_caught_and_dead_in_both_listed_apart():
    torch.manual_seed(0)
    original = ClosureBlock()
    compiled = copy.deepcopy(original)  # the closure still calls the original's MLP
    args, kwargs = _inputs()
    found = judges.dead_parameters(judges.gradient_presence(original, _objective, args, kwargs),
                                   judges.gradient_presence(compiled, _objective, args, kwargs))
    assert found.dead == ["mlp.fc.weight", "mlp.fc.bias"]
    assert found.dead_in_both == ["unused.weight", "unused.bias"]
    healthy = ClosureBlock()
    presence = judges.gradient_presence(healthy, _objective, args, kwargs)
    assert judges.dead_parameters(presence, presence).dead == []
    # lowrank's factors of an unused pooler never train, as the pooler did not: dead in both. An adapter
    # that gets no gradient on a layer that trained is dead.
    original = {"pooler.dense.weight": False, "pooler.dense.bias": False, "q.weight": True}
    compiled = {"pooler.dense.down.weight": False, "pooler.dense.up.weight": False, "q.lora_A.weight": False}
    found = judges.dead_parameters(original, compiled)
    assert found.dead_in_both == ["pooler.dense.down.weight", "pooler.dense.up.weight"]
    assert found.dead == ["q.lora_A.weight"]


def test_constants_aliasing_the_original_are_caught():
    original = ClosureBlock()
    compiled = copy.deepcopy(original)
    assert judges.aliased_tensors(original, compiled) == []
    compiled.lifted_tensor_0 = original.mlp.fc.weight.detach()  # what export lifts through the closure
    compiled.register_buffer("view_of_bias", original.mlp.fc.bias.detach()[:4])
    assert judges.aliased_tensors(original, compiled) == ["lifted_tensor_0 → mlp.fc.weight",
                                                          "view_of_bias → mlp.fc.bias"]


def test_the_trajectory_catches_a_module_that_trains_differently_and_passes_an_equal_one():
    torch.manual_seed(0)
    original = ClosureBlock()
    args, kwargs = _inputs()
    before = {k: v.clone() for k, v in original.state_dict().items()}
    equal = copy.deepcopy(original)
    own = equal.mlp
    equal.mlpf = lambda x: own.fc(x)  # a deep copy's lambda still closes over the original's MLP: re-point it
    same = judges.trajectory(original, equal, _objective, args, kwargs)
    assert same.ok and same.max_rel == 0.0 and len(same.reference) == judges.TRAJECTORY_STEPS
    # A plain deep copy trains only part of itself (its MLP is the original's): its curve moves off.
    assert judges.trajectory(original, copy.deepcopy(original), _objective, args, kwargs).max_rel > 0
    frozen = copy.deepcopy(original)
    frozen.mlp = copy.deepcopy(original.mlp)
    m = frozen.mlp
    frozen.mlpf = lambda x: m.fc(x).detach()  # the MLP stops training: everything else is equal
    different = judges.trajectory(original, frozen, _objective, args, kwargs)
    assert not different.ok and different.reference[0] == different.candidate[0]
    assert all(torch.equal(v, before[k]) for k, v in original.state_dict().items())  # the judge restored the original


def test_the_gradient_judge_catches_a_small_consistent_gradient_error_the_trajectory_misses():
    # YOSO's custom backward, lost by export, changed gradients by under 1% and 5 loss values by under 1e-4.
    torch.manual_seed(0)
    original = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    args, kwargs = (torch.randn(4, 8),), {}

    def objective(module, a, k):
        return module(*a, **k).square().mean()

    nudged = copy.deepcopy(original)
    nudged[0].weight.register_hook(lambda grad: grad * 1.005)  # a gradient 0.5% off, the loss unchanged
    assert judges.trajectory(original, nudged, objective, args, kwargs).ok
    reference = judges.gradients(original, objective, args, kwargs)
    assert judges.gradient_differences(reference, judges.gradients(copy.deepcopy(original), objective, args, kwargs)) == []
    [found] = judges.gradient_differences(reference, judges.gradients(nudged, objective, args, kwargs))
    assert found.startswith("0.weight (rel 0.005")


def test_shifted_batches_keep_labels_aligned():
    ids = torch.arange(6).reshape(1, 6)
    batches = judges.shifted_batches((), {"input_ids": ids, "labels": ids.clone()}, 3)
    assert [b[1]["input_ids"].tolist() for b in batches] == [[[0, 1, 2, 3, 4, 5]], [[5, 0, 1, 2, 3, 4]], [[4, 5, 0, 1, 2, 3]]]
    assert all(torch.equal(k["input_ids"], k["labels"]) for _, k in batches)


def test_errors_are_judged_refusal_or_failure():
    from effcompile import PassError, SpecError, VerificationError

    assert judge_error("sas", PassError("sas: no attention at h.0; write it as SDPA"), 0).outcome == "refused"
    assert judge_error("amp", VerificationError("amp: verification failed: ..."), 0).outcome == "failed"
    assert judge_error("x", PassError("x: RuntimeError: boom (after passes []); report it"), 0).outcome == "failed"
    assert judge_error("x", SpecError("\x1b[31mred\x1b[0m"), 0).outcome == "failed"
    assert judge_error("x", SpecError("two\nlines"), 0).outcome == "failed"
    assert judge_error("x", RuntimeError("plain bug"), 0).outcome == "failed"


# ------------------------------------------------------------------------------------------- runner, table

def test_runner_resumes_shards_and_tables(tmp_path):
    archs = [arch_from_key(k) for k in ("hf:gpt2", "hf:llama", "hf:vit")]
    assert [a.key for a in select_shard(archs, "2/2")] == ["hf:llama"]
    results = tmp_path / "results.jsonl"
    rows = [{"kind": "run", "command": "python -m tools.zoo run", "started": "now"},
            {"kind": "build", "arch": "hf:gpt2", "modality": "text", "class_name": "GPT2LMHeadModel", "level": "tiny",
             "seconds": 1.0},
            {"kind": "check", "arch": "hf:gpt2", "modality": "text", "check": "identity", "outcome": "verified",
             "message": "", "seconds": 2.0},
            {"kind": "check", "arch": "hf:gpt2", "modality": "text", "check": "sas", "outcome": "refused",
             "message": "sas: no attention found at h.0; write it as SDPA", "seconds": 1.0},
            {"kind": "build", "arch": "hf:vit", "modality": "vision", "class_name": "ViT", "error": "boom", "seconds": 0}]
    results.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"torn')
    todo = {a.key: c for a, c in pending(archs, ["identity", "sas"], results, redo=False)}
    assert todo == {"hf:llama": ["identity", "sas"]}  # gpt2 done, vit did not build
    builds, checks = latest(rows)
    assert set(builds) == {"hf:gpt2", "hf:vit"} and checks[("hf:gpt2", "sas")]["outcome"] == "refused"
    table = conformance_markdown(rows)
    assert "| `sas` | 0 | 0 | 1 | 0 | 0 | 1/1 (100%) |" in table and "python -m tools.zoo run" in table
    assert "| `hf:vit` | ViT | not built |" in table


def test_modality_summary_counts_what_transformers_itself_cannot_build_apart():
    """The identity rate is given of all architectures, of those transformers builds from its own default
    config, and of those the zoo built tiny; an architecture whose default config transformers cannot build
    counts in the first rate only."""
    from tools.zoo.table import summary_markdown

    builds = {"hf:a": {"modality": "text"}, "hf:b": {"modality": "text"},
              "hf:c": {"modality": "text", "error": "BuildError: tiny: ValueError: shapes"},
              "hf:d": {"modality": "text", "error": "BuildError: transformers cannot build D from its own default "
                                                   "config (KeyError: 'x'); tiny: SpecError: ..."}}
    checks = {("hf:a", "identity"): {"outcome": "verified", "message": ""},
              ("hf:b", "identity"): {"outcome": "refused", "message": "cannot capture"}}
    row = next(line for line in summary_markdown(builds, checks).splitlines() if line.startswith("| text"))
    assert row == "| text | 4 | 3 | 2 | 1 | 25% / 33% / 50% |"


def test_the_table_lists_what_was_captured_specialised_on_its_examples_data():
    rows = [{"kind": "build", "arch": "hf:fsmt", "modality": "text", "level": "tiny"},
            {"kind": "check", "arch": "hf:fsmt", "check": "identity", "outcome": "verified", "message": "",
             "details": {"data_branches": ["at transformers/models/fsmt/modeling_fsmt.py:266 (Eq(u0, 1) is False)"]}}]
    text = conformance_markdown(rows)
    section = text.split("## Captured specialised on the example's data", 1)[1].split("\n## ", 1)[0]
    assert "- `hf:fsmt`: at transformers/models/fsmt/modeling_fsmt.py:266" in section
