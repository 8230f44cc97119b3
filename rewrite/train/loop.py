"""Train a compiled module on a byte-level corpus: adaptive gradient accumulation (AGA), layer-wise
cosine learning rates (LCLR), AdamW / LAMB / Lion, periodic validation, checkpoint/resume, a JSON log.

1. One optimizer step accumulates the gradients of N micro-batches (each ``batch × seq`` tokens).
   Without AGA, N is ``accum``. With AGA, N = max(⌈α·σ²_g / ε²⌉, 1), clamped to [1, max_accum], where
   σ²_g is an exponential moving average (factor ``aga_beta``) of the per-coordinate variance of the
   micro-batch gradients, measured within each step that has N ≥ 2 micro-batches:

       σ²_step = Σᵢ ‖gᵢ − ḡ‖² / ((N − 1) · P)  =  (Σᵢ ‖gᵢ‖² − N‖ḡ‖²) / ((N − 1) · P)

   (gᵢ the gradient of micro-batch i, ḡ their mean, P the number of trainable scalars). gᵢ is read as
   the difference of the accumulated ``.grad`` before and after micro-batch i, so the estimator costs one
   extra gradient-sized buffer and a few ``foreach`` ops per micro-batch, not a second backward.
   ε = None calibrates ε at the first measurement so that N starts at ``accum`` (ε² = α·σ²₀ / accum).
   A step whose rule gives N = 1 measures nothing, so every ``aga_probe_every``-th such step runs 2
   micro-batches to keep σ²_g current. ``aga_relative`` reads ε as a fraction of the true gradient's
   RMS: N = ⌈α·σ²_g / (ε²·|G|²/P)⌉ with |G|²/P the EMA of the unbiased ‖ḡ‖²/P − σ²_step/N, i.e. N
   follows the gradient noise scale (McCandlish et al., 2018) and grows as the gradient shrinks.
2. LCLR: parameter ℓ's learning rate is η_ℓ(t) = η_base · γ^(ℓ/L) · (1 + cos(π·t/T)) / 2 with T the
   total steps (or ``schedule_steps``; after T the rate stays 0). ℓ is the layer of the parameter:
   block ``k`` (``effcompile.graph.block_index`` of its module path) is ℓ = k + 1, parameters before
   the first block (embeddings) ℓ = 0, after the last (final norm, LM head) ℓ = L = blocks + 1. With ``warmup`` W > 0 the factor rises linearly over the
   first W steps and the cosine runs over t − W of T − W. One optimizer parameter group per layer.
3. The data position is the count of micro-batches consumed; batch ``i`` is a pure function of ``i``
   (``effcompile.train.data.Batches``), so a checkpoint (model, optimizer, scheduler, AGA state, RNG states,
   position) resumes onto the same loss trajectory as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from ..errors import OptionError, OutputError, SpecError
from ..export.folder import prepare_log_dir
from ..graph import block_index
from .data import Batches, Corpus, load_corpus

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "lamb", "lion")
CHECKPOINT = "checkpoint.pt"
STEP_LOG = "log.jsonl"
SUMMARY = "summary.json"


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
            (self.grad_clip >= 0, "grad_clip", "must be ≥ 0")]
        for ok, name, rule in checks:
            if not ok:
                raise OptionError(f"train: {name}={getattr(self, name)!r} {rule}; fix --{name.replace('_', '-')}")


# ----------------------------------------------------------------------------------------------- AGA

def accumulation_steps(sigma2: float, alpha: float, epsilon: float, max_accum: int) -> int:
    """N = max(⌈α·σ²/ε²⌉, 1) clamped to [1, max_accum] (σ² per-coordinate gradient variance)."""
    if not math.isfinite(sigma2):
        return max_accum
    return int(min(max(math.ceil(alpha * sigma2 / epsilon ** 2 - 1e-9), 1), max_accum))


class GradientVarianceMeter:
    """Measures the per-coordinate variance of micro-batch gradients inside one accumulation step.

    Call ``start(n)`` before the step, ``after_backward()`` after each micro-batch's backward of
    ``loss / n``, and ``finish()`` after the last: it returns Σᵢ‖gᵢ − ḡ‖² / ((n − 1)·P), or None when n < 2.
    """

    def __init__(self, parameters: list[torch.nn.Parameter]) -> None:
        self.parameters = [p for p in parameters if p.requires_grad]
        self.size = sum(p.numel() for p in self.parameters)
        self._previous: list[torch.Tensor] | None = None
        self._sum_sq: torch.Tensor | None = None
        self._n = 0
        self._seen = 0
        self.mean_sq: float | None = None

    def start(self, n: int) -> None:
        """Begin a step of ``n`` micro-batches."""
        self._n, self._seen, self._sum_sq = n, 0, None

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.parameters]

    def after_backward(self) -> None:
        """Record the gradient the last micro-batch added (n × the change of the accumulated grads)."""
        if self._n < 2:
            return
        grads = self._grads()
        diff = grads if self._seen == 0 else torch._foreach_sub(grads, self._previous)
        sq = _squared_norm(diff) * self._n ** 2
        self._sum_sq = sq if self._sum_sq is None else self._sum_sq + sq
        self._seen += 1
        if self._seen < self._n:
            if self._previous is None or len(self._previous) != len(grads):
                self._previous = [g.detach().clone() for g in grads]
            else:
                torch._foreach_copy_(self._previous, grads)

    def finish(self) -> float | None:
        """The step's variance estimate (per trainable scalar), or None if the step had < 2 micro-batches."""
        if self._n < 2 or self._sum_sq is None or self._seen != self._n:
            return None
        mean_sq = _squared_norm(self._grads())
        variance = (self._sum_sq - self._n * mean_sq) / ((self._n - 1) * max(self.size, 1))
        self.mean_sq = float(mean_sq) / max(self.size, 1)  # ‖ḡ‖²/P, for the relative rule
        return max(float(variance), 0.0)


