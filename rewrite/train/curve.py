"""The loss curve of a run, written beside its log: ``loss_curve.json`` (training loss per step and validation
loss, each with the training seconds and tokens at that point) and ``loss_curve.png`` (both against training
time; needs matplotlib, the ``train`` extra — without it only the JSON is written)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import LOSS_CURVE, LOSS_PLOT

log = logging.getLogger(__name__)


def loss_curve(history: Sequence[dict[str, Any]], validation: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The curve as JSON-ready data: ``train`` (step, loss, train_s, tokens per step) and ``validation``."""
    train = [{key: record.get(key) for key in ("step", "loss", "train_s", "tokens")} for record in history]
    return {"train": train, "validation": [dict(v) for v in validation]}


def write_loss_curve(folder: str | Path, history: Sequence[dict[str, Any]], validation: Sequence[dict[str, Any]],
                     title: str = "") -> list[Path]:
    """Write ``loss_curve.json`` and, when matplotlib is installed, ``loss_curve.png`` into ``folder``;
    returns the paths written."""
    folder = Path(folder)
    curve = loss_curve(history, validation)
    written = [folder / LOSS_CURVE]
    written[0].write_text(json.dumps(curve, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: wrote %s only (pip install 'effcompile[train]' for the PNG)", written[0])
        return written
    figure, axes = plt.subplots(figsize=(7, 4))
    train = [p for p in curve["train"] if p["train_s"] is not None and p["loss"] is not None]
    axes.plot([p["train_s"] for p in train], [p["loss"] for p in train], lw=0.8, alpha=0.6, label="training loss")
    if curve["validation"]:
        axes.plot([v["train_s"] for v in curve["validation"]], [v["val_loss"] for v in curve["validation"]], "o-",
                  ms=3, label="validation loss")
    axes.set_xlabel("training time (s)")
    axes.set_ylabel("loss")
    axes.set_title(title or "loss")
    axes.legend()
    figure.tight_layout()
    figure.savefig(folder / LOSS_PLOT, dpi=120)
    plt.close(figure)
    written.append(folder / LOSS_PLOT)
    return written
