"""Bad input a careless user types: each answered by one line naming the problem and the fix, exit 2,
before any work; and nonsense that used to be accepted silently."""

import pytest
import torch

import effcompile
from effcompile.cli import main

from conftest import ROOT, tiny_spec

GPT = ROOT / "examples" / "gpt.py"

CASES = {
    "model arg of the wrong type keeps transformers' reason": (
        ["hf:gpt2", "--model-arg", "n_layer=abc"],
        "config field 'n_layer' cannot be set to 'abc' (Validation error for field 'n_layer': TypeError: "
        "Field 'n_layer' expected int, got str (value: 'abc')); fix --model-arg n_layer"),
    "negative layer count": (["hf:gpt2", "--model-arg", "n_layer=-1"],
                             "hf:gpt2: config field n_layer=-1 must be ≥ 1 (a count or size); fix --model-arg n_layer"),
    "zero heads": (["hf:llama", "--model-arg", "num_attention_heads=0"], "num_attention_heads=0 must be ≥ 1"),
    "zero vocabulary": (["hf:bert", "--model-arg", "vocab_size=0"], "vocab_size=0 must be ≥ 1"),
    "config naming a folder": (lambda tmp: [GPT, "--config", tmp], "is a folder; pass a .toml file to --config"),
    "config not UTF-8": (lambda tmp: [GPT, "--config", _write(tmp / "c.toml", b"\xff\xfe")], "cannot be read"),
    "empty pass list": ([GPT, "--passes", ","], "--passes ',' has an empty pass name"),
    "empty pass name between commas": ([GPT, "--passes", "identity,,identity"], "has an empty pass name"),
    "export without out": ([GPT, "--export", "onnx"], "--export onnx writes into the output folder; add --out DIR"),
    "batch 0": (["hf:gpt2", "--batch", "0"], "--batch 0 must be a positive integer"),
    "seq 0": (["hf:gpt2", "--seq", "0"], "--seq 0 must be a positive integer"),
    "seq for a model file": ([GPT, "--seq", "16"], "--seq sizes the example inputs of hf: models only"),
    "max-error without verification": ([GPT, "--no-verify", "--max-error", "0.1"], "drop --no-verify"),
    "unknown device": ([GPT, "--device", "warp9"], "--device 'warp9' is not a device"),
    "hf without a type": (["hf:"], "hf: needs a model type"),
    "model file that raises": (lambda tmp: [_write(tmp / "m.py", b"raise RuntimeError('no GPU here')\n")],
                               "importing it raised RuntimeError: no GPU here; fix the model file"),
    "build_model that raises": (lambda tmp: [_write(tmp / "m.py", b"def build_model():\n    1/0\n"
                                                    b"example_inputs = (1,)\n")],
                                "build_model() raised ZeroDivisionError"),
    "option nan": ([GPT, "--passes", "lora", "--set", "lora.alpha=nan"], "lora.alpha: 'nan' is not a finite number"),
    "negative learning rate for the ORT export": ([GPT, "--lr", "-1", "--export", "onnx", "--out", "x"],
                                                  "--lr -1.0 and --weight-decay 0.0 must be finite"),
    "a folder as the model": (lambda tmp: [tmp], "is a folder, not a model file"),
    "train: infinite learning rate": (["train", GPT, "--lr", "inf"], "train: lr=inf must be a finite number"),
}


def _write(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_with_the_fix_and_exit_2(case, tmp_path, capsys):
    argv, expected = CASES[case]
    argv = argv(tmp_path) if callable(argv) else argv
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert expected in " ".join(err.split())


def test_batch_1_compiles_a_graph_that_takes_any_batch(capsys):
    # torch.export specialises a size-1 dimension; capture exports at batch 2 so the graph stays dynamic.
    result = effcompile.compile(tiny_spec("gpt2", batch=1, seq=16), passes=["identity"], measure=False)
    assert result.report.model["dynamic_batch"] is True
    assert result.report.model["example_inputs"]["kwargs"]["input_ids"]["shape"] == [1, 16]
    for batch in (1, 3):
        tokens = torch.randint(0, 128, (batch, 16))
        assert result.module(input_ids=tokens, labels=tokens).logits.shape == (batch, 16, 128)


@pytest.mark.parametrize("argv, message", [
    ([GPT, "--capture", "foo"], "effcompile: error: argument --capture: invalid choice: 'foo'"),
    ([GPT, "--batch", "x"], "effcompile: error: argument --batch: invalid int value: 'x'"),
    (["train", GPT, "--bogus"], "effcompile train: error: unrecognized arguments: --bogus; see effcompile train --help"),
])
def test_usage_errors_are_one_line_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.strip() == err.strip().splitlines()[0] and message in err
