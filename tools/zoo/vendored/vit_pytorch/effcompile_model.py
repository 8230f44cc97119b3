"""effcompile model file for lucidrains' vit-pytorch ``ViT`` (``upstream/vit_pytorch/vit.py``, unchanged,
MIT licence; needs ``einops``): 32×32 images in 8×8 patches, width 64, 2 layers, 4 heads of 16, 10
classes, dropout off. Attention is written out (matmul → softmax → matmul) with einops rearranges."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

_path = Path(__file__).resolve().parent / "upstream" / "vit_pytorch" / "vit.py"
_spec = importlib.util.spec_from_file_location("vit_pytorch_vit", _path)
assert _spec is not None and _spec.loader is not None
vit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vit)

CLASSES = 10
LABELS = torch.tensor([3, 7])  # the example batch's classes


def build_model() -> torch.nn.Module:
    """vit-pytorch's ViT at a tiny size, dropout off, seed 0."""
    torch.manual_seed(0)
    return vit.ViT(image_size=32, patch_size=8, num_classes=CLASSES, dim=64, depth=2, heads=4, mlp_dim=128,
                   dim_head=16, dropout=0.0, emb_dropout=0.0)


def example_inputs() -> tuple[torch.Tensor]:
    """(img,): a batch of 2 random 3×32×32 images."""
    return (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)


def loss_fn(logits: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the class logits against ``LABELS``."""
    return F.cross_entropy(logits, LABELS)
