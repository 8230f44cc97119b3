"""Learning-rate schedules: linear warm-up, then constant or cosine, and layer-wise cosine LR (LCLR), with
one optimizer parameter group per layer.

LCLR: parameter ℓ's learning rate is η_ℓ(t) = η_base · γ^(ℓ/L) · (1 + cos(π·t/T)) / 2 with T the total
steps (or ``schedule_steps``; after T the rate stays 0). ℓ is the layer of the parameter: block ``k``
(``effcompile.graph.block_index`` of its module path) is ℓ = k + 1, parameters before the first block
(embeddings) ℓ = 0, after the last (final norm, LM head) ℓ = L = blocks + 1. With ``warmup`` W > 0 the
factor rises linearly over the first W steps and the cosine runs over t − W of T − W.
"""

from __future__ import annotations

import math

import torch

from ..errors import OptionError, SpecError
from ..graph import block_index
from .config import TrainConfig


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
    """One parameter group per layer ℓ (``layer`` key in each group), the named optimizer (AdamW fused when
    every parameter is a floating-point CUDA tensor), and the scheduler of section 2 (γ = 1 unless ``lclr``)."""
    layers, total = parameter_layers(module)
    parameters = dict(module.named_parameters())
    grouped: dict[int, list[torch.nn.Parameter]] = {}
    for name, layer in layers.items():
        grouped.setdefault(layer, []).append(parameters[name])
    groups = [{"params": grouped[layer], "layer": layer} for layer in sorted(grouped)]
    if not groups:
        raise SpecError("the module has no trainable parameters; nothing to train")
    kwargs: dict = dict(lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        tensors = [p for g in groups for p in g["params"]]
        if all(p.is_cuda and p.is_floating_point() for p in tensors):
            kwargs["fused"] = True  # one kernel for every parameter: no per-tensor launches, no host reads
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
