"""Shared fixtures: tiny real architectures (2 layers, hidden 64) from transformers configs, random
weights, no hub; and a plain PyTorch GPT (the bundled example) that symbolic tracing can follow."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from effcompile.spec import ModelSpec, load_file_spec, load_hf_spec

# Under pytest-xdist each worker gets one thread, so two workers fill the two cores of CI without
# oversubscribing; a plain run uses up to two.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

TINY_CONFIGS = {
    "gpt2": dict(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "llama": dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=64),
    "bert": dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 vocab_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0),
}
ARCHITECTURES = tuple(TINY_CONFIGS)


def tiny_spec(arch: str, batch: int = 2, seq: int = 16, **overrides) -> ModelSpec:
    """A tiny ``hf:<arch>`` ModelSpec (dropout off so runs compare exactly)."""
    return load_hf_spec(arch, {**TINY_CONFIGS[arch], **overrides}, batch=batch, seq=seq)


def example_gpt_spec() -> ModelSpec:
    """The bundled plain-PyTorch GPT example (captured by symbolic tracing)."""
    return load_file_spec(ROOT / "examples" / "gpt.py")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests: tiny models gain nothing from threads, and on a shared CPU
    extra threads only contend (OpenMP spinning made a 2-thread step 70× slower on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=ARCHITECTURES)
def arch(request) -> str:
    """Each tiny architecture name in turn."""
    return request.param


@pytest.fixture
def spec(arch) -> ModelSpec:
    """A tiny ModelSpec of each architecture in turn."""
    return tiny_spec(arch)


def generic_tiny_overrides(model_type: str) -> dict:
    """Shrink any transformers config to 2 layers, width 64, 4 heads, vocab 128 (fields it has)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    overrides = {}
    for keys, value in ((("n_layer", "num_hidden_layers", "num_layers", "encoder_layers", "decoder_layers",
                          "num_decoder_layers"), 2),
                        (("n_embd", "hidden_size", "d_model"), 64),
                        (("n_head", "num_attention_heads", "num_heads", "encoder_attention_heads",
                          "decoder_attention_heads"), 4),
                        (("num_key_value_heads",), 2),
                        (("intermediate_size", "ffn_dim", "d_ff", "n_inner", "encoder_ffn_dim", "decoder_ffn_dim"), 128),
                        (("vocab_size",), 128), (("d_kv",), 16)):
        for key in keys:
            if getattr(config, key, None) is not None:
                overrides[key] = value
    return overrides
