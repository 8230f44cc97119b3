"""The training loop: one loop for every backend (``backends``: PyTorch, ONNX Runtime) over a byte-level
corpus, with periodic validation, a target loss, a time limit, checkpoint/resume and a JSON log.

1. Each step the backend takes one optimizer step over N micro-batches (``batch × seq`` tokens each) that
   the loop hands it in order; N is ``accum`` or AGA's rule (``aga``) on the torch backend, 1 on ORT.
2. Learning rates follow ``schedules`` (warm-up, constant or cosine, layer-wise LCLR on torch).
3. The data position is the count of micro-batches consumed; batch ``i`` is a pure function of ``i``
   (``effcompile.train.data.Batches``), so a checkpoint (the backend's state plus the loop's: step,
   position, tokens, time, validation) resumes onto the same loss trajectory as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import OutputError, SpecError
from ..export.folder import prepare_log_dir
from ..plans import ExecutionPlan
from .backends import Backend, TorchBackend
from .config import RUN_FILES, STEP_LOG, SUMMARY, TrainConfig
from .curve import write_loss_curve
from .data import Batches, Corpus, load_corpus
from .prefetch import Prefetcher

log = logging.getLogger(__name__)

#: Options whose change on resume keeps the trajectory of an uninterrupted run.
_RESUMABLE_CHANGES = {"steps", "eval_every", "checkpoint_every", "target_loss", "log_every", "prefetch"}


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


class Trainer:
    """The loop behind ``train()``: holds the backend, the data position, the log and the validation record.

    ``model``: an effcompile ``CompileResult`` or an ``nn.Module`` (trained by a ``TorchBackend`` with
    ``loss_fn`` / ``example_inputs``), or a ready ``Backend`` (e.g. ``OrtBackend``). ``data``: ``"stdlib"``,
    a text file or folder, or a ``Corpus``. ``log_dir``: where the log, summary, loss curve and checkpoints
    go. ``execution``: how to run a module that is not a ``CompileResult`` (e.g. one loaded from a folder
    whose report holds the plan ``--passes auto`` chose).
    """

    def __init__(self, model: Any, data: Corpus | str | Path = "stdlib", config: TrainConfig | None = None, *,
                 loss_fn: Callable[..., torch.Tensor] | None = None, example_inputs: Any = None,
                 log_dir: str | Path | None = None, execution: ExecutionPlan | None = None) -> None:
        self.config = config or TrainConfig()
        self.backend: Backend = model if isinstance(model, Backend) else \
            TorchBackend(model, self.config, loss_fn, example_inputs, execution)
        self.corpus = data if isinstance(data, Corpus) else load_corpus(data, seed=self.config.seed)
        self.train_batches = Batches(self.corpus.train, self.config.batch, self.config.seq, self.config.seed)
        self.validation_batches = Batches(self.corpus.validation, self.config.batch, self.config.seq,
                                          self.config.seed).fixed(self.config.eval_batches)
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.step = 0
        self.position = 0
        self.tokens = 0
        self.train_seconds = 0.0
        self.history: list[dict[str, Any]] = []
        self.validation: list[dict[str, Any]] = []
        self.target_reached: dict[str, Any] | None = None
        self._prefetcher: Prefetcher | None = None
        self._interval_start = time.perf_counter()
        torch.manual_seed(self.config.seed)
        random.seed(self.config.seed)

    # -- checkpoints
    def _folder(self) -> Path:
        if self.log_dir is None:
            raise SpecError("checkpoints need a log folder; pass --out LOGDIR (log_dir=...)")
        return self.log_dir

    def _run_folder(self) -> Path:
        """The log folder, made a training-run folder (``effcompile.json`` marker) if it is new; a non-empty
        folder effcompile train did not write is refused (OutputError), never written into."""
        folder = self._folder()
        prepare_log_dir(folder, resume=True, run_files=RUN_FILES)
        return folder

    def save_checkpoint(self) -> Path:
        """Write the backend's state and the loop's (step, data position, tokens, time, validation);
        returns the checkpoint's path. Raises SpecError without a log folder, OutputError when the folder
        cannot be written (disk full: the previous checkpoint is kept)."""
        state = {"step": self.step, "position": self.position, "tokens": self.tokens,
                 "train_seconds": self.train_seconds, "validation": self.validation,
                 "target_reached": self.target_reached, "config": dataclasses.asdict(self.config)}
        folder = self._run_folder()
        try:
            return self.backend.save_checkpoint(folder, state)
        except OSError as error:  # the backend removed its partial files; the previous checkpoint stays
            raise OutputError(f"could not write the checkpoint in {folder}: {error.strerror or error}; free space "
                              "or pass another --out (the previous checkpoint is kept)") from None

    def load_checkpoint(self) -> int:
        """Restore the state saved by ``save_checkpoint``; returns the step it resumes at."""
        state = self.backend.load_checkpoint(self._folder())
        saved = state.get("config") or {}
        current = json.loads(json.dumps(dataclasses.asdict(self.config), default=str))
        changed = {k for k, v in json.loads(json.dumps(saved, default=str)).items() if current.get(k) != v}
        if changed - _RESUMABLE_CHANGES:
            log.warning("resuming with changed options %s: the trajectory differs from an uninterrupted run",
                        sorted(changed))
        self.step, self.position, self.tokens = state["step"], state["position"], state["tokens"]
        self.train_seconds, self.validation = state["train_seconds"], list(state["validation"])
        self.target_reached = state.get("target_reached")
        self._trim_log()
        return self.step

    def _trim_log(self) -> None:
        """Drop log lines of steps after the checkpoint (a crashed run may have logged past it)."""
        path = self._folder() / STEP_LOG
        if not path.exists():
            return
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] < self.step]
        path.write_text("".join(line + "\n" for line in kept))
        self.history = [json.loads(line) for line in kept]

    # -- one step, validation
    def _next_batch(self) -> torch.Tensor:
        tokens = self._prefetcher.next() if self._prefetcher is not None else self.train_batches.batch(self.position)
        self.position += 1
        return tokens

    def _step(self) -> dict[str, Any]:
        """One optimizer step; the record's loss may still be a device tensor until ``_settle``."""
        outcome = self.backend.train_step(self._next_batch, self.step)
        tokens = outcome.micro_batches * self.config.batch * self.config.seq
        self.tokens += tokens
        record = {"step": self.step, "loss": outcome.loss, **outcome.fields, "tokens": self.tokens,
                  "step_tokens": tokens, **outcome.extra}
        self.step += 1
        return record

    def _settle(self, pending: list[dict[str, Any]]) -> None:
        """Wait for the device once, read the pending losses back in one transfer, and give each record its
        share of the wall time since the interval started (``step_s``, ``tokens_per_s``, ``train_s``)."""
        self.backend.synchronize()
        elapsed = time.perf_counter() - self._interval_start
        on_device = [r["loss"] for r in pending if isinstance(r["loss"], torch.Tensor)]
        values = iter(torch.stack([t.detach().float().reshape(()) for t in on_device]).tolist() if on_device else [])
        tokens = sum(r.pop("step_tokens") for r in pending)
        start = self.train_seconds
        for index, record in enumerate(pending):
            if isinstance(record["loss"], torch.Tensor):
                record["loss"] = next(values)
            record["step_s"] = elapsed / len(pending)
            record["tokens_per_s"] = tokens / max(elapsed, 1e-9)
            record["train_s"] = start + elapsed * (index + 1) / len(pending)
        self.train_seconds = start + elapsed
        self._interval_start = time.perf_counter()

    def _elapsed(self) -> float:
        """Training seconds so far, including the steps queued since the last read-back (host clock)."""
        return self.train_seconds + time.perf_counter() - self._interval_start

    def train_step(self) -> dict[str, Any]:
        """One optimizer step of the backend; returns its log record (the loss read back: one device sync)."""
        self._interval_start = time.perf_counter()
        record = self._step()
        self._settle([record])
        return record

    def evaluate(self) -> float:
        """Mean loss over the fixed validation batches (training is unaffected)."""
        return self.backend.evaluate(self.validation_batches)

    def _validate(self, record: dict[str, Any]) -> None:
        record["val_loss"] = self.evaluate()
        self.validation.append({"step": self.step, "val_loss": record["val_loss"], "tokens": self.tokens,
                                "train_s": self.train_seconds})
        target = self.config.target_loss
        if target is not None and record["val_loss"] <= target:
            self.target_reached = {"step": self.step, "tokens": self.tokens, "train_s": self.train_seconds,
                                   "val_loss": record["val_loss"]}
        self._interval_start = time.perf_counter()  # validation is not training time

    @contextlib.contextmanager
    def _prefetching(self) -> Iterator[None]:
        # The torch backend trains on its module's device; other backends take host tensors.
        device = self.backend.device if isinstance(self.backend, TorchBackend) else torch.device("cpu")
        self._prefetcher = Prefetcher(self.train_batches.batch, self.position, device, self.config.prefetch)
        try:
            yield
        finally:
            self._prefetcher.close()
            self._prefetcher = None

    def run(self, on_step: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
        """Train until ``config.steps``, the target validation loss or ``max_train_seconds``; returns the result.

        Losses are read back from the device every ``log_every`` steps (and at validation, checkpoint and the
        end), so steps queue without host synchronisation; ``on_step`` and the log see each step then."""
        config = self.config
        log_file = None
        if self.log_dir is not None:
            self._run_folder()
            log_file = (self.log_dir / STEP_LOG).open("a")
        pending: list[dict[str, Any]] = []
        self._interval_start = time.perf_counter()
        try:
            with self._prefetching():
                while self.step < config.steps and self.target_reached is None:
                    pending.append(self._step())
                    last = self.step == config.steps or (config.max_train_seconds is not None
                                                         and self._elapsed() >= config.max_train_seconds)
                    validate = bool(config.eval_every and self.step % config.eval_every == 0) or last
                    checkpoint = bool(self.log_dir is not None and config.checkpoint_every
                                      and self.step % config.checkpoint_every == 0)
                    if not (validate or checkpoint or last or len(pending) >= config.log_every):
                        continue
                    settled, pending = pending, []
                    finite = self._flush(settled, validate, log_file, on_step)
                    if checkpoint:
                        self.save_checkpoint()
                        self._interval_start = time.perf_counter()
                    if last or not finite:
                        break
        finally:  # every way out of the loop but an exception settles the steps first
            if log_file is not None:
                log_file.close()
        return self._finish()

    def _flush(self, pending: list[dict[str, Any]], validate: bool, log_file: Any,
               on_step: Callable[[dict[str, Any]], None] | None) -> bool:
        """Settle ``pending``, validate after its last step if asked, log and report each record; returns
        False when a loss is not finite (training stops)."""
        self._settle(pending)
        if validate:
            self._validate(pending[-1])
        finite = True
        for record in pending:
            self.history.append(record)
            if log_file is not None:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            if on_step is not None:
                on_step(record)
            if finite and not math.isfinite(record["loss"]):
                log.warning("loss is %s at step %d; stopping", record["loss"], record["step"])
                finite = False
        return finite

    def _finish(self) -> TrainResult:
        """The final checkpoint and ``summary.json`` (with a log folder) and the result."""
        if self.log_dir is not None:
            self.save_checkpoint()
        final = self.validation[-1]["val_loss"] if self.validation else None
        result = TrainResult(self.step, self.history, self.validation, self.tokens, self.train_seconds, final,
                             self.target_reached)
        if self.log_dir is not None:
            summary = {**result.to_dict(), "backend": self.backend.name, "config": dataclasses.asdict(self.config),
                       "data": self.corpus.summary()}
            (self.log_dir / SUMMARY).write_text(json.dumps(summary, indent=2, default=str))
            write_loss_curve(self.log_dir, self.history, self.validation, title=self.backend.name)
        return result


def train(model: Any, data: Corpus | str | Path = "stdlib", config: TrainConfig | None = None, *,
          loss_fn: Callable[..., torch.Tensor] | None = None, example_inputs: Any = None,
          log_dir: str | Path | None = None, resume: bool = False,
          on_step: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train ``model`` (a ``CompileResult``, whose module, example inputs and loss are used, or any
    ``nn.Module`` whose output has ``.loss``, or takes ``loss_fn``, or returns (batch, seq, vocab) logits; or
    a ready ``Backend``) in place on ``data`` (``"stdlib"``, a text file or folder, or a ``Corpus``) with
    ``config``.

    With ``log_dir``: one JSON line per step in ``log.jsonl`` (loss, lr, accum N, tokens/s, peak memory
    bytes on CUDA, val_loss on validation steps), ``summary.json`` and the checkpoint at the end (and
    every ``checkpoint_every`` steps). ``resume`` continues from the checkpoint in ``log_dir``.
    ``on_step(record)`` is called after every step. Raises SpecError / OptionError for bad input.
    """
    trainer = Trainer(model, data, config, loss_fn=loss_fn, example_inputs=example_inputs, log_dir=log_dir)
    if resume:
        trainer.load_checkpoint()
    return trainer.run(on_step)
