"""Turn what the user named (a model file, ``hf:<type>``, an ``nn.Module``) into a ModelSpec."""

from __future__ import annotations

import ast
import importlib.util
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import SpecError


@dataclass
class ModelSpec:
    """A model with the inputs to capture it on and, optionally, its loss.

    ``loss_fn(output, *args, **kwargs)`` returns a scalar; None means the model's own output carries
    the loss (``output.loss``) or there is none.
    """

    module: torch.nn.Module
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    loss_fn: Callable[..., torch.Tensor] | None = None
    name: str = "model"


def normalise_inputs(example_inputs: Any, where: str) -> tuple[tuple, dict[str, Any]]:
    """Split example inputs into (args, kwargs). Accepts a tensor, a tuple/list or a dict of tensors.

    Raises SpecError naming ``where`` when the value is of another kind.
    """
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)) and example_inputs:
        return tuple(example_inputs), {}
    if isinstance(example_inputs, Mapping) and example_inputs:
        if not all(isinstance(k, str) for k in example_inputs):
            raise SpecError(f"{where}: example_inputs dict keys must be argument names (str); "
                            "return e.g. {'input_ids': tensor}")
        return (), dict(example_inputs)
    raise SpecError(f"{where}: example_inputs must be a non-empty tuple or dict of tensors, got "
                    f"{type(example_inputs).__name__}; return e.g. (torch.randint(0, 100, (2, 16)),)")


def load_file_spec(path: str | Path) -> ModelSpec:
    """Load a model file defining ``build_model()`` (or ``model``), ``example_inputs()`` (or a value)
    and optionally ``loss_fn(output, *inputs)``."""
    path = Path(path)
    if not path.exists():
        raise SpecError(f"model file {path} does not exist; pass a .py file or hf:<model_type> (e.g. hf:gpt2)")
    if path.is_dir():
        raise SpecError(f"{path} is a folder, not a model file; pass a Python file defining build_model() and "
                        "example_inputs(), or hf:<model_type> (`effcompile train DIR` trains a folder written by "
                        "`effcompile --out`)")
    if path.suffix != ".py":
        raise SpecError(f"model file {path} is not a .py file; pass a Python file defining build_model() "
                        "and example_inputs(), or hf:<model_type>")
    try:
        ast.parse(path.read_text(), str(path))
    except SyntaxError as error:
        raise SpecError(f"{path}:{error.lineno}: syntax error ({error.msg}); fix the model file") from None
    module_name = f"_effcompile_user_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    user = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = user
    try:
        spec.loader.exec_module(user)
    except Exception as error:  # the user's code: report where it broke, not our traceback
        raise SpecError(f"{path}: importing it raised {type(error).__name__}: {error}; fix the model file") from error

    if hasattr(user, "build_model"):
        model = _call(user.build_model, path, "build_model()")
    elif hasattr(user, "model"):
        model = user.model
    else:
        raise SpecError(f"{path} defines neither build_model() nor model; add `def build_model(): return MyModel()`")
    if not isinstance(model, torch.nn.Module):
        raise SpecError(f"{path}: build_model()/model gave {type(model).__name__}, not a torch.nn.Module; "
                        "return the model instance")
    if not hasattr(user, "example_inputs"):
        raise SpecError(f"{path} defines no example_inputs; add `def example_inputs(): return (tensor, ...)`")
    inputs = user.example_inputs
    inputs = _call(inputs, path, "example_inputs()") if callable(inputs) else inputs
    args, kwargs = normalise_inputs(inputs, str(path))
    loss_fn = getattr(user, "loss_fn", None)
    if loss_fn is not None and not callable(loss_fn):
        raise SpecError(f"{path}: loss_fn is not callable; define `def loss_fn(output, *inputs): ...`")
    return ModelSpec(model, args, kwargs, loss_fn, path.stem)


def _call(function: Callable[[], Any], path: Path, what: str) -> Any:
    try:
        return function()
    except Exception as error:
        raise SpecError(f"{path}: {what} raised {type(error).__name__}: {error}; fix the model file") from error


