"""`effcompile train` as a careless user types it: sizes checked before any work, a compiled folder trained
at its own shape by default, lengths the model cannot take refused naming the longest, and a log folder
resumed by naming it (its run.json says how to rebuild the model)."""

import json

import pytest

import effcompile
from effcompile.cli import main
from effcompile.train.data import load_corpus, minimum_bytes

from conftest import ROOT, tiny_spec

GPT = str(ROOT / "examples" / "gpt.py")  # symbolically traced: any length up to its 64 positions


@pytest.fixture(scope="module")
def compiled_folder(tmp_path_factory):
    """A tiny HF GPT-2 exported at batch 2 × 16 tokens (a length torch.export fixes), saved with --out."""
    spec = tiny_spec("gpt2", seq=16, vocab_size=256)
    return effcompile.compile(spec, verify=False, measure=False).save(str(tmp_path_factory.mktemp("c") / "out"))


def run(argv, capsys):
    code = main(["train", *[str(a) for a in argv]])
    captured = capsys.readouterr()
    return code, " ".join(captured.err.split())


@pytest.mark.parametrize("argv, message", [
    ([GPT, "--batch", "0"], "train: --batch 0 must be a positive integer"),
    ([GPT, "--seq", "0"], "train: --seq 0 must be a positive integer"),
    ([GPT, "--max-bytes", "0"], "train: --max-bytes 0 must be a positive integer"),
    ([GPT, "--passes", ","], "--passes ',' has an empty pass name"),
    ([GPT, "--max-bytes", "10", "--steps", "1"],
     f"--max-bytes 10 is too small for one batch: training and validation each need 66 bytes at --seq 64, so "
     f"--max-bytes must be ≥ {minimum_bytes(64, 0.05)} (at --val-fraction 0.05)"),
    ([GPT, "--seq", "128", "--steps", "1", "--max-bytes", "20000"],
     "--seq 128 is beyond what the model takes (IndexError: index out of range in self): its longest sequence is "
     "64 tokens; it was captured at --batch 4 --seq 64; use --seq 64 or less"),
])
def test_bad_sizes_are_one_line_exit_2(argv, message, capsys):
    code, err = run(argv, capsys)
    assert code == 2, err
    assert message in err and "Traceback" not in err


def test_the_minimum_bytes_named_are_enough(tmp_path, capsys):
    least = minimum_bytes(32, 0.05)
    corpus = load_corpus("stdlib", 0.05, 0, least)
    assert min(corpus.train.numel(), corpus.validation.numel()) >= 34
    code, err = run([GPT, "--seq", "32", "--batch", "2", "--steps", "1", "--max-bytes", least, "--quiet",
                     "--eval-batches", "1"], capsys)
    assert code == 0, err


def test_a_compiled_folder_trains_at_its_own_shape_by_default(compiled_folder, tmp_path, capsys):
    # The README's `effcompile train out/ --steps 500 --out runs/b`: the default used to be seq 128 (a shape error).
    out = tmp_path / "runs" / "b"
    code, err = run([compiled_folder, "--steps", "1", "--out", out, "--max-bytes", "20000", "--quiet",
                     "--eval-batches", "1"], capsys)
    assert code == 0, err
    config = json.loads((out / "summary.json").read_text())["config"]
    assert (config["batch"], config["seq"]) == (2, 16)
    for seq in (32, 8):
        code, err = run([compiled_folder, "--steps", "1", "--seq", seq, "--max-bytes", "20000"], capsys)
        assert code == 2 and f"--seq {seq}: the graph takes sequences of 16 tokens only" in err, err
        assert "use --seq 16 or compile the model at" in err


def test_a_log_folder_resumes_its_run_onto_the_same_trajectory(tmp_path, capsys):
    # The README's `effcompile train runs/gpt --resume --out runs/gpt` used to say "not a .py file".
    common = ["--batch", "2", "--seq", "16", "--max-bytes", "20000", "--eval-every", "0", "--eval-batches", "1",
              "--quiet"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert run([GPT, *common, "--steps", "3", "--out", full], capsys)[0] == 0
    assert run([GPT, *common, "--steps", "2", "--out", part], capsys)[0] == 0
    record = json.loads((part / "run.json").read_text())
    assert record["model"] == GPT and (record["batch"], record["seq"], record["max_bytes"]) == (2, 16, 20000)
    code, err = run([part, "--resume", "--out", part, "--steps", "3", "--quiet"], capsys)
    assert code == 0, err
    losses = [[json.loads(line)["loss"] for line in (folder / "log.jsonl").read_text().splitlines()]
              for folder in (full, part)]
    assert losses[0] == losses[1] and len(losses[0]) == 3
    assert run([part, "--resume", "--steps", "4", "--quiet"], capsys)[0] == 0  # --out defaults to the folder


@pytest.mark.parametrize("argv, message", [
    (lambda run_dir: [run_dir, "--steps", "4"], "is a training log folder; continue its run with"),
    (lambda run_dir: [run_dir, "--resume", "--out", run_dir.parent / "other"], "continues the run in its own folder"),
    (lambda run_dir: [run_dir, "--resume", "--set", "remat.budget=0.5"], "--set cannot change when resuming"),
])
def test_log_folder_misuse_is_refused(tmp_path, capsys, argv, message):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text("{}")
    code, err = run(argv(run_dir), capsys)
    assert code == 2 and message in err, err


@pytest.mark.parametrize("content, message", [
    (None, "holds a training run but no run.json"),
    ("{not json", "run.json cannot be read"),
    (json.dumps({"format": 1, "model": 3}), "is not a run record this effcompile writes"),
])
def test_a_log_folder_without_a_usable_record_says_how_to_resume(tmp_path, capsys, content, message):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "log.jsonl").write_text("")
    if content is not None:
        (run_dir / "run.json").write_text(content)
    code, err = run([run_dir, "--resume"], capsys)
    assert code == 2 and message in err and "effcompile train MODEL --resume --out" in err, err


def test_a_compiled_folder_follows_its_execution_plan_at_its_shape_and_resumes(compiled_folder, tmp_path, capsys,
                                                                              monkeypatch):
    # main's plan reading (report.json's "execution", e.g. auto's torch.compile choice) and the folder's own
    # shape and run.json together: the plan is followed on the first run and again when the log folder resumes.
    import shutil

    import torch

    folder = tmp_path / "compiled"
    shutil.copytree(compiled_folder, folder)
    report = json.loads((folder / "report.json").read_text())
    report["execution"] = {"compile": True, "stack": ["identity"], "chosen_by": "auto", "reason": "test"}
    (folder / "report.json").write_text(json.dumps(report))
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: compiled.append(module) or module)
    out = tmp_path / "run"
    common = ["--max-bytes", "20000", "--quiet", "--eval-every", "0", "--eval-batches", "1"]
    code, err = run([folder, "--steps", "1", "--out", out, *common], capsys)
    assert code == 0, err
    assert len(compiled) == 1
    config = json.loads((out / "summary.json").read_text())["config"]
    assert (config["batch"], config["seq"]) == (2, 16)
    assert json.loads((out / "run.json").read_text())["model"] == str(folder.resolve())
    code, err = run([out, "--resume", "--steps", "2", "--quiet"], capsys)
    assert code == 0, err
    assert len(compiled) == 2 and len((out / "log.jsonl").read_text().splitlines()) == 2
    code, err = run([folder, "--steps", "1", "--compile", "off", *common], capsys)
    assert code == 0 and len(compiled) == 2, err  # --compile off overrides the plan
