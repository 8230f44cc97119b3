"""What the training loop (``effcompile.train.loop``) drives: a backend takes optimizer steps, evaluates and
saves/restores its own state; the loop owns the data, the log, validation, stopping and the summary.

- ``TorchBackend``: a compiled module (or any ``nn.Module``) with the named optimizer, one parameter group
  per layer and its LR schedule (``schedules``), adaptive gradient accumulation (``aga``); its checkpoint is
  one ``checkpoint.pt`` (model, optimizer, scheduler, AGA, RNG states and the loop's state).
- ``OrtBackend``: ONNX Runtime training artifacts (``OrtTrainer``), AdamW as exported, the warm-up /
  cosine schedule applied per step; its checkpoint is ``ort_checkpoint`` plus ``ort_state.json``.

Checkpoints are data: ``checkpoint.pt`` is read with ``torch.load(weights_only=True)`` (tensors and plain
Python values, so a crafted file runs no code), ``ort_state.json`` as JSON, ``ort_checkpoint`` by ONNX
Runtime (flatbuffers). A damaged, truncated or foreign checkpoint is one OutputError. Each file is written
beside its final name and renamed over it, so a failed write (disk full: an OSError, which the loop reports
as one line) keeps the previous checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import OutputError, SpecError
from ..plans import ExecutionPlan
from .aga import AdaptiveAccumulation, GradientVarianceMeter
from .config import CHECKPOINT, ORT_CHECKPOINT, ORT_STATE, TEMPORARY_SUFFIX, TrainConfig
from .inputs import check_shape, input_builder, objective, token_shape
from .schedules import LayerSchedule, build_optimizer

NextBatch = Callable[[], torch.Tensor]
#: What every checkpoint's loop state holds (``Trainer.save_checkpoint``).
LOOP_STATE_KEYS = frozenset({"step", "position", "tokens", "train_seconds", "validation"})
_START_OVER = "start over with --force or resume from an intact checkpoint"


@dataclass
class StepOutcome:
    """One optimizer step: the mean micro-batch loss (a float, or a 0-d tensor still on the device that the
    loop reads back at its next log interval), how many micro-batches it took, the host time it took to run
    or queue it in seconds, and the fields it adds to the step's log record (``fields`` before the token
    counts — ``lr``, ``accum`` —, ``extra`` after them)."""

    loss: float | torch.Tensor
    micro_batches: int
    seconds: float
    fields: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class Backend:
    """The interface the loop drives. ``name`` goes into the summary."""

    name: str = ""

    def train_step(self, next_batch: NextBatch, step: int) -> StepOutcome:
        """One optimizer step at ``step`` (0-based) on micro-batches drawn with ``next_batch()``."""
        raise NotImplementedError

    def evaluate(self, batches: list[torch.Tensor]) -> float:
        """The mean loss over ``batches`` without changing the parameters or the training RNG."""
        raise NotImplementedError

    def synchronize(self) -> None:
        """Wait until the device has finished the work queued so far (the loop reads its clock then)."""

    def save_checkpoint(self, folder: Path, state: dict[str, Any]) -> Path:
        """Write this backend's state and the loop's ``state`` (JSON-ready) under ``folder``; returns the
        checkpoint's path. Raises OSError when a write fails, having removed its partial files (the
        previous checkpoint stays)."""
        raise NotImplementedError

    def load_checkpoint(self, folder: Path) -> dict[str, Any]:
        """Restore what ``save_checkpoint`` wrote under ``folder``; returns the loop's state. Raises
        SpecError when there is no checkpoint, OutputError for a damaged or foreign one."""
        raise NotImplementedError


def replace_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(temporary)`` beside ``path``, then rename it over ``path``; on any error the temporary is
    removed (file or folder) and the error re-raised, so ``path`` keeps its previous contents."""
    temporary = path.with_name(path.name + TEMPORARY_SUFFIX)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        if temporary.is_dir() and not temporary.is_symlink():
            import shutil

            shutil.rmtree(temporary, ignore_errors=True)
        else:
            temporary.unlink(missing_ok=True)
        raise


def read_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """``checkpoint.pt``'s contents, read with ``torch.load(weights_only=True)``: tensors and plain Python data
    only, so a crafted file runs no code. Raises OutputError for a damaged, truncated or foreign file."""
    import pickle
    import zipfile

    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, RuntimeError, OSError, ValueError,
            AttributeError, ImportError, KeyError, TypeError) as error:
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise OutputError(f"{path} is damaged or not an effcompile checkpoint (it loads only tensors and plain "
                          f"data: {reason}); {_START_OVER}") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "scheduler", "aga", "rng"} | LOOP_STATE_KEYS <= set(state):
        raise OutputError(f"{path} is not an effcompile checkpoint; {_START_OVER}")
    return state