def parse_model_args(pairs: list[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings; values are read as Python literals where they parse, else strings."""
    parsed: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise SpecError(f"--model-arg {pair!r} is not key=value; write e.g. --model-arg n_layer=2")
        parsed[key.strip()] = parse_literal(raw.strip())
    return parsed


def parse_literal(raw: str) -> Any:
    """Read ``raw`` as a Python literal (``2``, ``0.5``, ``True``, ``[1,2]``), else keep the string."""
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def load_hf_spec(model_type: str, model_args: Mapping[str, Any] | None = None, batch: int = 2, seq: int = 32,
                 seed: int = 0) -> ModelSpec:
    """Build a ``transformers`` model of ``model_type`` from its default config with random weights
    (no hub access), with ``model_args`` overriding config fields.

    Causal LMs get ``labels=input_ids`` so the output carries the shifted-token cross-entropy loss;
    masked LMs get the same labels (every position scored). Raises SpecError for an unknown type or key.
    """
    try:
        import transformers
        from transformers import AutoConfig
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except ImportError as error:  # pragma: no cover - transformers is a dependency
        raise SpecError(f"hf:{model_type} needs transformers ({error}); pip install transformers") from error
    if model_type not in CONFIG_MAPPING:
        close = sorted(k for k in CONFIG_MAPPING.keys() if model_type[:3] in k)[:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise SpecError(f"unknown Hugging Face model type hf:{model_type}{hint}; use a transformers "
                        "model_type such as hf:gpt2, hf:llama, hf:bert")
    config = AutoConfig.for_model(model_type)
    overrides = dict(model_args or {})
    attn = overrides.pop("attn_implementation", None)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise SpecError(f"hf:{model_type} config has no field {key!r}; see "
                            f"transformers.{type(config).__name__} for the fields")
        try:
            setattr(config, key, value)
        except Exception as error:  # transformers' own validation (StrictDataclassFieldValidationError, ...)
            reason = " ".join(str(error).split())[:300] or type(error).__name__
            raise SpecError(f"hf:{model_type} config field {key!r} cannot be set to {value!r} ({reason}); "
                            f"fix --model-arg {key}") from None
    check_config_sizes(config, AutoConfig.for_model(model_type), f"hf:{model_type}")
    if hasattr(config, "use_cache"):
        config.use_cache = False
    if getattr(config, "is_encoder_decoder", False) and getattr(config, "decoder_start_token_id", None) is None:
        config.decoder_start_token_id = config.pad_token_id or 0  # labels shift into the decoder from here
    model, task = _build_hf_model(transformers, config, model_type, attn, seed)
    vocab = int(getattr(config, "vocab_size", 0) or 100)
    max_positions = _max_positions(config)
    if max_positions is not None and seq > max_positions:
        raise SpecError(f"--seq {seq} exceeds hf:{model_type}'s {max_positions} positions; "
                        "lower --seq or raise the config's position field with --model-arg")
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    kwargs: dict[str, Any] = {"input_ids": input_ids}
    if task in ("causal", "masked", "seq2seq"):
        kwargs["labels"] = input_ids.clone()
    model.train()
    return ModelSpec(model, (), kwargs, None, f"hf:{model_type}")


#: Words in a config field's name that make an integer field a count or a size, which must be ≥ 1.
_SIZE_WORDS = {"layer", "layers", "head", "heads", "size", "dim", "vocab", "position", "positions", "embd",
               "embed", "embeddings", "inner", "hidden", "intermediate", "ctx", "experts"}


def check_config_sizes(config: Any, default: Any, where: str) -> None:
    """Raise SpecError for an integer config field named as a count or size (layers, heads, size, dim,
    vocab, positions, ...) below 1 — a 0-layer or negative-width model builds without complaint and is
    nonsense. Fields whose default is itself below 1 are left alone: there 0 or -1 means something (a
    "last layer" index, a disabled feature)."""
    defaults = default.to_dict()
    for key, value in config.to_dict().items():
        if isinstance(value, bool) or not isinstance(value, int) or value >= 1:
            continue
        if not _SIZE_WORDS & set(key.lower().split("_")):
            continue
        base = defaults.get(key)
        if base is None or (isinstance(base, int) and not isinstance(base, bool) and base >= 1):
            raise SpecError(f"{where}: config field {key}={value} must be ≥ 1 (a count or size); "
                            f"fix --model-arg {key}")


def _build_hf_model(transformers: Any, config: Any, model_type: str, attn: str | None, seed: int) -> tuple[Any, str]:
    # Encoders that have a masked-LM head (BERT, RoBERTa) train as masked LMs; decoders as causal LMs;
    # encoder-decoders (T5, BART) as sequence-to-sequence LMs, whose labels also feed the decoder.
    for auto_class, task in (("AutoModelForMaskedLM", "masked"), ("AutoModelForCausalLM", "causal"),
                             ("AutoModelForSeq2SeqLM", "seq2seq"), ("AutoModel", "base")):
        auto = getattr(transformers, auto_class)
        if type(config) not in auto._model_mapping:
            continue
        # SDPA where the architecture has it (FlexAttention-friendly, matched by sas), else eager.
        for implementation in ([attn] if attn else ["sdpa", "eager"]):
            torch.manual_seed(seed)
            try:
                return auto.from_config(config, attn_implementation=implementation), task
            except (ValueError, ImportError) as error:
                failure = error
                if attn or "attention" not in str(error).lower():
                    break
            except Exception as error:  # transformers' own checks (assertions on the config)
                failure = error
                break
        raise SpecError(f"hf:{model_type}: building the model failed ({type(failure).__name__}: "
                        f"{str(failure).splitlines()[0][:200]}); check the --model-arg values") from None
    raise SpecError(f"hf:{model_type} has no masked-LM, causal-LM, seq2seq or base model class in transformers; "
                    "write a model file instead")


def _max_positions(config: Any) -> int | None:
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def resolve_spec(model: str, model_args: list[str] | None = None, batch: int = 2, seq: int = 32) -> ModelSpec:
    """Resolve a CLI model string: ``hf:<type>`` or a path to a model file."""
    if model.startswith("hf:"):
        model_type = model[3:]
        if not model_type:
            raise SpecError("hf: needs a model type, e.g. hf:gpt2")
        return load_hf_spec(model_type, parse_model_args(model_args or []), batch, seq)
    if model_args:
        raise SpecError("--model-arg applies to hf:<type> models only; set sizes in your model file")
    return load_file_spec(model)
