"""The CLI: the road end to end, and every bad input answered with one line and exit code 2."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import effcompile
from effcompile.cli import main

from conftest import ROOT, TINY_CONFIGS


def run(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, " ".join(captured.err.split())


def model_args(arch):
    return [x for key, value in TINY_CONFIGS[arch].items() for x in ("--model-arg", f"{key}={value}")]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_hf_identity_writes_a_reloadable_module(arch, tmp_path, capsys):
    out = tmp_path / "x"
    code, stdout, _ = run([f"hf:{arch}", *model_args(arch), "--seq", 16, "--passes", "identity", "--out", out], capsys)
    assert code == 0
    assert "identity" in stdout and "export" in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["capture_path"] == "export"
    (record,) = report["passes"]
    assert record["name"] == "identity" and record["verify"]["ok"]
    assert record["verify"]["output_max_abs"] == 0.0 and record["verify"]["grad_max_abs"] == 0.0
    module = effcompile.load(out)
    spec = effcompile.spec.load_hf_spec(arch, TINY_CONFIGS[arch], batch=2, seq=16)
    torch.manual_seed(0)
    expected = spec.module(**spec.kwargs)
    torch.manual_seed(0)
    got = module(**spec.kwargs)
    torch.testing.assert_close(got.logits, expected.logits)
    torch.testing.assert_close(got.loss, expected.loss)


def test_model_file_and_json_report(capsys):
    code, stdout, _ = run([ROOT / "examples" / "gpt.py", "--passes", "identity", "--json"], capsys)
    assert code == 0
    report = json.loads(stdout)
    assert report["model"]["capture_path"] == "symbolic_trace"
    assert report["model"]["saved_activation_bytes"] > 0 and report["model"]["flops"] > 0


def test_list_passes(capsys):
    code, stdout, _ = run(["--list-passes"], capsys)
    assert code == 0 and "identity" in stdout


def write(tmp_path, text, name="model.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


GOOD = """
import torch
def build_model():
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
def example_inputs():
    return (torch.randn(3, 4),)