def _squared_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Σ‖t‖² over ``tensors`` as a float64 scalar on their device (fused per-tensor norms, no sync)."""
    norms = torch._foreach_norm([t.float() if t.dtype not in (torch.float32, torch.float64) else t for t in tensors])
    return torch.stack(norms).double().pow(2).sum()


@dataclass
class AdaptiveAccumulation:
    """AGA state: the EMA σ²_g of the micro-batch gradient variance and the rule that turns it into N."""

    alpha: float = 1.0
    epsilon: float | None = None
    max_accum: int = 16
    beta: float = 0.9
    initial: int = 1
    probe_every: int = 10
    relative: bool = False
    sigma2: float | None = None
    signal: float | None = None
    measurements: int = 0
    ones_in_a_row: int = 0

    def rule(self) -> int:
        """N from the formula for the current σ²_g (``initial`` before the first measurement)."""
        if self.sigma2 is None or self.epsilon is None:
            return self.initial
        return accumulation_steps(self.sigma2 / self._scale(), self.alpha, self.epsilon, self.max_accum)

    def _scale(self) -> float:
        return max(self.signal or 0.0, 1e-30) if self.relative else 1.0

    def next_accum(self) -> int:
        """Micro-batches for the next step: the rule, except that a measurement is forced (N = 2) before
        the first estimate exists and on every ``probe_every``-th consecutive step the rule gives 1."""
        n = self.rule()
        if self.sigma2 is None:
            return max(n, 2) if self.max_accum >= 2 else 1
        if n == 1 and self.probe_every and self.max_accum >= 2:
            self.ones_in_a_row += 1
            if self.ones_in_a_row >= self.probe_every:
                self.ones_in_a_row = 0
                return 2
        elif n > 1:
            self.ones_in_a_row = 0
        return n

    def observe(self, variance: float | None, mean_sq: float | None = None, n: int = 2) -> None:
        """Fold one step's variance estimate into σ²_g (and, for the relative rule, its ``mean_sq`` = ‖ḡ‖²/P
        over ``n`` micro-batches into |G|²/P); calibrate ε at the first one if it is auto."""
        if variance is None:
            return
        # E‖ḡ‖²/P = |G|²/P + σ²/n: remove the noise; keep a floor so that a noise-only step stays finite.
        signal = max((mean_sq or 0.0) - variance / n, 1e-3 * variance / n, 1e-30)
        if self.sigma2 is None:
            self.sigma2, self.signal = variance, signal
            if self.epsilon is None:  # N starts at `initial`: ε² = α σ²₀ / (initial · scale₀)
                self.epsilon = math.sqrt(max(self.alpha * variance / (self.initial * self._scale()), 1e-30))
        else:
            self.sigma2 = self.beta * self.sigma2 + (1 - self.beta) * variance
            self.signal = self.beta * (self.signal or signal) + (1 - self.beta) * signal
        self.measurements += 1

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume."""
        return dataclasses.asdict(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from ``state_dict()``."""
        for key, value in state.items():
            setattr(self, key, value)


# ---------------------------------------------------------------------------------------------- LCLR

def parameter_layers(module: torch.nn.Module) -> tuple[dict[str, int], int]:
    """Each trainable parameter's layer ℓ and L: block k → k + 1; before the first block (embeddings) → 0;
    after it (final norm, head) → L = number of blocks + 1. Tied parameters count once (first name)."""
    named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    blocks = [block_index(name.rpartition(".")[0]) for name, _ in named]
    known = [b for b in blocks if b is not None]
    total = (max(known) + 1 if known else 0) + 1
    layers: dict[str, int] = {}
    seen_block = False
    for (name, _), block in zip(named, blocks):
        if block is not None:
            seen_block = True
            layers[name] = block + 1
        else:
            layers[name] = total if seen_block else 0
    return layers, total


class LayerSchedule:
    """LR factor of one parameter group: linear warm-up, then constant or cosine, times γ^(ℓ/L).

    A callable object (not a lambda) so that ``LambdaLR.state_dict()`` saves it.
    """

    def __init__(self, layer: int, num_layers: int, gamma: float, warmup: int, total: int, cosine: bool) -> None:
        self.layer, self.num_layers, self.gamma = layer, num_layers, gamma
        self.warmup, self.total, self.cosine = warmup, total, cosine

    def __call__(self, step: int) -> float:
        scale = self.gamma ** (self.layer / self.num_layers) if self.num_layers else 1.0
        if step < self.warmup:
            return scale * (step + 1) / self.warmup
        if not self.cosine:
            return scale
        progress = min((step - self.warmup) / max(self.total - self.warmup, 1), 1.0)
        return scale * (1 + math.cos(math.pi * progress)) / 2


def build_optimizer(module: torch.nn.Module, config: TrainConfig) -> tuple[torch.optim.Optimizer,
                                                                          torch.optim.lr_scheduler.LambdaLR]:
    """One parameter group per layer ℓ (``layer`` key in each group), the named optimizer, and the
    scheduler of section 2 (γ = 1 unless ``lclr``)."""
    layers, total = parameter_layers(module)
    parameters = dict(module.named_parameters())
    grouped: dict[int, list[torch.nn.Parameter]] = {}
    for name, layer in layers.items():
        grouped.setdefault(layer, []).append(parameters[name])
    groups = [{"params": grouped[layer], "layer": layer} for layer in sorted(grouped)]
    if not groups:
        raise SpecError("the module has no trainable parameters; nothing to train")
    kwargs = dict(lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(groups, **kwargs)
    else:
        try:
            import pytorch_optimizer
        except ImportError as error:
            raise OptionError(f"--optimizer {config.optimizer} needs pytorch-optimizer; pip install "
                              "pytorch-optimizer (or use --optimizer adamw)") from error
        cls = pytorch_optimizer.Lamb if config.optimizer == "lamb" else pytorch_optimizer.Lion
        optimizer = cls(groups, **kwargs)
    cosine = config.lclr or config.schedule == "cosine"
    gamma = config.lclr_gamma if config.lclr else 1.0
    period = config.schedule_steps or config.steps
    schedules = [LayerSchedule(g["layer"], total, gamma, config.warmup, period, cosine) for g in groups]
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedules)


# ------------------------------------------------------------------------------------- inputs, loss

InputBuilder = Callable[[torch.Tensor], tuple[tuple, dict[str, Any]]]


def input_builder(module: torch.nn.Module, example_args: tuple = (), example_kwargs: Mapping[str, Any] | None = None
                  ) -> InputBuilder:
    """A function from a (batch, seq) token tensor to the module's (args, kwargs).

    With example inputs: every integer tensor of rank 2 becomes the tokens (so ``labels=input_ids`` stays
    so), ``attention_mask`` becomes ones. Without: the forward's required parameters are filled by name
    (``labels`` and the first parameter get the tokens, ``attention_mask`` ones). Raises SpecError otherwise.
    """
    example_kwargs = dict(example_kwargs or {})

    def fill(name: str | None, value: Any, tokens: torch.Tensor) -> Any:
        if name == "attention_mask":
            return torch.ones_like(tokens)
        if isinstance(value, torch.Tensor) and not value.is_floating_point() and value.dim() == 2:
            return tokens
        raise SpecError(f"cannot feed tokens to input {name or 'positional'} of shape "
                        f"{tuple(getattr(value, 'shape', ()))}; train needs a model whose inputs are token ids")

    if example_args or example_kwargs:
        return lambda tokens: (tuple(fill(None, v, tokens) for v in example_args),
                               {k: fill(k, v, tokens) for k, v in example_kwargs.items()})
    parameters = [p for p in inspect.signature(module.forward).parameters.values()
                  if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not parameters:
        raise SpecError("the module's forward takes no token input; train needs a model whose inputs are token ids")
    names = [p.name for p in parameters]
    for name in names[1:]:
        if name not in ("labels", "attention_mask"):
            raise SpecError(f"the module's forward needs {name!r}, which train cannot make from tokens; "
                            "pass example_inputs or a model taking (input_ids[, labels])")
    return lambda tokens: ((), {name: torch.ones_like(tokens) if name == "attention_mask" else tokens
                                for name in names})


def objective(output: Any, tokens: torch.Tensor, args: tuple, kwargs: Mapping[str, Any],
              loss_fn: Callable[..., torch.Tensor] | None) -> torch.Tensor:
    """The scalar loss: ``loss_fn(output, *args, **kwargs)``, else ``output.loss``, else next-token
    cross-entropy of logits shaped (batch, seq, vocab) against the tokens."""
    if loss_fn is not None:
        return loss_fn(output, *args, **kwargs)
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if isinstance(loss, torch.Tensor):
        return loss
    if isinstance(output, torch.Tensor) and output.dim() == 3 and output.shape[:2] == tokens.shape:
        return F.cross_entropy(output[:, :-1].reshape(-1, output.shape[-1]).float(), tokens[:, 1:].reshape(-1))
    raise SpecError("the model's output has no .loss and is not (batch, seq, vocab) logits; pass loss_fn")


def small_gpt_spec(layers: int = 6, width: int = 384, heads: int = 6, seq: int = 256, batch: int = 2) -> Any:
    """The benchmark model: Hugging Face GPT-2 with ``layers`` blocks of ``width``, byte vocabulary (256),
    ``seq`` positions, dropout 0, random weights (seed 0). Returns an ``effcompile.spec.ModelSpec``."""
    from ..spec import load_hf_spec

    return load_hf_spec("gpt2", dict(n_layer=layers, n_embd=width, n_head=heads, vocab_size=256, n_positions=seq,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), batch=batch, seq=seq)


# -------------------------------------------------------------------------------------------- loop

@dataclass
class TrainResult:
    """What a run did: per-step records, validation records, totals, and when the target was reached."""

    steps: int
    history: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    tokens: int
    train_seconds: float
    final_val_loss: float | None
    target_reached: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (without the per-step history)."""
        return {"steps": self.steps, "tokens": self.tokens, "train_seconds": round(self.train_seconds, 3),
                "final_val_loss": self.final_val_loss, "target_reached": self.target_reached,
                "validation": self.validation}


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


def read_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    """A checkpoint's contents, read with ``torch.load(weights_only=True)``: tensors and plain Python data
    only, so a crafted file runs no code. Raises OutputError for a damaged, truncated or foreign file."""
    import pickle
    import zipfile

    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, RuntimeError, OSError, ValueError,
            AttributeError, ImportError, KeyError, TypeError) as error:
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise OutputError(f"{path} is damaged or not an effcompile checkpoint (it loads only tensors and plain "
                          f"data: {reason}); start over with --force or resume from an intact checkpoint") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "step", "rng"} <= set(state):
        raise OutputError(f"{path} is not an effcompile checkpoint; start over with --force")
    return state


