"""Turn what the user named (a model file, ``hf:<type>``, an ``nn.Module``) into a ModelSpec."""

from __future__ import annotations

import ast
import copy
import importlib.util
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import SpecError
from .hf_inputs import HF_TASKS, build_example_inputs, safe_getattr, task_modality


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
                 seed: int = 0, task: str | None = None) -> ModelSpec:
    """Build a ``transformers`` model of ``model_type`` from its default config with random weights
    (no hub access), with ``model_args`` overriding config fields, and example inputs for its task.

    ``model_args`` keys are config fields; a dotted key sets a sub-config's field
    (``text_config.num_hidden_layers``). The config is built with them (as ``Config(**fields)``), so fields
    derived from others (``head_dim``, ``layer_types``) follow. ``task`` is one of ``HF_TASKS``
    (``causal-lm``, ``seq2seq-lm``, ``speech-seq2seq``, ``masked-lm``, ``image-classification``,
    ``audio-classification``); None picks the task the config is built for (``default_hf_task``).
    Inputs follow the model's main input (token ids, pixels or audio; see ``effcompile.hf_inputs``) and
    labels its task, so the output carries the task's loss. Raises SpecError for an unknown type, task or
    field, a config the model class refuses, or inputs that do not fit.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        close = sorted(k for k in CONFIG_MAPPING.keys() if model_type[:3] in k)[:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise SpecError(f"unknown Hugging Face model type hf:{model_type}{hint}; use a transformers "
                        "model_type such as hf:gpt2, hf:llama, hf:bert")
    overrides = dict(model_args or {})
    attn = overrides.pop("attn_implementation", None)
    experts = overrides.pop("experts_implementation", None)  # not a config field either (MoE: "eager" exports)
    name = f"hf:{model_type}"
    available = hf_tasks(model_type)
    if task is None:
        task = default_hf_task(model_type)
    elif task not in HF_TASKS:
        raise SpecError(f"{name}: unknown task {task!r}; use one of {', '.join(HF_TASKS)}")
    elif task not in available:
        raise SpecError(f"{name} has no {task} class in transformers; its tasks: {', '.join(available) or 'none'}")
    config = hf_config(model_type, overrides, task)
    if experts is not None:
        config._experts_implementation = experts  # read by the model's constructor (transformers 5)
    model = _build_hf_model(config, task, name, attn, seed)
    if task != default_hf_task(model_type):
        name = f"{name}:{task}"
    max_positions = _max_positions(config)
    main = getattr(model, "main_input_name", "input_ids")
    if task_modality(task, main) == "text" and max_positions is not None and seq > max_positions:
        raise SpecError(f"--seq {seq} exceeds {name}'s {max_positions} positions; "
                        "lower --seq or raise the config's position field with --model-arg")
    languages = safe_getattr(config, "languages")
    if hasattr(model, "set_default_language") and languages:  # adapters per language (X-MOD): pick the first
        model.set_default_language(list(languages)[0])
    kwargs = build_example_inputs(model, config, task, batch, seq, seed, name)
    model.train()
    return ModelSpec(model, (), kwargs, None, name)


def hf_config(model_type: str, model_args: Mapping[str, Any] | None = None, task: str | None = None) -> Any:
    """The config ``load_hf_spec`` builds the model from: ``model_type``'s defaults with ``model_args``
    (dotted keys reach sub-configs; ``attn_implementation`` is not a config field and is ignored), no
    key/value cache, and what ``task`` (default: ``default_hf_task``) needs. Raises SpecError for an
    unknown field or values the config class rejects."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    overrides = {k: v for k, v in (model_args or {}).items() if k != "attn_implementation"}
    defaults = CONFIG_MAPPING[model_type]()
    config = _hf_config(defaults, overrides, f"hf:{model_type}")
    check_config_sizes(config, defaults, f"hf:{model_type}")
    _prepare_config(config, task or default_hf_task(model_type))
    return config


#: Words in a config field's name that make an integer field a count or a size, which must be ≥ 1.
_SIZE_WORDS = {"layer", "layers", "head", "heads", "size", "dim", "vocab", "position", "positions", "embd",
               "embed", "embeddings", "inner", "hidden", "intermediate", "ctx", "experts"}


