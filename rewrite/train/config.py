"""Every training option (``TrainConfig``) and the names of the files a run writes in its log folder.

A log folder holds ``log.jsonl`` (one JSON line per step), ``summary.json`` (totals, validation, the
config), ``run.json`` (what ``effcompile train`` was given to build the model and read the data, so that
``effcompile train LOGDIR --resume`` can rebuild it; see ``effcompile.cli.run_record``) and the checkpoint: ``checkpoint.pt`` for the torch backend, ``ort_checkpoint`` (ONNX Runtime's
parameters and optimizer state) with ``ort_state.json`` (the loop's state) for the ORT backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from ..errors import OptionError

OPTIMIZERS = ("adamw", "lamb", "lion")
STEP_LOG = "log.jsonl"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint.pt"
ORT_CHECKPOINT = "ort_checkpoint"
ORT_STATE = "ort_state.json"
LOSS_CURVE = "loss_curve.json"
LOSS_PLOT = "loss_curve.png"
RUN_RECORD = "run.json"
#: Appended to a checkpoint file's name while it is written (then renamed over the file).
TEMPORARY_SUFFIX = ".tmp"
#: The files whose presence means a folder holds a training run (``--force`` removes them, and only them).
RUN_FILES = (STEP_LOG, CHECKPOINT, SUMMARY, ORT_CHECKPOINT, ORT_STATE, LOSS_CURVE, LOSS_PLOT, RUN_RECORD,
             CHECKPOINT + TEMPORARY_SUFFIX, ORT_CHECKPOINT + TEMPORARY_SUFFIX, ORT_STATE + TEMPORARY_SUFFIX)


@dataclass(frozen=True)
class TrainConfig:
    """Every training option; learning rates in parameter units per step, sizes in tokens."""

    steps: int = field(default=100, metadata={"help": "optimizer steps"})
    schedule_steps: int | None = field(default=None, metadata={"help": "cosine period T (default: steps)"})
    batch: int = field(default=8, metadata={"help": "sequences per micro-batch"})
    seq: int = field(default=128, metadata={"help": "tokens per sequence"})
    lr: float = field(default=1e-3, metadata={"help": "base learning rate η_base"})
    optimizer: Literal["adamw", "lamb", "lion"] = field(default="adamw", metadata={"help": "optimizer"})
    weight_decay: float = field(default=0.0, metadata={"help": "decoupled weight decay"})
    betas: tuple[float, float] = field(default=(0.9, 0.95), metadata={"help": "optimizer betas"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm (0: off)"})
    warmup: int = field(default=0, metadata={"help": "linear warm-up steps"})
    schedule: Literal["constant", "cosine"] = field(default="constant",
                                                    metadata={"help": "LR after warm-up (lclr implies cosine)"})
    lclr: bool = field(default=False, metadata={"help": "layer-wise cosine LR η_base·γ^(ℓ/L)·(1+cos πt/T)/2"})
    lclr_gamma: float = field(default=0.5, metadata={"help": "γ: the head's LR factor relative to embeddings"})
    accum: int = field(default=1, metadata={"help": "micro-batches per step (AGA's start when ε is auto)"})
    aga: bool = field(default=False, metadata={"help": "adaptive gradient accumulation"})
    aga_alpha: float = field(default=1.0, metadata={"help": "α in N = ⌈α·σ²/ε²⌉"})
    aga_epsilon: float | None = field(default=None, metadata={"help": "ε (None: calibrate so N starts at accum)"})
    max_accum: int = field(default=16, metadata={"help": "upper clamp of N"})
    aga_beta: float = field(default=0.9, metadata={"help": "EMA factor of the variance estimate"})
    aga_relative: bool = field(default=False, metadata={"help": "ε relative to the gradient RMS (noise scale)"})
    aga_probe_every: int = field(default=10, metadata={"help": "when N=1, run 2 micro-batches every k steps"})
    eval_every: int = field(default=50, metadata={"help": "validate every k steps (0: only at the end)"})
    eval_batches: int = field(default=8, metadata={"help": "validation batches (fixed windows)"})
    checkpoint_every: int = field(default=0, metadata={"help": "checkpoint every k steps (0: only at the end)"})
    target_loss: float | None = field(default=None, metadata={"help": "stop when validation loss ≤ this"})
    max_train_seconds: float | None = field(default=None, metadata={"help": "stop after this much training time"})
    seed: int = field(default=0, metadata={"help": "data and RNG seed"})
    compile: Literal["auto", "on", "off"] = field(default="auto", metadata={
        "help": "torch.compile the module: auto (when its execution plan says so, e.g. chosen by --passes auto), "
                "on, off"})
    autocast: Literal["off", "bfloat16", "float16"] = field(default="off", metadata={
        "help": "run forward and loss under torch.autocast (for modules without amp's casts)"})
    log_every: int = field(default=10, metadata={
        "help": "read the loss back from the device every k steps (no host synchronisation in between)"})
    prefetch: int = field(default=2, metadata={"help": "batches a background thread prepares ahead (≥ 1)"})

    def __post_init__(self) -> None:
        checks = [
            (self.steps >= 1, "steps", "must be ≥ 1"), (self.batch >= 1, "batch", "must be ≥ 1"),
            (self.schedule_steps is None or self.schedule_steps > self.warmup, "schedule_steps", "must be > warmup"),
            (self.seq >= 2, "seq", "must be ≥ 2"), (self.lr > 0, "lr", "must be > 0"),
            (self.optimizer in OPTIMIZERS, "optimizer", f"must be one of {', '.join(OPTIMIZERS)}"),
            (0 <= self.warmup < (self.schedule_steps or self.steps), "warmup", "must be in [0, steps)"),
            (self.schedule in ("constant", "cosine"), "schedule", "must be constant or cosine"),
            (self.lclr_gamma > 0, "lclr_gamma", "must be > 0"), (self.accum >= 1, "accum", "must be ≥ 1"),
            (self.aga_alpha > 0, "aga_alpha", "must be > 0"),
            (self.aga_epsilon is None or self.aga_epsilon > 0, "aga_epsilon", "must be > 0"),
            (self.max_accum >= 1 and (not self.aga or self.accum <= self.max_accum), "max_accum",
             "must be ≥ 1 and, with AGA, ≥ accum"),
            (0 <= self.aga_beta < 1, "aga_beta", "must be in [0, 1)"),
            (self.aga_probe_every >= 0, "aga_probe_every", "must be ≥ 0"),
            (self.eval_every >= 0, "eval_every", "must be ≥ 0"), (self.eval_batches >= 1, "eval_batches", "must be ≥ 1"),
            (self.checkpoint_every >= 0, "checkpoint_every", "must be ≥ 0"),
            (self.max_train_seconds is None or self.max_train_seconds > 0, "max_train_seconds", "must be > 0"),
            (self.grad_clip >= 0, "grad_clip", "must be ≥ 0"),
            (self.compile in ("auto", "on", "off"), "compile", "must be auto, on or off"),
            (self.autocast in ("off", "bfloat16", "float16"), "autocast", "must be off, bfloat16 or float16"),
            (self.log_every >= 1, "log_every", "must be ≥ 1"), (self.prefetch >= 1, "prefetch", "must be ≥ 1")]
        checks += [(value is None or isinstance(value, bool) or not isinstance(value, float) or math.isfinite(value),
                    name, "must be a finite number") for name, value in vars(self).items()]
        for ok, name, rule in checks:
            if not ok:
                raise OptionError(f"train: {name}={getattr(self, name)!r} {rule}; fix --{name.replace('_', '-')}")