# ------------------------------------------------------------------------------------------------ torch

class TorchBackend(Backend):
    """Trains a module in PyTorch: N micro-batches per step (``accum``, or AGA's rule), gradient clipping,
    the optimizer (AdamW fused on CUDA) and its per-layer LR schedule. ``model``: an effcompile
    ``CompileResult`` (its module, example inputs, loss and execution plan are used) or an ``nn.Module``.

    The step runs the module compiled when ``config.compile`` is ``on``, or ``auto`` and the execution plan
    (``execution``, else the CompileResult's) says so, and under ``torch.autocast`` when ``config.autocast``
    asks. It queues its work without reading anything back (the loss stays a device tensor; clipping and
    the fused optimizer need no host value) — except with AGA, whose rule reads one variance per step.
    Validation runs the eager module. Raises SpecError for a model it cannot feed."""

    name = "torch"

    def __init__(self, model: Any, config: TrainConfig, loss_fn: Callable[..., torch.Tensor] | None = None,
                 example_inputs: Any = None, execution: ExecutionPlan | None = None) -> None:
        self.config = config
        self.module, args, kwargs, program_loss = _unpack(model)
        if example_inputs is not None:
            from ..spec import normalise_inputs

            args, kwargs = normalise_inputs(example_inputs, "train()")
        self.build_inputs = input_builder(self.module, args, kwargs)
        program = getattr(model, "program", None)
        if program is not None and program.capture_path == "export":
            lengths = {v.shape[1] for v in [*args, *kwargs.values()]
                       if isinstance(v, torch.Tensor) and v.dim() == 2 and not v.is_floating_point()}
            if lengths and config.seq not in lengths:
                raise SpecError(f"the module was captured (torch.export) at sequence length {min(lengths)}, "
                                f"which its graph fixes; train with --seq {min(lengths)} or compile at seq "
                                f"{config.seq}")
        check_shape(self.module, self.build_inputs, config.batch, config.seq, token_shape(args, kwargs))
        self.loss_fn = loss_fn or program_loss
        self.device = _device_of(self.module)
        self.execution = execution or (program.plan(ExecutionPlan) if program is not None else None)
        self.compiled = should_compile(config.compile, self.execution)
        self.runner = _runner(model, self.module, self.execution, self.compiled)
        self.autocast_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(config.autocast)
        self.optimizer, self.scheduler = build_optimizer(self.module, config)
        self.parameters = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.aga = AdaptiveAccumulation(config.aga_alpha, config.aga_epsilon, config.max_accum, config.aga_beta,
                                        config.accum, config.aga_probe_every, config.aga_relative)
        self.meter = GradientVarianceMeter(self.parameters) if config.aga else None

    def _loss(self, tokens: torch.Tensor, module: torch.nn.Module | None = None) -> torch.Tensor:
        args, kwargs = self.build_inputs(tokens)
        module = self.runner if module is None else module
        context = torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None \
            else contextlib.nullcontext()
        with context:
            return objective(module(*args, **kwargs), tokens, args, kwargs, self.loss_fn)

    def synchronize(self) -> None:
        """Wait for the CUDA device (nothing to wait for on the CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def train_step(self, next_batch: NextBatch, step: int) -> StepOutcome:
        """One optimizer step over N micro-batches (the step's LR comes from the scheduler); the returned loss
        is a device tensor."""
        config = self.config
        started = time.perf_counter()
        n = self.aga.next_accum() if config.aga else config.accum
        rule = self.aga.rule() if config.aga else n
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.optimizer.zero_grad(set_to_none=True)
        if self.meter is not None:
            self.meter.start(n)
        total: torch.Tensor | None = None
        for _ in range(n):
            loss = self._loss(next_batch().to(self.device, non_blocking=True))
            (loss / n).backward()
            if self.meter is not None:
                self.meter.after_backward()
            total = loss.detach().float() if total is None else total + loss.detach().float()
        variance = self.meter.finish() if self.meter is not None else None  # AGA: one read-back per step
        self.aga.observe(variance, self.meter.mean_sq if self.meter is not None else None, n)
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.parameters, config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        extra: dict[str, Any] = {}
        if config.aga:
            extra.update(sigma2=self.aga.sigma2, step_sigma2=variance, signal=self.aga.signal, epsilon=self.aga.epsilon)
        if self.device.type == "cuda":
            extra["peak_mem_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return StepOutcome(total / n, n, time.perf_counter() - started,
                           {"lr": lrs[0], "lr_last": lrs[-1], "accum": n, "accum_rule": rule}, extra)

    @torch.no_grad()
    def evaluate(self, batches: list[torch.Tensor]) -> float:
        """Mean loss over ``batches`` in eval mode (RNG state untouched, so training is unaffected)."""
        was_training = self.module.training
        self.module.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            losses = [self._loss(tokens.to(self.device), self.module).float() for tokens in batches]
            value = float(torch.stack(losses).mean())
        self.module.train(was_training)
        return value

    def save_checkpoint(self, folder: Path, state: dict[str, Any]) -> Path:
        """``folder/checkpoint.pt``: model, optimizer, scheduler, AGA, RNG and the loop's ``state``, written
        atomically."""
        path = folder / CHECKPOINT
        path.parent.mkdir(parents=True, exist_ok=True)
        everything = {**state, "model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                      "scheduler": self.scheduler.state_dict(), "aga": self.aga.state_dict(),
                      "rng": _rng_state(self.device)}
        replace_atomically(path, lambda temporary: torch.save(everything, temporary))
        return path

    def load_checkpoint(self, folder: Path) -> dict[str, Any]:
        """Restore ``folder/checkpoint.pt``. The LR schedule follows the current config (a resumed run may
        train for more steps); only the scheduler's step counter comes from the checkpoint."""
        path = folder / CHECKPOINT
        if not path.exists():
            raise SpecError(f"--resume: {path} does not exist; run without --resume first")
        state = read_checkpoint(path, self.device)
        try:
            self._restore(state)
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as error:
            raise OutputError(f"{path} does not match this run ({type(error).__name__}: {str(error)[:160]}); resume "
                              "with the model and options that wrote it, or start over with --force") from None
        return state

    def _restore(self, state: dict[str, Any]) -> None:
        """Load the model, optimizer, scheduler, AGA and RNG parts of ``state`` (popping them)."""
        self.module.load_state_dict(state.pop("model"))
        self.optimizer.load_state_dict(state.pop("optimizer"))
        schedules = [dict(vars(f)) for f in self.scheduler.lr_lambdas]
        self.scheduler.load_state_dict(state.pop("scheduler"))
        for function, attributes in zip(self.scheduler.lr_lambdas, schedules):
            vars(function).update(attributes)
        for group, base, function in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                         self.scheduler.lr_lambdas):
            group["lr"] = base * function(self.scheduler.last_epoch)
        self.aga.load_state_dict(state.pop("aga"))
        rng = state.pop("rng")
        rng["torch"] = rng["torch"].cpu()
        if "cuda" in rng:
            rng["cuda"] = rng["cuda"].cpu()
        _set_rng_state(rng, self.device)


