"""Every command in the README's ``sh`` blocks runs and exits 0.

Commands run in README order in one scratch folder (later ones read what earlier ones wrote, as a reader
following the README would), through ``effcompile``'s own entry point in one separate Python process
(``python -m effcompile``'s ``main`` per command: one import of torch for all of them). They are shrunk
only as the README says a full-size run is slow: ``hf:`` models get the README's tiny ``--model-arg``
overrides and ``train`` a thousandth of its ``--steps``. The ``python`` commands of ``tools/`` run in their own
process from the same folder, the zoo's results and tables redirected into it (never the checkout's
``build/zoo`` or docs). Skipped, each listed with its reason: ``make``, commands needing a GPU,
``torchrun`` with several processes, multi-hour zoo runs and the usage synopsis (placeholders).

Every command but the synopsis and ``make`` is parsed by the real argument parsers (the effcompile
commands with their passes and options resolved; milliseconds), the skipped ones included. Run end to end:
the cheap ones in every test run (about a minute on two cores); all of them, ONNX exports, training, the
low-precision passes and the tools' CPU runs included (several minutes), with ``EFFCOMPILE_README=all``
— the expensive ones are listed as skipped otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass

import pytest

from conftest import ROOT

README = ROOT / "README.md"
#: The README's "try a command quickly" overrides (Usage section), per model type.
TINY = {
    "hf:gpt2": ["n_layer=2", "n_embd=64", "n_head=4"],
    "hf:llama": ["num_hidden_layers=2", "hidden_size=64", "intermediate_size=128", "num_attention_heads=4",
                 "num_key_value_heads=2"],
    "hf:gemma": ["num_hidden_layers=2", "hidden_size=64", "intermediate_size=128", "num_attention_heads=4",
                 "num_key_value_heads=1", "head_dim=16", "vocab_size=1024"],
    "hf:bart": ["encoder_layers=1", "decoder_layers=1", "d_model=64", "encoder_attention_heads=4",
                "decoder_attention_heads=4", "encoder_ffn_dim=128", "decoder_ffn_dim=128"],
}
PLACEHOLDERS = ("MODEL", "...", "p1,p2")
PYTHON = ("python", "python3")
#: Where the zoo's commands write instead of the checkout (relative to the scratch folder).
ZOO_RESULTS = ["--results", "zoo/results.jsonl"]
ZOO_TABLE = ["--out", "zoo/conformance.md", "--readme", "zoo/README.md"]
#: The reasons a README command may be skipped for (the first word of each).
SKIP_REASONS = {"`make`", "torchrun", "usage", "needs", "multi-hour"}


@dataclass
class Command:
    """One README command: where it is, its words, and what the test does with it."""

    where: str
    text: str
    argv: list[str]
    skip: str = ""
    expensive: str = ""
    #: A ``python`` command of ``tools/`` (run in its own process) rather than ``effcompile``.
    python: bool = False

    @property
    def tool(self) -> tuple[str, list[str]]:
        """A python command's script or module and its arguments (as given, not redirected)."""
        argv = shlex.split(self.text)
        return (argv[2], argv[3:]) if argv[1] == "-m" else (argv[1], argv[2:])


def readme_commands(text: str) -> list[Command]:
    """The commands of every ```sh block: continuation lines joined, comments dropped."""
    commands = []
    for number, block in enumerate(re.findall(r"```sh\n(.*?)```", text, re.S)):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(Command(f"sh block {number}", " ".join(words), words))
    return commands


def plan(command: Command) -> Command:
    """Decide how to run (or why to skip) a README command; shrink it as the README says."""
    argv = command.argv
    if argv[0] == "make":
        command.skip = "`make` builds .venv and runs this suite; the suite runs under it"
    elif argv[0] == "torchrun":
        command.skip = ("torchrun with several processes (tests/passes/test_pipeline_dist.py runs the pipeline "
                        "runtime under torchrun)")
    elif any(word in PLACEHOLDERS or word.endswith("...") or word.startswith("[") for word in argv):
        command.skip = "usage synopsis with placeholders, not a command"
    elif "cuda" in argv:
        command.skip = "needs a GPU"
    elif argv[0] == "source":
        command.skip = "needs a GPU machine: tools/device_env.sh makes the checkout importable there"
    elif argv[0] in PYTHON:
        command.python = True
        return _plan_tool(command)
    elif argv[0] != "effcompile":
        raise AssertionError(f"README command {command.text!r} starts with {argv[0]!r}: teach tests/test_readme.py "
                             "how to run it or why to skip it")
    else:
        command.argv = _shrunk(argv[1:])
    return command


