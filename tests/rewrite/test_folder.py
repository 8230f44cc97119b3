"""The output-folder protocol: --force replaces only effcompile's own folders, --out is checked before any
work, one writer at a time, a kill leaves the old or the new folder, write errors are one line (exit 2);
the train --out log folder follows the same rules, and a tampered checkpoint or run record runs no code on
--resume."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import effcompile
from effcompile.cli.main import main

FAST = """
import pathlib, time, torch
def build_model():
    {hook}
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
def example_inputs():
    return (torch.randn(3, 4),)
"""
TOKENS = """
import torch
def build_model():
    return torch.nn.Sequential(torch.nn.Embedding(256, 8), torch.nn.Linear(8, 256))
def example_inputs():
    return (torch.zeros(2, 16, dtype=torch.long),)
"""


def model_file(folder: Path, hook: str = "pass", text: str | None = None) -> Path:
    path = folder / "model.py"
    path.write_text(textwrap.dedent(text or FAST.format(hook=hook)))
    return path


def run(argv, capsys):
    code = main([str(a) for a in argv])
    return code, " ".join(capsys.readouterr().err.split())


def test_force_never_replaces_a_user_folder_nor_changes_its_mode(tmp_path, capsys):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "data").mkdir()
    (project / "src" / "main.py").write_text("print('mine')")
    (project / "data" / "set.csv").write_text("1,2")
    project.chmod(0o751)
    for force in ([], ["--force"]):
        code, err = run([model_file(tmp_path), "--out", project, *force], capsys)
        assert code == 2 and "not written by effcompile" in err
    assert sorted(str(p.relative_to(project)) for p in project.rglob("*")) == \
        ["data", "data/set.csv", "src", "src/main.py"]
    assert stat.S_IMODE(project.stat().st_mode) == 0o751
    with pytest.raises(effcompile.OutputError, match="not written by effcompile"):
        effcompile.compile(torch.nn.Linear(2, 2), (torch.randn(2, 2),), measure=False).save(str(project), force=True)
    assert (project / "src" / "main.py").exists()


def test_new_folder_has_normal_permissions_and_a_replaced_one_keeps_its_own(tmp_path, capsys):
    out = tmp_path / "out"
    assert run([model_file(tmp_path), "--out", out], capsys)[0] == 0
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    assert (out / "effcompile.json").exists()
    out.chmod(0o750)
    assert run([model_file(tmp_path), "--out", out, "--force"], capsys)[0] == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.py", "out"]  # no lock, staging or old folder


BAD_OUT = {  # the model lives in project/, the run starts in the folder above it
    "under a file": lambda tmp: tmp / "project" / "model.py" / "out",
    "an existing file": lambda tmp: tmp / "project" / "model.py",
    "unwritable place": lambda tmp: Path("/proc/effcompile-test/out"),
    "the current folder": lambda tmp: Path("."),
    "the parent of the current folder": lambda tmp: Path(".."),
    "the model's folder": lambda tmp: tmp / "project",
}


@pytest.mark.parametrize("case", list(BAD_OUT))
def test_bad_out_is_refused_before_any_work(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "project").mkdir()
    built = tmp_path / "built"
    model = model_file(tmp_path / "project", hook=f"pathlib.Path({str(built)!r}).touch()")
    (tmp_path / "notes.txt").write_text("keep me")
    code, err = run([model, "--out", BAD_OUT[case](tmp_path), "--force"], capsys)
    assert code == 2 and "--out" in err, err
    assert not built.exists()  # refused before the model was built
    assert (tmp_path / "notes.txt").read_text() == "keep me" and model.exists()


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "x"))

    monkeypatch.setattr("effcompile.export.module.save_file", full)
    out = tmp_path / "out"
    code, err = run([model_file(tmp_path), "--out", out], capsys)
    assert code == 2 and "No space left on device" in err and "internal error" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.py"]


def _wait_for(path: Path, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-800:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _cli(*argv) -> list[str]:
    return [sys.executable, "-m", "effcompile.cli.main", *map(str, argv)]


def test_two_writers_exactly_one_wins(tmp_path):
    waiting, go = tmp_path / "waiting", tmp_path / "go"
    hook = (f"pathlib.Path({str(waiting)!r}).touch()\n    "
            f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.05)")
    model = model_file(tmp_path, hook=hook)
    out = tmp_path / "out"
    first = subprocess.Popen(_cli(model, "--out", out, "--force"), stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(waiting, first)  # the first run holds --out while it builds the model
        other = tmp_path / "other"
        other.mkdir()
        second = subprocess.run(_cli(model_file(other), "--out", out, "--force"), capture_output=True, text=True,
                                timeout=300)
        go.touch()
        assert first.wait(timeout=120) == 0
    finally:
        go.touch()
        first.kill()
    assert second.returncode == 2 and "another effcompile run" in second.stderr, second.stderr[-500:]
    assert effcompile.load(str(out)) is not None


CHILD = """
import os, signal, sys, torch, effcompile
from effcompile.export import folder, module
result = effcompile.compile(torch.nn.Linear(3, 3), (torch.randn(2, 3),), measure=False, verify=False)
stage, ready = sys.argv[2], sys.argv[3]
def halt():
    open(ready, "w").close()
    os.kill(os.getpid(), signal.SIGKILL)
