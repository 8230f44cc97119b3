"""LoRA adapters in PEFT's format: the adapter weights under PEFT's names, and adapter folders
(``adapter_model.safetensors`` + ``adapter_config.json``) that ``peft.PeftModel.from_pretrained`` loads.

An adapter is any module holding ``lora_A`` and ``lora_B`` linears (PEFT's naming; the ``lora`` pass's
``LoraLinear``) with ``rank``, ``alpha``, ``rslora``, ``layout``, ``lora_dropout`` and ``bias``; it is
found by that shape, so this module imports no pass. Saved names are ``base_model.model.<path>.lora_A.weight``.

    from effcompile.export.peft import save_peft_adapter, load_peft_adapter
    save_peft_adapter(result, "adapter/")   # peft.PeftModel.from_pretrained(hf_model, "adapter/") loads it
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import SpecError

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def adapter_modules(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every LoRA adapter in ``module`` (a module whose ``lora_A`` and ``lora_B`` are linears), by path."""
    return {name: m for name, m in module.named_modules()
            if isinstance(getattr(m, "lora_A", None), torch.nn.Linear)
            and isinstance(getattr(m, "lora_B", None), torch.nn.Linear)}


def _as_module(model: Any) -> torch.nn.Module:
    for attribute in ("module", "gm"):  # CompileResult, Program
        if not isinstance(model, torch.nn.Module) and hasattr(model, attribute):
            model = getattr(model, attribute)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a module, CompileResult or Program, got {type(model).__name__}")
    return model


def lora_state_dict(model: Any, prefix: str = PEFT_PREFIX) -> dict[str, torch.Tensor]:
    """The adapter weights (and trainable biases) under PEFT's saved names,
    ``base_model.model.<path>.lora_A.weight`` etc. ``model``: a module, CompileResult or Program."""
    module = _as_module(model)
    state: dict[str, torch.Tensor] = {}
    for path, adapter in adapter_modules(module).items():
        state[f"{prefix}{path}.lora_A.weight"] = adapter.lora_A.weight.detach()
        state[f"{prefix}{path}.lora_B.weight"] = adapter.lora_B.weight.detach()
        if adapter.bias is not None and adapter.bias.requires_grad:
            state[f"{prefix}{path}.bias"] = adapter.bias.detach()
    return state


@torch.no_grad()
def load_lora_state_dict(model: Any, state: dict[str, torch.Tensor], prefix: str = PEFT_PREFIX) -> int:
    """Copy adapter weights named as ``lora_state_dict`` names them (PEFT's names; a ``.default`` adapter
    segment is accepted too) into ``model``'s adapters. Returns how many tensors were copied; raises
    KeyError naming an adapter the state lacks."""
    module = _as_module(model)
    normalised = {key.replace(".default.", ".").removeprefix(prefix): value for key, value in state.items()}
    count = 0
    for path, adapter in adapter_modules(module).items():
        for part in ("lora_A", "lora_B"):
            key = f"{path}.{part}.weight"
            if key not in normalised:
                raise KeyError(f"no weights for {key} in the adapter state")
            getattr(adapter, part).weight.copy_(normalised[key])
            count += 1
    return count


def save_peft_adapter(model: Any, folder: str | Path, task_type: str | None = None,
                      base_model_name_or_path: str | None = None) -> Path:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` in PEFT's format into ``folder``
    (created if needed), so ``peft.PeftModel.from_pretrained(base_model, folder)`` loads the adapters onto
    the original Hugging Face model. Merged adapters are saved as they are (their B·A is also in the
    base weights). Raises ValueError if ``model`` has no adapters. Returns the folder."""
    from safetensors.torch import save_file

    module = _as_module(model)
    adapters = adapter_modules(module)
    if not adapters:
        raise ValueError("the model has no LoRA adapters; run the lora pass first")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous().cpu() for k, v in lora_state_dict(module).items()}
    save_file(state, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(_peft_config(adapters, task_type, base_model_name_or_path),
                                                    indent=2))
    return folder


def _peft_config(adapters: dict[str, torch.nn.Module], task_type: str | None,
                 base_model_name_or_path: str | None) -> dict[str, Any]:
    """PEFT's ``LoraConfig`` as JSON: the most common rank and alpha, the others as per-path patterns."""
    ranks = {path: a.rank for path, a in adapters.items()}
    alphas = {path: a.alpha for path, a in adapters.items()}
    first = next(iter(adapters.values()))
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    trainable_bias = any(a.bias is not None and a.bias.requires_grad for a in adapters.values())
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, torch.nn.Dropout) else 0.0
    return {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "r": rank, "lora_alpha": alpha, "lora_dropout": dropout,
        "target_modules": sorted(adapters), "bias": "lora_only" if trainable_bias else "none",
        "fan_in_fan_out": first.layout == "in_out", "use_rslora": first.rslora, "init_lora_weights": True,
        "rank_pattern": {p: r for p, r in ranks.items() if r != rank},
        "alpha_pattern": {p: a for p, a in alphas.items() if a != alpha},
        "modules_to_save": None, "inference_mode": True,
    }


def load_peft_adapter(model: Any, folder: str | Path) -> int:
    """Load ``adapter_model.safetensors`` from a PEFT adapter folder (ours or PEFT's) into ``model``'s
    adapters, which must exist with the same paths and shapes. Returns the number of tensors copied."""
    from safetensors.torch import load_file

    return load_lora_state_dict(model, load_file(str(Path(folder) / ADAPTER_WEIGHTS)))


def read_peft_adapter(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a PEFT adapter folder: its ``adapter_config.json`` settings (rank ``r``, ``lora_alpha``,
    ``target_modules``, ``use_rslora``) and its weights. Raises SpecError for a folder without both files
    or an adapter that is not a uniform LoRA one (another PEFT type, per-layer rank/alpha patterns)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    settings_file, weights_file = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not settings_file.exists() or not weights_file.exists():
        raise SpecError(f"adapter folder {folder} lacks {ADAPTER_CONFIG} or {ADAPTER_WEIGHTS}; point lora.adapter "
                        "at a folder written by save_peft_adapter or PEFT's save_pretrained")
    settings = json.loads(settings_file.read_text())
    if settings.get("peft_type", "LORA") != "LORA" or settings.get("rank_pattern") or settings.get("alpha_pattern"):
        raise SpecError(f"{folder} is not a plain LoRA adapter (peft_type {settings.get('peft_type')}, "
                        "or per-layer rank/alpha patterns); only uniform LoRA adapters load")
    return settings, load_file(str(weights_file))