def _plan_tool(command: Command) -> Command:
    """A ``python tools/...`` or ``python -m tools...`` command: skipped (GPU, hours), or its argv to run
    (without the interpreter), the zoo's outputs redirected into the scratch folder."""
    tool, rest = command.tool
    if tool == "tools/bench_e2e.py":
        if "--quick" not in rest:
            command.skip = "needs a GPU: bench_e2e's rows train a 125M Llama at seq 8192 on CUDA (the H200)"
        command.argv = [tool, *rest]
    elif tool == "tools.zoo":
        if rest[0] == "run" and "--only" not in rest:
            command.skip = "multi-hour run: it builds and checks every architecture of its sample (hundreds)"
        redirect = ZOO_RESULTS + (ZOO_TABLE if rest[0] == "table" else [])
        command.argv = ["-m", tool, *rest, *redirect]
    else:
        raise AssertionError(f"README command {command.text!r} runs {tool}: teach tests/test_readme.py how to run "
                             "it or why to skip it")
    return command


def _shrunk(argv: list[str]) -> list[str]:
    argv = list(argv)
    for model, overrides in TINY.items():
        if model in argv:
            argv += [word for value in overrides for word in ("--model-arg", value)]
    if argv and argv[0] == "train" and "--steps" in argv:
        at = argv.index("--steps") + 1
        argv[at] = str(max(1, int(argv[at]) // 1000))
    return argv


def mark_expensive(commands: list[Command]) -> list[Command]:
    """Say why a command is too slow for every run: an ONNX export, training, a low-precision or sparse-
    attention pass (slow CPU kernels), the example GPT (larger than the tiny hf: models), a long sequence,
    or reading a folder an expensive command wrote."""
    written: set[str] = set()
    for command in commands:
        if command.skip:
            continue
        if command.python:
            tool, rest = command.tool
            command.expensive = ("a benchmark's CPU rows (minutes)" if tool == "tools/bench_e2e.py" else
                                 "the zoo builds and checks architectures in child processes" if rest[0] == "run"
                                 else "it reads the results an expensive zoo run wrote")
            continue
        argv = command.argv
        passes = argv[argv.index("--passes") + 1].split(",") if "--passes" in argv else []
        reads = {word.rstrip("/") for word in argv[1:2]}
        reasons = [("an ONNX export", "--export" in argv), ("training", argv[0] == "train"),
                   ("a low-precision or sparse-attention pass", bool({"amp", "sas"} & set(passes))),
                   ("the example GPT", "examples/gpt.py" in argv),
                   ("a long sequence", "--seq" in argv and int(argv[argv.index("--seq") + 1]) >= 128),
                   ("it reads what an expensive command wrote", bool(reads & written))]
        command.expensive = next((why for why, hit in reasons if hit), "")
        if command.expensive and "--out" in argv:
            written.add(argv[argv.index("--out") + 1].rstrip("/"))
    return commands


COMMANDS = mark_expensive([plan(c) for c in readme_commands(README.read_text())])
RUN_ALL = os.environ.get("EFFCOMPILE_README") == "all"

DRIVER = r"""
import contextlib, io, json, os, subprocess, sys, time
from effcompile.cli.main import main

results = []
for command in json.load(open(sys.argv[1])):
    argv, started, err = command["argv"], time.perf_counter(), io.StringIO()
    if command["python"]:  # a tool: its own process, with this interpreter, writing here (not into $OUT)
        env = {key: value for key, value in os.environ.items() if key != "OUT"}
        process = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env)
        code, text = process.returncode, process.stdout[-500:] + process.stderr[-1000:]
    else:
        with contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else 2
        text = err.getvalue()[-1500:]
    results.append({"argv": argv, "code": code, "seconds": time.perf_counter() - started, "stderr": text})
    json.dump(results, open(sys.argv[2], "w"))
"""


def test_the_readme_lists_commands_and_skips_only_what_it_must():
    assert len(COMMANDS) >= 20
    assert sum(not c.skip for c in COMMANDS) >= 18 and sum(not c.skip and not c.expensive for c in COMMANDS) >= 5
    assert {c.skip.split(" ")[0] for c in COMMANDS if c.skip} <= SKIP_REASONS
    joined = readme_commands("```sh\neffcompile a \\\n    --b c   # note\n```\n")
    assert [c.argv for c in joined] == [["effcompile", "a", "--b", "c"]]


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.skip], ids=lambda c: c.text[:60])
def test_skipped_readme_command(command):
    pytest.skip(f"{command.where}: {command.text!r}: {command.skip}")


