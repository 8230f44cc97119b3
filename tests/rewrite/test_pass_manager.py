"""Pass manager: options parsing, config files, verification failing a broken exact pass."""

from dataclasses import dataclass, field
from typing import Literal

import pytest
import torch

import effcompile
from effcompile import pass_manager
from effcompile.errors import OptionError, VerificationError
from effcompile.graph import finalize
from effcompile.options import build_config, load_config_file, merge_options, parse_set_options

from conftest import example_gpt_spec


@dataclass(frozen=True)
class Config:
    budget: float | str = 0.5
    policy: Literal["budget", "blocks"] = "budget"
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    merge: bool = False
    rank: int = 8

    def __post_init__(self):
        if isinstance(self.budget, float) and not 0 < self.budget <= 1:
            raise OptionError(f"demo: budget {self.budget} is outside (0, 1]; use e.g. 0.5")


def test_strings_convert_to_the_config_types():
    config = build_config("demo", Config, {"budget": "0.25", "policy": "blocks", "targets": "a, b",
                                           "merge": "true", "rank": "4"})
    assert config == Config(0.25, "blocks", ("a", "b"), True, 4)
    assert build_config("demo", Config, {"budget": "2GiB"}).budget == "2GiB"


@pytest.mark.parametrize("raw, message", [
    ({"policy": "fast"}, "demo.policy: 'fast' is not one of budget, blocks"),
    ({"rank": "x"}, "demo.rank: 'x' is not int"),
    ({"merge": "maybe"}, "demo.merge: 'maybe' is not bool"),
    ({"budget": "3"}, "demo: budget 3.0 is outside (0, 1]"),
    ({"depth": 1}, "demo: unknown option 'depth'; options are: budget, merge, policy, rank, targets"),
])
def test_bad_options_name_pass_option_and_allowed(raw, message):
    with pytest.raises(OptionError) as error:
        build_config("demo", Config, raw)
    assert message in str(error.value)


def test_set_file_and_api_options_merge(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('passes = ["remat"]\n[remat]\nbudget = 0.3\npolicy = "blocks"\n')
    data = load_config_file(path)
    assert data["passes"] == ["remat"]
    merged = merge_options({"remat": data["remat"]}, parse_set_options(["remat.budget=0.7"]))
    assert merged == {"remat": {"budget": "0.7", "policy": "blocks"}}
    nested = tmp_path / "p.toml"
    nested.write_text('[tool.effcompile.remat]\nbudget = 0.2\n')
    assert load_config_file(nested) == {"remat": {"budget": 0.2}}


class Scale(pass_manager.Pass):
    """A broken 'exact' pass: multiplies the logits by 1.01."""

    name, exact = "scale_for_test", True

    @dataclass(frozen=True)
    class Config:
        factor: float = field(default=1.01)

    def call(self, program, config):
        graph = program.gm.graph
        output = next(n for n in graph.nodes if n.op == "output")
        (result,) = output.args
        with graph.inserting_before(output):
            scaled = graph.call_function(torch.mul, (result, config.factor))
        output.args = (scaled,)
        finalize(program.gm)
        return pass_manager.PassRecord(self.name, True)


def test_exact_pass_that_breaks_numerics_fails_verification(monkeypatch):
    monkeypatch.setitem(pass_manager._REGISTRY, Scale.name, Scale)
    monkeypatch.setattr(pass_manager, "registry", lambda: dict(pass_manager._REGISTRY))
    spec = example_gpt_spec()
    with pytest.raises(VerificationError, match="scale_for_test: verification failed: output 0 differs"):
        effcompile.compile(spec, passes=[Scale.name])
    # The same rewrite declared approximate records its error and fails only past max_error.
    monkeypatch.setattr(Scale, "exact", False)
    result = effcompile.compile(spec, passes=[Scale.name], measure=False)
    verify = result.report.record(Scale.name).verify
    assert verify.ok and verify.output_max_rel == pytest.approx(0.01, rel=1e-3)
    with pytest.raises(VerificationError, match="exceeds the tolerance"):
        effcompile.compile(spec, passes=[Scale.name], max_error=1e-3, measure=False)


def test_compile_accepts_tuple_dict_and_tensor_inputs():
    linear = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    for inputs in ((x,), {"input": x}, x):
        result = effcompile.compile(linear, inputs, passes=["identity"])
        torch.testing.assert_close(result.module(x), linear(x))
    with pytest.raises(effcompile.SpecError, match="non-empty tuple or dict"):
        effcompile.compile(linear, [], passes=[])


def _declared(name, after=(), last=False):
    return type(name.title(), (pass_manager.Pass,), {"name": name, "after": after, "last": last})


@pytest.mark.parametrize("names, message", [
    (["remat", "lora"], "pass 'remat' must run after 'lora'; reorder, e.g. --passes lora,remat"),
    (["remat", "amp", "sas"], "pass 'remat' must run after 'sas'; reorder, e.g. --passes sas,amp,remat"),
    (["pipeline", "lora"], "pass 'pipeline' must be the last pass; move it to the end of --passes"),
])
def test_passes_declare_their_order_and_the_manager_checks_it(names, message):
    with pytest.raises(OptionError) as error:
        pass_manager.resolve_passes(names, {})
    assert message in str(error.value)
    assert [p.name for p, _ in pass_manager.resolve_passes(["lora", "sas", "amp", "remat"], {})] == \
        ["lora", "sas", "amp", "remat"]


def test_every_declared_predecessor_is_a_registered_pass():
    passes = pass_manager.registry()
    for cls in passes.values():
        assert set(cls.after) <= set(passes), (cls.name, cls.after)
    assert [n for n, cls in passes.items() if cls.last] == ["pipeline"]


def test_valid_order_is_a_stable_topological_sort():
    a, b, c = _declared("a"), _declared("b", after=("a",)), _declared("c", after=("b",))
    last = _declared("z", last=True)
    assert pass_manager.valid_order([c, last, b, a]) == ["a", "b", "c", "z"]
    assert pass_manager.valid_order([b, c, last, _declared("x")]) == ["b", "c", "x", "z"]
    with pytest.raises(OptionError, match="contradictory orders"):
        pass_manager.valid_order([_declared("p", after=("q",)), _declared("q", after=("p",))])
    with pytest.raises(OptionError, match="'z' and 'y' each must be the last pass"):
        pass_manager.check_order([a, last, _declared("y", last=True)])
    with pytest.raises(TypeError, match="after must be a tuple"):
        pass_manager.register(_declared("bad", after="a"))