def _set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class Trainer:
    """The loop behind ``train()``; holds the module, optimizer, scheduler, AGA state and data position."""

    def __init__(self, model: Any, data: Corpus | str | Path = "stdlib", config: TrainConfig | None = None, *,
                 loss_fn: Callable[..., torch.Tensor] | None = None, example_inputs: Any = None,
                 log_dir: str | Path | None = None) -> None:
        self.config = config or TrainConfig()
        self.module, args, kwargs, program_loss = _unpack(model)
        if example_inputs is not None:
            from ..spec import normalise_inputs

            args, kwargs = normalise_inputs(example_inputs, "train()")
        self.build_inputs = input_builder(self.module, args, kwargs)
        program = getattr(model, "program", None)
        if program is not None and program.capture_path == "export":
            lengths = {v.shape[1] for v in [*args, *kwargs.values()]
                       if isinstance(v, torch.Tensor) and v.dim() == 2 and not v.is_floating_point()}
            if lengths and self.config.seq not in lengths:
                raise SpecError(f"the module was captured (torch.export) at sequence length {min(lengths)}, "
                                f"which its graph fixes; train with --seq {min(lengths)} or compile at seq "
                                f"{self.config.seq}")
        self.loss_fn = loss_fn or program_loss
        self.corpus = data if isinstance(data, Corpus) else load_corpus(data, seed=self.config.seed)
        self.device = _device_of(self.module)
        self.train_batches = Batches(self.corpus.train, self.config.batch, self.config.seq, self.config.seed)
        self.validation_batches = Batches(self.corpus.validation, self.config.batch, self.config.seq,
                                          self.config.seed).fixed(self.config.eval_batches)
        self.optimizer, self.scheduler = build_optimizer(self.module, self.config)
        self.parameters = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.aga = AdaptiveAccumulation(self.config.aga_alpha, self.config.aga_epsilon, self.config.max_accum,
                                        self.config.aga_beta, self.config.accum, self.config.aga_probe_every,
                                        self.config.aga_relative)
        self.meter = GradientVarianceMeter(self.parameters) if self.config.aga else None
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.step = 0
        self.position = 0
        self.tokens = 0
        self.train_seconds = 0.0
        self.history: list[dict[str, Any]] = []
        self.validation: list[dict[str, Any]] = []
        self.target_reached: dict[str, Any] | None = None
        torch.manual_seed(self.config.seed)
        random.seed(self.config.seed)

    # -- checkpoints
    def checkpoint_path(self) -> Path:
        """``<log_dir>/checkpoint.pt`` (SpecError without a log_dir)."""
        if self.log_dir is None:
            raise SpecError("checkpoints need a log folder; pass --out LOGDIR (log_dir=...)")
        return self.log_dir / CHECKPOINT

    def save_checkpoint(self) -> Path:
        """Write model, optimizer, scheduler, AGA, RNG and data position atomically; return the path."""
        path = self.checkpoint_path()
        prepare_log_dir(path.parent, resume=True)
        state = {"step": self.step, "position": self.position, "tokens": self.tokens,
                 "train_seconds": self.train_seconds, "model": self.module.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "aga": self.aga.state_dict(), "rng": _rng_state(self.device), "validation": self.validation,
                 "target_reached": self.target_reached, "config": dataclasses.asdict(self.config)}
        temporary = path.with_suffix(".tmp")
        try:
            torch.save(state, temporary)
            os.replace(temporary, path)
        except OSError as error:
            temporary.unlink(missing_ok=True)
            raise OutputError(f"could not write {path}: {error.strerror or error}; free space or pass another "
                              "--out (the previous checkpoint is kept)") from None
        return path

    def load_checkpoint(self) -> int:
        """Restore the state saved by ``save_checkpoint``; returns the step it resumes at."""
        path = self.checkpoint_path()
        if not path.exists():
            raise SpecError(f"--resume: {path} does not exist; run without --resume first")
        state = read_checkpoint(path, self.device)
        try:
            self._restore(state)
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
            raise OutputError(f"{path} does not match this run ({type(error).__name__}: {str(error)[:160]}); "
                              "resume with the model and options that wrote it, or start over with --force") from None
        self._trim_log()
        return self.step

    def _restore(self, state: Mapping[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        # The schedule follows the current config (a resumed run may train for more steps); only the
        # step counter comes from the checkpoint.
        schedules = [dict(vars(f)) for f in self.scheduler.lr_lambdas]
        self.scheduler.load_state_dict(state["scheduler"])
        for function, attributes in zip(self.scheduler.lr_lambdas, schedules):
            vars(function).update(attributes)
        for group, base, function in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                         self.scheduler.lr_lambdas):
            group["lr"] = base * function(self.scheduler.last_epoch)
        changed = {k for k, v in state["config"].items() if dataclasses.asdict(self.config).get(k) != v}
        if changed - {"steps", "eval_every", "checkpoint_every", "target_loss"}:
            log.warning("resuming with changed options %s: the trajectory differs from an uninterrupted run",
                        sorted(changed))
        self.aga.load_state_dict(state["aga"])
        rng = state["rng"]
        rng["torch"] = rng["torch"].cpu()
        if "cuda" in rng:
            rng["cuda"] = rng["cuda"].cpu()
        _set_rng_state(rng, self.device)
        self.step, self.position, self.tokens = state["step"], state["position"], state["tokens"]
        self.train_seconds, self.validation = state["train_seconds"], list(state["validation"])
        self.target_reached = state["target_reached"]

    def _trim_log(self) -> None:
        """Drop log lines of steps after the checkpoint (a crashed run may have logged past it)."""
        assert self.log_dir is not None
        path = self.log_dir / STEP_LOG
        if not path.exists():
            return
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] < self.step]
        path.write_text("".join(line + "\n" for line in kept))
        self.history = [json.loads(line) for line in kept]

    # -- one step, validation
    def _micro_batch(self) -> torch.Tensor:
        tokens = self.train_batches.batch(self.position).to(self.device, non_blocking=True)
        self.position += 1
        args, kwargs = self.build_inputs(tokens)
        output = self.module(*args, **kwargs)
        return objective(output, tokens, args, kwargs, self.loss_fn)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over N micro-batches; returns its log record."""
        config = self.config
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        started = time.perf_counter()
        n = self.aga.next_accum() if config.aga else config.accum
        rule = self.aga.rule() if config.aga else n
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.optimizer.zero_grad(set_to_none=True)
        if self.meter is not None:
            self.meter.start(n)
        total = torch.zeros((), device=self.device)
        for _ in range(n):
            loss = self._micro_batch()
            (loss / n).backward()
            if self.meter is not None:
                self.meter.after_backward()
            total += loss.detach().float()
        variance = self.meter.finish() if self.meter is not None else None
        self.aga.observe(variance, self.meter.mean_sq if self.meter is not None else None, n)
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.parameters, config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        mean_loss = float(total) / n  # synchronises: the step time below is real
        seconds = time.perf_counter() - started
        tokens = n * config.batch * config.seq
        self.tokens += tokens
        self.train_seconds += seconds
        record = {"step": self.step, "loss": mean_loss, "lr": lrs[0], "lr_last": lrs[-1], "accum": n,
                  "accum_rule": rule, "tokens": self.tokens, "tokens_per_s": tokens / max(seconds, 1e-9),
                  "step_s": seconds, "train_s": self.train_seconds}
        if config.aga:
            record.update(sigma2=self.aga.sigma2, step_sigma2=variance, signal=self.aga.signal, epsilon=self.aga.epsilon)
        if self.device.type == "cuda":
            record["peak_mem_bytes"] = torch.cuda.max_memory_allocated(self.device)
        self.step += 1
        return record

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the fixed validation batches (RNG state untouched, so training is unaffected)."""
        was_training = self.module.training
        self.module.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            losses = []
            for tokens in self.validation_batches:
                tokens = tokens.to(self.device)
                args, kwargs = self.build_inputs(tokens)
                losses.append(objective(self.module(*args, **kwargs), tokens, args, kwargs, self.loss_fn).float())
            value = float(torch.stack(losses).mean())
        self.module.train(was_training)
        return value

    def run(self, on_step: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
        """Train until ``config.steps``, the target validation loss or ``max_train_seconds``; returns the result."""
        config = self.config
        log_file = None
        if self.log_dir is not None:
            prepare_log_dir(self.log_dir, resume=True)
            log_file = (self.log_dir / STEP_LOG).open("a")
        try:
            while self.step < config.steps and self.target_reached is None:
                record = self.train_step()
                last = self.step == config.steps or (config.max_train_seconds is not None
                                                     and self.train_seconds >= config.max_train_seconds)
                if (config.eval_every and self.step % config.eval_every == 0) or last:
                    record["val_loss"] = self.evaluate()
                    self.validation.append({"step": self.step, "val_loss": record["val_loss"], "tokens": self.tokens,
                                            "train_s": self.train_seconds})
                    if config.target_loss is not None and record["val_loss"] <= config.target_loss:
                        self.target_reached = {"step": self.step, "tokens": self.tokens,
                                               "train_s": self.train_seconds, "val_loss": record["val_loss"]}
                if not math.isfinite(record["loss"]):
                    log.warning("loss is %s at step %d; stopping", record["loss"], self.step)
                    self.history.append(record)
                    break
                self.history.append(record)
                if log_file is not None:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                if on_step is not None:
                    on_step(record)
                if self.log_dir is not None and config.checkpoint_every and self.step % config.checkpoint_every == 0:
                    self.save_checkpoint()
                if last:
                    break
        finally:
            if log_file is not None:
                log_file.close()
        if self.log_dir is not None:
            self.save_checkpoint()
        final = self.validation[-1]["val_loss"] if self.validation else None
        result = TrainResult(self.step, self.history, self.validation, self.tokens, self.train_seconds, final,
                             self.target_reached)
        if self.log_dir is not None:
            summary = {**result.to_dict(), "config": dataclasses.asdict(config), "data": self.corpus.summary()}
            (self.log_dir / SUMMARY).write_text(json.dumps(summary, indent=2, default=str))
        return result


def train(model: Any, data: Corpus | str | Path = "stdlib", config: TrainConfig | None = None, *,
          loss_fn: Callable[..., torch.Tensor] | None = None, example_inputs: Any = None,
          log_dir: str | Path | None = None, resume: bool = False,
          on_step: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train ``model`` (a ``CompileResult``, whose module, example inputs and loss are used, or any
    ``nn.Module`` whose output has ``.loss``, or takes ``loss_fn``, or returns (batch, seq, vocab) logits)
    in place on ``data`` (``"stdlib"``, a text file or folder, or a ``Corpus``) with ``config``.

    With ``log_dir``: one JSON line per step in ``log.jsonl`` (loss, lr, accum N, tokens/s, peak memory
    bytes on CUDA, val_loss on validation steps), ``summary.json`` and ``checkpoint.pt`` at the end (and
    every ``checkpoint_every`` steps). ``resume`` continues from ``log_dir/checkpoint.pt``.
    ``on_step(record)`` is called after every step. Raises SpecError / OptionError for bad input.
    """
    trainer = Trainer(model, data, config, loss_fn=loss_fn, example_inputs=example_inputs, log_dir=log_dir)
    if resume:
        trainer.load_checkpoint()
    return trainer.run(on_step)
