"""effcompile model file for Karpathy's minGPT (``upstream/mingpt/model.py``, unchanged, MIT licence):
a tiny GPT (2 layers, width 64, 4 heads, vocabulary 256, 32 tokens), dropout off.

Its blocks call their MLP through a lambda closure stored on the block (``self.mlpf = lambda x: ...``),
which closes over the block's ``mlp`` ModuleDict — the case issue #18 item 1 describes."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "upstream"))
from mingpt.model import GPT  # noqa: E402

SEQ, VOCAB = 32, 256


def build_model() -> torch.nn.Module:
    """minGPT's GPT at a tiny size, dropout off, seed 0."""
    config = GPT.get_default_config()
    config.model_type = None
    config.n_layer, config.n_head, config.n_embd = 2, 4, 64
    config.vocab_size, config.block_size = VOCAB, SEQ
    config.embd_pdrop = config.resid_pdrop = config.attn_pdrop = 0.0
    torch.manual_seed(0)
    return GPT(config)


def example_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, targets): random tokens and the same tokens as targets, batch 2."""
    idx = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    return idx, idx.clone()


def loss_fn(output: tuple[torch.Tensor, torch.Tensor], idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The model's own cross-entropy (``forward`` returns ``(logits, loss)``)."""
    return output[1]
