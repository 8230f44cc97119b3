"""effcompile model file for Karpathy's nanoGPT (``upstream/model.py``, unchanged, MIT licence): a tiny
GPT (2 layers, width 64, 4 heads, vocabulary 256, 32 tokens), dropout off. Its attention is
``F.scaled_dot_product_attention(is_causal=True)`` and its LM head shares the token embedding."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location("nanogpt_model", Path(__file__).resolve().parent / "upstream" / "model.py")
assert _spec is not None and _spec.loader is not None
nanogpt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nanogpt)

SEQ, VOCAB = 32, 256


def build_model() -> torch.nn.Module:
    """nanoGPT's GPT at a tiny size, dropout off, seed 0."""
    torch.manual_seed(0)
    config = nanogpt.GPTConfig(block_size=SEQ, vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=64, dropout=0.0, bias=True)
    return nanogpt.GPT(config)


def example_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, targets): random tokens and the same tokens as targets, batch 2."""
    idx = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    return idx, idx.clone()


def loss_fn(output: tuple[torch.Tensor, torch.Tensor], idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The model's own cross-entropy (``forward`` returns ``(logits, loss)``)."""
    return output[1]