def test_every_readme_command_parses_and_its_options_resolve():
    from effcompile.cli import train as cli_train
    from effcompile.cli.main import build_parser, passes_and_file_options
    from effcompile.cli.pipeline import build_parser as pipeline_parser
    from effcompile.options import merge_options, parse_set_options, split_passes
    from effcompile.pass_manager import resolve_passes

    parsed = 0
    for command in COMMANDS:
        words = shlex.split(command.text)
        if command.python:
            _parse_tool(*command.tool)
        elif words[0] == "torchrun":
            pipeline_parser().parse_args(words[words.index("effcompile.cli.pipeline") + 1:])
        elif words[0] == "effcompile" and not command.skip.startswith("usage"):
            argv = words[1:]  # as written: the GPU commands too
            train = argv[:1] == ["train"]
            parser = cli_train.build_parser() if train else build_parser()
            args = parser.parse_args(argv[1:] if train else argv)
            passes = split_passes(args.passes or None) if train else passes_and_file_options(args)[0]
            resolve_passes(passes, merge_options(parse_set_options(args.set_options)))
        else:
            continue
        parsed += 1
    assert parsed >= len(COMMANDS) - 6  # make (2), the synopsis (3), source


def _parse_tool(tool: str, argv: list[str]) -> None:
    """Parse a tool's command line with the tool's own parser (SystemExit on an unknown flag or value)."""
    sys.path[:0] = [str(ROOT), str(ROOT / "tools")]
    try:
        if tool == "tools/bench_e2e.py":
            import bench_e2e

            bench_e2e.parse_args(argv)
        else:
            from tools.zoo.__main__ import parse_args

            parse_args(argv)
    finally:
        del sys.path[:2]


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.expensive], ids=lambda c: c.text[:60])
def test_expensive_readme_command(command):
    reason = "ran in test_readme_commands_run" if RUN_ALL else "EFFCOMPILE_README=all runs it"
    pytest.skip(f"{command.where}: {command.text!r}: expensive ({command.expensive}); {reason}")


@pytest.mark.slow
def test_readme_commands_run(tmp_path):
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    (tmp_path / "tools").symlink_to(ROOT / "tools")
    (tmp_path / "zoo").mkdir()
    (tmp_path / "zoo" / "README.md").write_text(README.read_text())  # the zoo's table rewrites this copy
    runnable = [{"argv": c.argv, "python": c.python} for c in COMMANDS
                if not c.skip and (RUN_ALL or not c.expensive)]
    (tmp_path / "commands.json").write_text(json.dumps(runnable))
    process = subprocess.run([sys.executable, "-c", DRIVER, "commands.json", "results.json"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=1800)
    results = json.loads((tmp_path / "results.json").read_text()) if (tmp_path / "results.json").exists() else []
    failed = [f"effcompile {' '.join(r['argv'])} → exit {r['code']}: {r['stderr'].strip()[-600:]}"
              for r in results if r["code"] != 0]
    assert process.returncode == 0 and len(results) == len(runnable), process.stderr[-3000:]
    assert not failed, "README commands that fail:\n" + "\n".join(failed)
