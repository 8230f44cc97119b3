"""Time a candidate for a few real training steps (forward, backward, AdamW step) on the example inputs.

1. Clone the program (the candidate is never trained: the one ``auto`` returns starts from the captured
   weights), wrap it in ``torch.compile`` when asked, and build AdamW over its trainable parameters (fused
   on CUDA, as ``effcompile train`` does).
2. Run ``warmup`` steps (the first one compiles), then up to ``steps`` timed ones, synchronising the device
   around each; stop early when ``should_stop(times)`` says the candidate already lost, or at the deadline
   once two steps are timed.
3. Memory: on CUDA the peak bytes allocated above what was allocated before the clone (its parameters,
   gradients, optimizer state, activations, workspace); on the CPU the parameter state plus the activations
   autograd saved in one forward (``effcompile.analysis.measure_saved_bytes``) plus ``transient_bytes``.
4. An out-of-memory error or any failure ends the timing with the error's first line; everything the
   timing allocated is released (and dynamo's caches after a compiled candidate).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from effcompile.analysis import measure_saved_bytes
from effcompile.program import Program

from .cost import training_state_bytes

log = logging.getLogger(__name__)


@dataclass
class Timing:
    """Seconds of each timed step, of the first (compiling) step and of the whole warm-up; peak bytes and
    how they were measured; why timing stopped early (``stopped``) or failed (``error``)."""

    seconds: list[float] = field(default_factory=list)
    first_step_seconds: float | None = None
    warmup_seconds: float = 0.0
    peak_bytes: int | None = None
    memory_source: str = ""
    stopped: str | None = None
    error: str | None = None

    @property
    def median(self) -> float | None:
        """Median seconds of the timed steps (None if none was timed)."""
        if not self.seconds:
            return None
        ordered = sorted(self.seconds)
        return ordered[len(ordered) // 2]


def program_device(program: Program) -> torch.device:
    """The device of the program's first parameter (CPU without parameters)."""
    parameter = next(program.gm.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def make_optimizer(parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW over ``parameters``, fused when they all are floating-point CUDA tensors (as training runs)."""
    fused = bool(parameters) and all(p.is_cuda and p.is_floating_point() for p in parameters)
    return torch.optim.AdamW(parameters, lr=1e-6, fused=fused or None)


def time_training_steps(program: Program, compile: bool, warmup: int, steps: int,
                        should_stop: Callable[[list[float]], str | None], deadline: float,
                        transient_bytes: int = 0) -> Timing:
    """Train a clone of ``program`` for ``warmup`` + up to ``steps`` steps and return their timing (see the
    module docstring). ``deadline``: a ``time.perf_counter()`` value after which timing ends once two steps
    are timed. Never raises for a failing step: the error is in ``Timing.error``."""
    device = program_device(program)
    cuda = device.type == "cuda"
    timing = Timing()
    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    clone = runner = optimizer = None
    try:
        clone = program.clone()
        clone.gm.train()
        runner = torch.compile(clone.gm) if compile else clone.gm
        unique = {id(p): p for p in clone.gm.parameters() if p.requires_grad}
        optimizer = make_optimizer(list(unique.values()))
        _run_steps(clone, runner, optimizer, device, warmup, steps, should_stop, deadline, timing)
        if cuda:
            timing.peak_bytes = int(torch.cuda.max_memory_allocated(device) - base)
            timing.memory_source = "measured (CUDA peak allocated)"
        else:
            state = training_state_bytes(clone.gm)
            saved = measure_saved_bytes(clone.gm, clone)
            timing.peak_bytes = state["parameters"] + 3 * state["trainable"] + saved + transient_bytes
            timing.memory_source = "parameter state + activations measured by saved_tensors_hooks"
    except torch.OutOfMemoryError:
        timing.error = "out of memory"
    except Exception as error:  # a candidate that cannot train (a compile failure, a kernel without a case)
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        timing.error = f"{type(error).__name__}: {first[:200]}"
        log.debug("auto: timing failed", exc_info=True)
    finally:
        del clone, runner, optimizer
        gc.collect()
        if compile:
            torch._dynamo.reset()
        if cuda:
            torch.cuda.empty_cache()
    return timing


def _run_steps(program: Program, runner: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
               warmup: int, steps: int, should_stop: Callable[[list[float]], str | None], deadline: float,
               timing: Timing) -> None:
    def step() -> float:
        _synchronize(device)
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        output = runner(*program.args, **program.kwargs)
        program.objective(output).backward()
        optimizer.step()
        del output
        _synchronize(device)
        return time.perf_counter() - started

    for index in range(warmup):
        seconds = step()
        timing.warmup_seconds += seconds
        if index == 0:
            timing.first_step_seconds = seconds
    for _ in range(steps):
        timing.seconds.append(step())
        if timing.first_step_seconds is None:
            timing.first_step_seconds = timing.seconds[0]
        timing.stopped = should_stop(timing.seconds)
        if timing.stopped:
            return
        if len(timing.seconds) >= 2 and time.perf_counter() > deadline:
            timing.stopped = f"search budget spent after {len(timing.seconds)} timed steps"
            return


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
