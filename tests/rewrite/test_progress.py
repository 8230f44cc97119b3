"""Progress on long work: the road reports each stage to a callback; the CLI prints one line per finished
stage on stderr with --progress (and on a terminal), nothing otherwise."""

import json
import re

import effcompile
from effcompile.cli import main
from effcompile.progress import Stage

MODEL = """
import torch
def build_model():
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
def example_inputs():
    return (torch.randn(3, 4),)
"""


def _model(tmp_path):
    path = tmp_path / "model.py"
    path.write_text(MODEL)
    return path


def test_progress_prints_one_line_per_stage_with_elapsed_time(tmp_path, capsys):
    code = main([str(_model(tmp_path)), "--passes", "identity", "--out", str(tmp_path / "out"), "--json",
                 "--progress"])
    captured = capsys.readouterr()
    assert code == 0
    json.loads(captured.out)  # stdout stays the report alone
    lines = captured.err.strip().splitlines()
    stages = [re.fullmatch(r"✓ (.+?)(?: \(.*\))? (\d+\.\d) s", line).group(1) for line in lines]
    assert stages == ["capture", "analysis", "pass identity", "verify identity", "save"]


def test_no_progress_lines_when_stderr_is_not_a_terminal_or_with_json(tmp_path, capsys):
    for extra in ([], ["--json"]):
        assert main([str(_model(tmp_path)), "--passes", "identity", *extra]) == 0
        assert capsys.readouterr().err == ""


def test_the_api_reports_stages_to_a_callback_and_prints_nothing(tmp_path, capsys):
    seen: list[Stage] = []
    spec = effcompile.spec.load_file_spec(_model(tmp_path))
    effcompile.compile(spec, passes=["identity"], progress=seen.append)
    assert [(s.name, s.seconds is None) for s in seen] == [
        ("capture", True), ("capture", False), ("analysis", True), ("analysis", False),
        ("pass identity", True), ("pass identity", False), ("verify identity", True), ("verify identity", False)]
    assert seen[1].detail == "symbolic_trace" and all(s.seconds >= 0 for s in seen[1::2])
    assert capsys.readouterr() == ("", "")