def check_config_sizes(config: Any, default: Any, where: str, prefix: str = "") -> None:
    """Raise SpecError for an integer config field named as a count or size (layers, heads, size, dim,
    vocab, positions, ...) below 1 — a 0-layer or negative-width model builds without complaint and is
    nonsense. Fields whose default is itself below 1 are left alone: there 0 or -1 means something (a
    "last layer" index, a disabled feature). Sub-configs are checked field by field (``prefix`` is the
    dotted path to ``config``, as ``--model-arg`` writes it)."""
    values = config.to_dict() if _is_config(config) else config
    defaults = default.to_dict() if _is_config(default) else default
    for key, value in values.items():
        base = defaults.get(key)
        if isinstance(value, Mapping) and isinstance(base, Mapping):
            check_config_sizes(value, base, where, f"{prefix}{key}.")
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value >= 1:
            continue
        if not _SIZE_WORDS & set(key.lower().split("_")):
            continue
        if base is None or (isinstance(base, int) and not isinstance(base, bool) and base >= 1):
            raise SpecError(f"{where}: config field {prefix}{key}={value} must be ≥ 1 (a count or size); "
                            f"fix --model-arg {prefix}{key}")


def hf_tasks(model_type: str) -> list[str]:
    """The tasks (keys of ``HF_TASKS``) ``transformers`` has a model class for, for ``model_type``."""
    return [task for task, auto in HF_TASKS.items() if model_type in mapping_names(auto)]


def mapping_names(auto_class: str) -> Mapping[str, Any]:
    """``transformers``' model-type → class-name(s) mapping behind ``auto_class`` (a value of ``HF_TASKS``)."""
    from transformers.models.auto import modeling_auto

    constant = {"AutoModelForCausalLM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
                "AutoModelForSeq2SeqLM": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
                "AutoModelForSpeechSeq2Seq": "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES",
                "AutoModelForMaskedLM": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
                "AutoModelForImageClassification": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
                "AutoModelForAudioClassification": "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES"}[auto_class]
    return getattr(modeling_auto, constant, {})


