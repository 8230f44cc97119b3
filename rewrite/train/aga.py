"""Adaptive gradient accumulation (AGA): how many micro-batches one optimizer step accumulates.

N = max(⌈α·σ²_g / ε²⌉, 1), clamped to [1, max_accum], where σ²_g is an exponential moving average
(factor ``beta``) of the per-coordinate variance of the micro-batch gradients, measured within each step
that has N ≥ 2 micro-batches:

    σ²_step = Σᵢ ‖gᵢ − ḡ‖² / ((N − 1) · P)  =  (Σᵢ ‖gᵢ‖² − N‖ḡ‖²) / ((N − 1) · P)

(gᵢ the gradient of micro-batch i, ḡ their mean, P the number of trainable scalars). gᵢ is read as the
difference of the accumulated ``.grad`` before and after micro-batch i, so the estimator costs one extra
gradient-sized buffer and a few ``foreach`` ops per micro-batch, not a second backward. ε = None
calibrates ε at the first measurement so that N starts at ``initial`` (ε² = α·σ²₀ / initial). A step
whose rule gives N = 1 measures nothing, so every ``probe_every``-th such step runs 2 micro-batches to
keep σ²_g current. ``relative`` reads ε as a fraction of the true gradient's RMS:
N = ⌈α·σ²_g / (ε²·|G|²/P)⌉ with |G|²/P the EMA of the unbiased ‖ḡ‖²/P − σ²_step/N, i.e. N follows the
gradient noise scale (McCandlish et al., 2018) and grows as the gradient shrinks.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch


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
