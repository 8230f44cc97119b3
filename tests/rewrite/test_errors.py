"""One error taxonomy end to end: bad input → 2, a failed numerical check → 1, a bug → 3 ("report it"),
from the CLI and as the same classes from the Python API."""

from dataclasses import dataclass, field

import pytest
import torch

import effcompile
from effcompile import pass_manager
from effcompile.cli import main
from effcompile.errors import (
    EffcompileError,
    InternalError,
    OptionError,
    PassError,
    ResourceError,
    ToleranceError,
    VerificationError,
)
from effcompile.graph import finalize

MODEL = """
import torch
def build_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
def example_inputs():
    return (torch.randn(3, 4, generator=torch.Generator().manual_seed(0)),)
"""


class Boom(pass_manager.Pass):
    """A pass with a bug (an exception nobody raised on purpose), or one refusing on purpose."""

    name, exact = "boom_for_test", True

    @dataclass(frozen=True)
    class Config:
        kind: str = field(default="bug")

    def call(self, program, config):
        if config.kind == "bug":
            return {}["missing"]  # KeyError: a bug
        if config.kind == "memory":
            raise MemoryError("cannot allocate 128 GB")
        raise PassError("boom_for_test: this model has no widget; add one")


class Nudge(pass_manager.Pass):
    """An approximate pass moving the outputs by 1%."""

    name, exact = "nudge_for_test", False

    @dataclass(frozen=True)
    class Config:
        pass

    def call(self, program, config):
        graph = program.gm.graph
        output = next(n for n in graph.nodes if n.op == "output")
        with graph.inserting_before(output):
            scaled = graph.call_function(torch.mul, (output.args[0], 1.01))
        output.args = (scaled,)
        finalize(program.gm)
        return pass_manager.PassRecord(self.name, True)


@pytest.fixture
def test_passes(monkeypatch):
    pass_manager.registry()  # import the real passes first
    for cls in (Boom, Nudge):
        monkeypatch.setitem(pass_manager._REGISTRY, cls.name, cls)
    monkeypatch.setattr(pass_manager, "registry", lambda: dict(pass_manager._REGISTRY))


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.py"
    path.write_text(MODEL)
    return path


def run(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, " ".join(captured.err.split()), captured.err


def test_a_bug_inside_a_pass_is_an_internal_error_naming_the_pass_and_those_before(test_passes, model_file, capsys):
    code, err, raw = run([model_file, "--passes", "identity,boom_for_test"], capsys)
    assert code == 3, err
    assert err.startswith("effcompile: internal error: pass 'boom_for_test' (after passes: identity) failed with "
                          "KeyError")
    assert "report it" in err and "--debug" in err and "Traceback" not in raw
    assert len(raw.strip().splitlines()) == 1
    spec = effcompile.spec.load_file_spec(model_file)
    with pytest.raises(InternalError, match="pass 'boom_for_test' \\(the first pass\\)") as error:
        effcompile.compile(spec, passes=["boom_for_test"])
    assert isinstance(error.value.__cause__, KeyError) and error.value.exit_code == 3


def test_debug_re_raises_with_the_original_as_cause(test_passes, model_file):
    with pytest.raises(InternalError) as error:
        main([str(model_file), "--passes", "boom_for_test", "--debug"])
    assert isinstance(error.value.__cause__, KeyError)


def test_an_error_a_pass_raises_on_purpose_stays_bad_input(test_passes, model_file, capsys):
    code, err, _ = run([model_file, "--passes", "boom_for_test", "--set", "boom_for_test.kind=refuse"], capsys)
    assert code == 2 and err == "effcompile: error: boom_for_test: this model has no widget; add one"


def test_out_of_memory_is_not_a_bug(test_passes, model_file, capsys):
    code, err, _ = run([model_file, "--passes", "boom_for_test", "--set", "boom_for_test.kind=memory"], capsys)
    assert code == 2 and "out of memory" in err and "--batch" in err and "report it" not in err
    spec = effcompile.spec.load_file_spec(model_file)
    with pytest.raises(ResourceError):
        effcompile.compile(spec, passes=["boom_for_test"], options={"boom_for_test": {"kind": "memory"}})


def test_a_bug_outside_any_pass_names_its_stage(monkeypatch, model_file, capsys):
    def broken(program):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(pass_manager, "analyze", broken)
    code, err, _ = run([model_file, "--passes", "identity"], capsys)
    assert code == 3 and "internal error: analysis of the captured program failed with ZeroDivisionError" in err


def test_exceeding_max_error_is_a_tolerance_not_a_bug(test_passes, model_file, capsys):
    code, err, _ = run([model_file, "--passes", "nudge_for_test", "--max-error", "0.001"], capsys)
    assert code == 1
    assert "nudge_for_test: the output's relative error 0.01 exceeds --max-error 0.001" in err
    assert "raise --max-error or tighten nudge_for_test's options" in err and "bug" not in err
    code, _, _ = run([model_file, "--passes", "nudge_for_test", "--max-error", "0.05"], capsys)
    assert code == 0
    spec = effcompile.spec.load_file_spec(model_file)
    with pytest.raises(ToleranceError) as error:
        effcompile.compile(spec, passes=["nudge_for_test"], max_error=0.001)
    assert isinstance(error.value, VerificationError) and error.value.exit_code == 1


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "-inf"])
def test_max_error_must_be_finite_and_non_negative(model_file, capsys, value):
    code, err, _ = run([model_file, "--passes", "identity", f"--max-error={value}"], capsys)
    assert code == 2 and "--max-error" in err and "finite number ≥ 0" in err


def test_api_raises_the_same_classes(model_file):
    spec = effcompile.spec.load_file_spec(model_file)
    with pytest.raises(OptionError, match="finite number"):
        effcompile.compile(spec, passes=["identity"], max_error=-1)
    with pytest.raises(OptionError, match="drop --no-verify"):
        effcompile.compile(spec, passes=["identity"], max_error=0.1, verify=False)
    for cls in (InternalError, ToleranceError, ResourceError):
        assert issubclass(cls, EffcompileError) and cls.__name__ in dir(effcompile.errors)
    assert (InternalError.exit_code, ToleranceError.exit_code, ResourceError.exit_code) == (3, 1, 2)


def test_an_unexpected_exception_anywhere_is_one_line_exit_3(monkeypatch, model_file, capsys):
    def broken(*args, **kwargs):
        raise ValueError("first line\nsecond line")

    monkeypatch.setattr("effcompile.report.render", broken)
    code, err, raw = run([model_file, "--passes", "identity"], capsys)
    assert code == 3 and len(raw.strip().splitlines()) == 1
    assert "ValueError: first line" in err and "second line" not in err and "report it" in err