"""


BAD_INPUTS = {
    "missing file": (lambda tmp: [tmp / "nope.py"], "does not exist"),
    "not python": (lambda tmp: [write(tmp, "x", "m.txt")], "is not a .py file"),
    "no build_model": (lambda tmp: [write(tmp, "import torch\nexample_inputs = (torch.ones(1),)\n")],
                       "defines neither build_model() nor model"),
    "no example_inputs": (lambda tmp: [write(tmp, "import torch\nmodel = torch.nn.Linear(2, 2)\n")],
                          "defines no example_inputs"),
    "inputs of the wrong kind": (lambda tmp: [write(tmp, "import torch\nmodel = torch.nn.Linear(2, 2)\n"
                                                         "example_inputs = 3\n")],
                                 "example_inputs must be a non-empty tuple or dict of tensors, got int"),
    "build_model not a module": (lambda tmp: [write(tmp, "def build_model(): return 3\nexample_inputs=(1,)\n")],
                                 "not a torch.nn.Module"),
    "syntax error": (lambda tmp: [write(tmp, "def build_model(:\n")], "syntax error"),
    "unknown hf type": (lambda tmp: ["hf:gpt9000"], "unknown Hugging Face model type hf:gpt9000"),
    "unknown config key": (lambda tmp: ["hf:gpt2", "--model-arg", "n_lyer=2"], "config has no field 'n_lyer'"),
    "bad model arg": (lambda tmp: ["hf:gpt2", "--model-arg", "n_layer"], "is not key=value"),
    "unknown pass": (lambda tmp: [write(tmp, GOOD), "--passes", "warp"], "unknown pass 'warp'"),
    "duplicate pass": (lambda tmp: [write(tmp, GOOD), "--passes", "identity,identity"], "listed twice"),
    "options for absent pass": (lambda tmp: [write(tmp, GOOD), "--set", "identity.x=1"],
                                "not in --passes"),
    "unknown option": (lambda tmp: [write(tmp, GOOD), "--passes", "identity", "--set", "identity.speed=9"],
                       "identity: unknown option 'speed'"),
    "malformed --set": (lambda tmp: [write(tmp, GOOD), "--set", "budget"], "is not pass.option=value"),
    "uncapturable": (lambda tmp: [write(tmp, """
        import torch
        class M(torch.nn.Module):
            def forward(self, x):
                return x * float(x.detach().numpy().max())  # a NumPy round trip: no capture follows it
        model = M()
        example_inputs = (torch.randn(2, 2),)
        """)], "cannot capture model"),
    "no model": (lambda tmp: [], "no model given"),
    "bad config file": (lambda tmp: [write(tmp, GOOD), "--config", write(tmp, "passes = [", "c.toml")],
                        "is not valid TOML"),
    "missing config file": (lambda tmp: [write(tmp, GOOD), "--config", tmp / "none.toml"], "does not exist"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2(case, tmp_path, capsys):
    make_args, expected = BAD_INPUTS[case]
    code, stdout, stderr = run(make_args(tmp_path), capsys)
    assert code == 2, stderr
    assert expected in stderr
    assert "Traceback" not in stderr and stderr.startswith("effcompile: error:")


def test_option_of_wrong_type_names_pass_option_and_type(monkeypatch, tmp_path, capsys):
    from dataclasses import dataclass, field

    from effcompile.pass_manager import _REGISTRY, Pass, PassRecord

    class Budgeted(Pass):
        name, exact = "budgeted", True

        @dataclass(frozen=True)
        class Config:
            budget: float = field(default=0.5, metadata={"help": "fraction"})

        def call(self, program, config):
            return PassRecord(self.name, False, "test pass")

    monkeypatch.setitem(_REGISTRY, "budgeted", Budgeted)
    monkeypatch.setattr("effcompile.pass_manager.registry", lambda: dict(_REGISTRY))
    code, _, stderr = run([write(tmp_path, GOOD), "--passes", "budgeted", "--set", "budgeted.budget=lots"], capsys)
    assert code == 2
    assert "budgeted.budget: 'lots' is not float" in stderr


def test_order_violation_is_refused_before_running(monkeypatch, tmp_path, capsys):
    from effcompile import pass_manager

    class Second(pass_manager.Pass):
        name = "second"
        after = ("identity",)

        def call(self, program, config):  # pragma: no cover - never reached
            raise AssertionError("ran although the order was wrong")

    monkeypatch.setitem(pass_manager._REGISTRY, "second", Second)
    monkeypatch.setattr(pass_manager, "registry", lambda: dict(pass_manager._REGISTRY))
    code, _, stderr = run([write(tmp_path, GOOD), "--passes", "second,identity"], capsys)
    assert code == 2
    assert "pass 'second' must run after 'identity'" in stderr and "--passes identity,second" in stderr


def test_out_replaces_only_effcompile_folders_and_only_with_force(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for force in ([], ["--force"]):
        code, _, stderr = run([write(tmp_path, GOOD), "--out", mine, *force], capsys)
        assert code == 2 and "not written by effcompile" in stderr
        assert (mine / "notes.txt").read_text() == "keep me"
    out = tmp_path / "out"
    assert run([write(tmp_path, GOOD), "--out", out], capsys)[0] == 0
    code, _, stderr = run([write(tmp_path, GOOD), "--out", out], capsys)
    assert code == 2 and "--force" in stderr
    (out / "extra.txt").write_text("inside an effcompile folder")
    code, _, _ = run([write(tmp_path, GOOD), "--out", out, "--force"], capsys)
    assert code == 0 and (out / "report.json").exists() and not (out / "extra.txt").exists()


def test_failure_leaves_no_partial_output(monkeypatch, tmp_path, capsys):
    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("effcompile.export.module.save_module", broken_save)
    out = tmp_path / "out"
    code, _, stderr = run([write(tmp_path, GOOD), "--out", out], capsys)
    assert code == 2 and "disk full" in stderr and len(stderr.strip().splitlines()) == 1
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model.py"]


def test_console_script_no_traceback_and_debug_shows_it(tmp_path):
    exe = Path(sys.executable).parent / "effcompile"
    result = subprocess.run([str(exe), str(tmp_path / "missing.py")], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = subprocess.run([str(exe), str(tmp_path / "missing.py"), "--debug"], capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_module_from_a_model_file_loads_in_a_new_process(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, _ = run([ROOT / "examples" / "gpt.py", "--out", out], capsys)
    assert code == 0
    script = (f"import torch, effcompile; m = effcompile.load({str(out)!r}); "
              "print(tuple(m(torch.zeros(2, 64, dtype=torch.long)).shape))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-500:]
    assert "(2, 64, 256)" in result.stdout