def default_hf_task(model_type: str) -> str:
    """The task ``hf:<model_type>`` trains by default: an encoder-decoder config's sequence-to-sequence
    LM (text, then speech); an encoder's masked LM where it has one (BERT's causal-LM class is its
    decoder variant); a causal LM; then image and audio classification. Raises SpecError when
    ``transformers`` has none of these for the type."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    available = hf_tasks(model_type)
    encoder_decoder = bool(getattr(CONFIG_MAPPING[model_type](), "is_encoder_decoder", False))
    order = (("seq2seq-lm", "speech-seq2seq") if encoder_decoder else ()) + (
        "masked-lm", "causal-lm", "seq2seq-lm", "speech-seq2seq", "image-classification", "audio-classification")
    for task in order:
        if task in available:
            return task
    raise SpecError(f"hf:{model_type} has no causal-LM, seq2seq, masked-LM, image- or audio-classification class "
                    "in transformers, so it has no training loss here; write a model file with a loss_fn instead")


def _hf_config(defaults: Any, overrides: Mapping[str, Any], where: str, prefix: str = "") -> Any:
    """``type(defaults)`` built with ``defaults``' explicit values and ``overrides`` (dotted keys reach
    sub-configs; ``prefix`` is the dotted path to ``defaults``). Fields whose declared default is None are
    left to the config to derive."""
    own: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        field_name, dot, rest = key.partition(".")
        if safe_getattr(defaults, field_name) is None and field_name not in vars(defaults):
            raise SpecError(f"{where} config has no field {key!r}; see transformers.{type(defaults).__name__} "
                            "for the fields")
        if dot:
            if not _is_config(getattr(defaults, field_name)):
                raise SpecError(f"{where} config field {field_name!r} is not a sub-config, so {key!r} cannot be "
                                "set; set the field itself")
            nested.setdefault(field_name, {})[rest] = value
        else:
            own[field_name] = value
    if not own and not nested:
        return defaults
    for field_name, sub_overrides in nested.items():
        own[field_name] = _hf_config(getattr(defaults, field_name), sub_overrides, f"{where}.{field_name}",
                                     f"{prefix}{field_name}.")
    try:
        return type(defaults)(**{**_explicit_fields(defaults), **own})
    except Exception as error:  # transformers' strict validation: ValueError, TypeError, StrictDataclass errors
        rejected = error
    # A field another one is built from (GPT-Neo's attention_layers from attention_types): set the fields
    # on the default config instead, as transformers users do, without the constructor's cross-checks.
    config = copy.deepcopy(defaults)
    for key, value in own.items():
        try:
            setattr(config, key, value)
        except Exception as error:  # transformers' own validation (StrictDataclassFieldValidationError, ...)
            if key in nested:
                lines = [line.strip() for line in str(rejected).strip().splitlines() if line.strip()]
                message = " ".join(lines[:2])[:240] or type(rejected).__name__
                raise SpecError(f"{where} config rejects {sorted(own)} ({type(rejected).__name__}: {message}); "
                                "fix the --model-arg values") from None
            reason = " ".join(str(error).split())[:300] or type(error).__name__
            raise SpecError(f"{where} config field {key!r} cannot be set to {value!r} ({reason}); "
                            f"fix --model-arg {prefix}{key}") from None
    return config


def _is_config(value: Any) -> bool:
    return hasattr(value, "to_dict") and hasattr(value, "model_type")


def _explicit_fields(config: Any) -> dict[str, Any]:
    """The fields of ``config`` that differ from its class's defaults, less those declared with a None
    default (derived from others in ``__post_init__``, or optional)."""
    import dataclasses

    if not dataclasses.is_dataclass(config):
        return {}
    fresh = type(config)()
    explicit = {}
    for field_ in dataclasses.fields(config):
        value = safe_getattr(config, field_.name)
        if field_.default is None or value is None:
            continue
        default = safe_getattr(fresh, field_.name)
        if value is not default and value != default:
            explicit[field_.name] = value
    return explicit


def _prepare_config(config: Any, task: str) -> None:
    """No key/value cache (training); a causal LM's config says it is a decoder (BERT's is_decoder);
    encoder-decoders shift labels into their decoder from a start token, which needs the ids set."""
    from .hf_inputs import configs_of

    for candidate in configs_of(config):
        if safe_getattr(candidate, "use_cache"):
            candidate.use_cache = False
    if task == "causal-lm" and safe_getattr(config, "is_decoder") is False:
        config.is_decoder = True
    if task in ("seq2seq-lm", "speech-seq2seq"):
        if safe_getattr(config, "pad_token_id") is None:
            config.pad_token_id = 0
        if safe_getattr(config, "decoder_start_token_id") is None:
            config.decoder_start_token_id = config.pad_token_id or 0  # labels shift into the decoder from here


def _build_hf_model(config: Any, task: str, name: str, attn: str | None, seed: int) -> Any:
    import transformers

    auto = getattr(transformers, HF_TASKS[task])
    names = mapping_names(HF_TASKS[task]).get(config.model_type)
    if isinstance(names, (tuple, list)) and not getattr(config, "architectures", None):
        config.architectures = [names[0]]  # several classes for one task (DeiT): transformers picks by this
    failure: Exception | None = None
    # SDPA where the architecture has it (FlexAttention-friendly, matched by sas), else eager.
    for implementation in ([attn] if attn else ["sdpa", "eager"]):
        torch.manual_seed(seed)
        try:
            return auto.from_config(config, attn_implementation=implementation)
        except (ValueError, ImportError) as error:
            failure = error
            if attn or "attention" not in str(error).lower():
                break
        except Exception as error:  # transformers' own checks (assertions on the config)
            failure = error
            break
    assert failure is not None
    message = str(failure).strip().splitlines()[0][:200] if str(failure).strip() else ""
    raise SpecError(f"{name}: building {task} model failed ({type(failure).__name__}: {message}); "
                    "check the --model-arg values") from None


def _max_positions(config: Any) -> int | None:
    for key in ("n_positions", "max_position_embeddings"):
        value = safe_getattr(config, key)
        if isinstance(value, int) and value > 0:  # XLNet's -1: no limit
            return value
    return None


def resolve_spec(model: str, model_args: list[str] | None = None, batch: int = 2, seq: int = 32) -> ModelSpec:
    """Resolve a CLI model string: ``hf:<type>``, ``hf:<type>:<task>`` (e.g. ``hf:bert:causal-lm``) or a
    path to a model file."""
    if model.startswith("hf:"):
        model_type, _, task = model[3:].partition(":")
        if not model_type:
            raise SpecError("hf: needs a model type, e.g. hf:gpt2")
        return load_hf_spec(model_type, parse_model_args(model_args or []), batch, seq, task=task or None)
    if model_args:
        raise SpecError("--model-arg applies to hf:<type> models only; set sizes in your model file")
    return load_file_spec(model)