def should_compile(setting: str, execution: ExecutionPlan | None) -> bool:
    """Whether training runs the module compiled: ``setting`` ``on`` / ``off``, or ``auto`` — what the execution
    plan says (compiled only when a pass such as ``auto`` chose it)."""
    if setting in ("on", "off"):
        return setting == "on"
    return bool(execution is not None and execution.compile)


def _runner(model: Any, module: torch.nn.Module, execution: ExecutionPlan | None, compiled: bool) -> torch.nn.Module:
    """What the step calls: the CompileResult's runnable (its plan's compiled wrapper, built once) when that is
    the decision, else ``torch.compile(module)`` or the module itself."""
    if not compiled:
        return module
    if execution is not None and execution.compile:
        own = getattr(model, "execution", None) is execution and callable(getattr(model, "runnable", None))
        return model.runnable() if own else execution.runnable(module)
    return torch.compile(module)


def _unpack(model: Any) -> tuple[torch.nn.Module, tuple, dict[str, Any], Callable[..., torch.Tensor] | None]:
    program = getattr(model, "program", None)
    if program is not None and isinstance(getattr(model, "module", None), torch.nn.Module):
        return model.module, tuple(program.args), dict(program.kwargs), program.loss_fn
    if isinstance(model, torch.nn.Module):
        return model, (), {}, None
    raise SpecError(f"train() needs an effcompile CompileResult or a torch.nn.Module, got {type(model).__name__}")


