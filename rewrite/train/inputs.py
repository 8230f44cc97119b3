"""From a (batch, seq) tensor of byte tokens to a module's inputs and its loss, and the byte-level GPT the
training benchmarks use."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import SpecError

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