if stage == "writing":
    original = module.save_file
    def slow(tensors, path, metadata=None):
        original(tensors, path, metadata=metadata)
        halt()
    module.save_file = slow
elif stage == "between renames":
    folder._exchange = lambda first, second: False
    renames = []
    real_rename = os.rename
    def rename(src, dst):
        renames.append(dst)
        if len(renames) == 2:
            halt()
        real_rename(src, dst)
    folder.os.rename = rename
result.save(sys.argv[1], force=True)
"""


@pytest.mark.parametrize("stage", ["writing", "between renames"])
def test_a_killed_writer_leaves_old_or_new_and_the_next_run_cleans_up(stage, tmp_path):
    out = tmp_path / "out"
    old = effcompile.compile(torch.nn.Linear(3, 3), (torch.randn(2, 3),), measure=False, verify=False)
    old.save(str(out))
    old_weight = effcompile.load(str(out)).weight.detach().clone()
    ready = tmp_path / "ready"
    child = subprocess.run([sys.executable, "-c", CHILD, str(out), stage, str(ready)], capture_output=True, text=True)
    assert child.returncode == -signal.SIGKILL and ready.exists(), child.stderr[-800:]
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out."))
    if stage == "writing":
        assert torch.equal(effcompile.load(str(out)).weight, old_weight)  # the old folder, untouched
        assert any(name.startswith("out.partial-") for name in leftovers), leftovers
    else:
        assert not out.exists() and any(name.startswith("out.old-") for name in leftovers), leftovers
    new = effcompile.compile(torch.nn.Linear(3, 3), (torch.randn(2, 3),), measure=False, verify=False)
    with pytest.raises(effcompile.OutputError, match="--force"):
        new.save(str(out))  # the next run restores a missing DIR from DIR.old-<pid> first
    assert torch.equal(effcompile.load(str(out)).weight, old_weight)
    new.save(str(out), force=True)
    assert torch.equal(effcompile.load(str(out)).weight, new.module.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "ready"]


# ------------------------------------------------------------------------------ train --out

def _train(tmp_path, *extra):
    model = model_file(tmp_path, text=TOKENS)
    return [model, "--steps", "1", "--max-bytes", "20000", "--batch", "2", "--seq", "16", "--eval-batches", "1",
            "--quiet", *extra]


def test_train_out_refuses_folders_effcompile_did_not_write(tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    for extra in ([], ["--force"], ["--resume"]):
        code, err = run(["train", *_train(tmp_path, "--out", notes, *extra)], capsys)
        assert code == 2 and "not written by effcompile" in err, err
    assert sorted(p.name for p in notes.iterdir()) == ["todo.txt"]
    compiled, source = tmp_path / "compiled", tmp_path / "source"
    source.mkdir()
    assert run([model_file(source), "--out", compiled], capsys)[0] == 0
    code, err = run(["train", *_train(tmp_path, "--out", compiled, "--force")], capsys)
    assert code == 2 and "compiled module" in err
    assert (compiled / "module" / "structure.json").exists()


def test_train_force_restarts_only_effcompile_run_files(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(["train", *_train(tmp_path, "--out", out)], capsys)[0] == 0
    assert (out / "effcompile.json").exists() and (out / "checkpoint.pt").exists()
    (out / "my-notes.txt").write_text("kept")
    code, err = run(["train", *_train(tmp_path, "--out", out)], capsys)
    assert code == 2 and "already holds a training run" in err
    assert run(["train", *_train(tmp_path, "--out", out, "--force")], capsys)[0] == 0
    assert (out / "my-notes.txt").read_text() == "kept"


def _tampered_checkpoint(path: Path, marker: Path) -> None:
    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": {}, "optimizer": {}, "step": 0, "rng": Boom()}, path)


def test_resume_with_a_tampered_or_damaged_checkpoint_runs_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    options = ["--optimizer", "lion", "--lclr", "--aga"]
    assert run(["train", *_train(tmp_path, "--out", out, *options)], capsys)[0] == 0
    checkpoint = out / "checkpoint.pt"
    assert {"model", "optimizer", "scheduler", "aga", "rng", "position"} <= \
        set(torch.load(checkpoint, weights_only=True))  # tensors and plain data only
    intact = checkpoint.read_bytes()
    marker = tmp_path / "ran"
    _tampered_checkpoint(checkpoint, marker)
    code, err = run(["train", *_train(tmp_path, "--out", out, *options, "--resume", "--steps", "2")], capsys)
    assert code == 2 and "checkpoint" in err and "internal error" not in err, err
    assert not marker.exists()
    checkpoint.write_bytes(intact[: len(intact) // 2])
    code, err = run(["train", *_train(tmp_path, "--out", out, *options, "--resume", "--steps", "2")], capsys)
    assert code == 2 and "damaged" in err, err
    checkpoint.write_bytes(intact)
    assert run(["train", *_train(tmp_path, "--out", out, *options, "--resume", "--steps", "2")], capsys)[0] == 0


def test_resuming_a_log_folder_by_its_run_record_runs_nothing_from_it(tmp_path, capsys, monkeypatch):
    # `effcompile train LOGDIR --resume` rebuilds the model from LOGDIR/run.json: the checkpoint is still read
    # as data, and a record naming a model file inside the folder (or a relative path) is refused, not run.
    out = tmp_path / "run"
    assert run(["train", *_train(tmp_path, "--out", out)], capsys)[0] == 0
    record_path, checkpoint, marker = out / "run.json", out / "checkpoint.pt", tmp_path / "ran"
    record, intact = json.loads(record_path.read_text()), checkpoint.read_bytes()
    resume = ["train", out, "--resume", "--steps", "2", "--quiet"]
    _tampered_checkpoint(checkpoint, marker)
    code, err = run(resume, capsys)
    assert code == 2 and "checkpoint" in err and not marker.exists(), err
    checkpoint.write_bytes(intact)
    (out / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n" + textwrap.dedent(TOKENS))
    monkeypatch.chdir(out)  # where the relative name would find the file
    for model, message in ((out / "evil.py", "inside the log folder itself"), ("evil.py", "not an absolute path")):
        record_path.write_text(json.dumps({**record, "model": str(model)}))
        code, err = run(resume, capsys)
        assert code == 2 and message in err and "effcompile train MODEL --resume --out" in err, err
        assert not marker.exists()
    record_path.write_text(json.dumps(record))
    assert run(resume, capsys)[0] == 0


def test_disk_full_while_checkpointing_is_one_line_and_keeps_the_old_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert run(["train", *_train(tmp_path, "--out", out)], capsys)[0] == 0
    intact = (out / "checkpoint.pt").read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    code, err = run(["train", *_train(tmp_path, "--out", out, "--resume", "--steps", "2")], capsys)
    assert code == 2 and "No space left on device" in err and len(err.splitlines()) == 1, err
    assert (out / "checkpoint.pt").read_bytes() == intact and not list(out.glob("*.tmp"))


def test_ort_state_damaged_or_foreign_is_one_output_error(tmp_path):
    pytest.importorskip("onnxruntime.training")
    from effcompile.train import OrtBackend, TrainConfig

    backend = OrtBackend(tmp_path, TrainConfig(steps=1))
    state = tmp_path / "ort_state.json"
    for text, message in (('{"step": 1, "posit', "damaged"), ('["not", "a", "state"]', "not an effcompile")):
        state.write_text(text)
        with pytest.raises(effcompile.OutputError, match=message):
            backend.load_checkpoint(tmp_path)


def test_a_failed_checkpoint_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    from effcompile.train.backends import replace_atomically

    path = tmp_path / "ort_checkpoint"
    path.write_text("previous")

    def full(temporary):
        temporary.write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError):
        replace_atomically(path, full)
    assert path.read_text() == "previous" and sorted(p.name for p in tmp_path.iterdir()) == ["ort_checkpoint"]
    replace_atomically(path, lambda temporary: temporary.write_text("new"))
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["ort_checkpoint"]


def test_force_removes_every_backend_s_run_files_and_only_them(tmp_path):
    from effcompile.export.folder import prepare_log_dir
    from effcompile.train.config import RUN_FILES

    run = tmp_path / "run"
    prepare_log_dir(run, run_files=RUN_FILES)
    for name in ("ort_checkpoint", "ort_state.json", "checkpoint.pt.tmp", "notes.txt"):
        (run / name).write_text("x")
    with pytest.raises(effcompile.OutputError, match="already holds a training run"):
        prepare_log_dir(run, run_files=RUN_FILES)
    prepare_log_dir(run, force=True, run_files=RUN_FILES)
    assert sorted(p.name for p in run.iterdir()) == ["effcompile.json", "notes.txt"]