def _device_of(module: torch.nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# -------------------------------------------------------------------------------------------------- ORT

class OrtBackend(Backend):
    """Trains ONNX Runtime training artifacts (``folder``: ``effcompile --export onnx``'s ``onnx/``) with
    the AdamW they were exported with, setting the warm-up / cosine learning rate before each step. One
    micro-batch per step: the graph and optimizer are fixed at export. ``device``: ``"cpu"`` or ``"cuda"``.
    Raises OptionError when ``onnxruntime-training`` is missing."""

    name = "ort"

    def __init__(self, folder: str | Path, config: TrainConfig, device: str = "cpu") -> None:
        from ..errors import OptionError

        try:
            from .ort import OrtTrainer
        except ImportError as error:
            raise OptionError(f"--backend ort is not available ({error}); pip install 'effcompile[ort]'") from error
        self.folder, self.config, self.device = Path(folder), config, device
        self._session_class = OrtTrainer
        self._trainer: Any = None
        self._checkpoint: Path | None = None  # where the session starts from (None: the export's parameters)
        self.schedule = LayerSchedule(0, 0, 1.0, config.warmup, config.schedule_steps or config.steps,
                                      config.schedule == "cosine")

    @property
    def trainer(self) -> Any:
        """The ``OrtTrainer`` session, opened at first use (from the checkpoint ``load_checkpoint`` found)."""
        if self._trainer is None:
            self._trainer = self._session_class(self.folder, self._checkpoint, lr=self.config.lr, device=self.device)
        return self._trainer

    def _feeds(self, tokens: torch.Tensor) -> dict[str, Any]:
        return {name: tokens * 0 + 1 if name == "attention_mask" else tokens for name in self.trainer.input_names}

    def train_step(self, next_batch: NextBatch, step: int) -> StepOutcome:
        """One ORT step (forward, backward, AdamW) at the scheduled learning rate. Raises SpecError naming
        the likely cause when ONNX Runtime refuses the batch (the artifacts fix their shapes)."""
        lr = self.config.lr * self.schedule(step)
        self.trainer.set_learning_rate(lr)
        tokens = next_batch()
        try:
            loss = self.trainer.step(self._feeds(tokens))
        except Exception as error:  # ORT's shape errors: name the likely cause
            raise SpecError(f"ORT training step failed ({str(error).splitlines()[0][:200]}); the artifacts "
                            "fix the shapes they were exported with: pass the export's --batch/--seq") from error
        return StepOutcome(loss, 1, self.trainer.last_step_seconds, {"lr": lr, "accum": 1})

    def evaluate(self, batches: list[torch.Tensor]) -> float:
        """Mean loss of the eval model over ``batches``."""
        return sum(self.trainer.eval(self._feeds(b)) for b in batches) / len(batches)

    def save_checkpoint(self, folder: Path, state: dict[str, Any]) -> Path:
        """``folder/ort_checkpoint`` (parameters, AdamW moments) and ``folder/ort_state.json`` (the loop), each
        replaced atomically."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / ORT_CHECKPOINT
        replace_atomically(path, lambda temporary: self.trainer.save_checkpoint(temporary))
        replace_atomically(folder / ORT_STATE, lambda temporary: temporary.write_text(json.dumps(state, default=str)))
        return path

    def load_checkpoint(self, folder: Path) -> dict[str, Any]:
        """Reopen the artifacts from ``folder/ort_checkpoint``; returns ``ort_state.json``."""
        state_file = folder / ORT_STATE
        if not state_file.exists():
            raise SpecError(f"--resume: {state_file} does not exist; run without --resume first")
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError) as error:
            raise OutputError(f"{state_file} is damaged ({str(error)[:160]}); {_START_OVER}") from None
        if not isinstance(state, dict) or not LOOP_STATE_KEYS <= set(state):
            raise OutputError(f"{state_file} is not an effcompile training state; {_START_OVER}")
        self._checkpoint, self._trainer = folder / ORT_CHECKPOINT, None
        return state


def exported_shape(folder: str | Path) -> tuple[int | None, int | None]:
    """The (batch, seq) the training model's first input was exported with (None where symbolic or
    unreadable)."""
    try:
        import onnx

        model = onnx.load(str(Path(folder) / "training_model.onnx"), load_external_data=False)
        dims = model.graph.input[0].type.tensor_type.shape.dim
        values = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        return (values[0], values[1]) if len(values) == 2 else (None, None)
    except Exception:  # the shapes are a convenience default; the step reports real mismatches
        return None, None

