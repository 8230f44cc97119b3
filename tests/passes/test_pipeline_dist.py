"""The pipeline stages trained on torch.distributed.pipelining: 2 processes under torchrun (gloo, CPU)
give the loss and gradients of one process, for GPipe and 1F1B."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_CONFIGS, tiny_spec

ROOT = Path(__file__).resolve().parents[2]


def _torchrun(dump: Path, arch: str, schedules: str, batch: int, seq: int, microbatches: int) -> None:
    model_args = [a for key, value in TINY_CONFIGS[arch].items() for a in ("--model-arg", f"{key}={value}")]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "effcompile.cli.pipeline", f"hf:{arch}", *model_args, "--batch", str(batch),
               "--seq", str(seq), "--microbatches", str(microbatches), "--steps", "0",
               "--schedule", schedules, "--dump", str(dump)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.multiprocess
def test_two_process_gloo_matches_one_process(tmp_path):
    batch, seq, microbatches = 4, 16, 2
    _torchrun(tmp_path, "gpt2", "gpipe,1f1b", batch, seq, microbatches)
    spec = tiny_spec("gpt2", batch=batch, seq=seq)
    loss = spec.module(**spec.kwargs).loss
    loss.backward()
    # Every name a parameter goes by (GPT-2 ties lm_head.weight to transformer.wte.weight).
    parameters = dict(spec.module.named_parameters(remove_duplicate=False))
    reference = {name: p.grad for name, p in parameters.items()}
    for schedule in ("gpipe", "1f1b"):
        ranks = [torch.load(tmp_path / f"rank{r}_{schedule}.pt") for r in (0, 1)]
        assert ranks[0]["stages"] == [0] and ranks[1]["stages"] == [1]
        for outcome in ranks:
            assert outcome["losses"][0] == pytest.approx(loss.item(), rel=1e-5)
        names = [n for r in ranks for n in r["grads"]]
        # Every parameter has a gradient on some rank; the tied one is on both, all-reduced.
        assert {parameters[n].data_ptr() for n in names} == {p.data_ptr() for p in spec.module.parameters()}
        assert ranks[0]["grads"].keys() & ranks[1]["grads"].keys() == {"lm_head.weight"}
        for outcome in ranks:
            for name, grad in outcome["grads"].items():
                torch.testing.assert_close(grad, reference[name], rtol=1e-4, atol=1e-6, msg=f"{schedule} {name}")
