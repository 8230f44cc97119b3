"""Example inputs for a ``transformers`` model, by what its main input is: token ids (text), pixels
(vision) or audio features / waveforms (speech), plus the labels its task trains on.

1. The main input is named by the model class (``main_input_name``): ``input_ids`` (or anything else on
   a text task) gets random token ids that avoid every special token id the config names (an image or
   audio placeholder token would ask for features the example does not have); ``pixel_values`` (or any
   main input of an image-classification model) a ``[batch, channels, size, size]`` image read from the
   config (``num_channels``, ``image_size``; 224 when the config has none); ``input_features`` /
   ``input_values`` audio.
2. Labels follow the task: LM tasks (causal, masked, seq2seq, speech-to-text) get ``[batch, seq]`` token
   ids (``labels = input_ids`` for text decoders and encoders; an encoder-decoder shifts them into its
   decoder); classification tasks get one class id per example. A text encoder-decoder also gets an
   all-ones ``attention_mask``, as a tokenizer gives it.
3. Audio layouts differ between models (``[batch, mel, frames]`` for Whisper, ``[batch, frames, mel]``
   for Speech2Text, raw ``[batch, samples]`` for wav2vec2; Whisper also wants exactly
   ``2 · max_source_positions`` frames). The candidates are built from the config's own fields (feature
   sizes, source positions, convolution strides), and the first one the model runs on and returns a
   loss for is kept (a no-grad forward in eval mode each).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from .errors import SpecError

# Task → the transformers auto class that builds it.
HF_TASKS: dict[str, str] = {
    "causal-lm": "AutoModelForCausalLM",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
    "speech-seq2seq": "AutoModelForSpeechSeq2Seq",
    "masked-lm": "AutoModelForMaskedLM",
    "image-classification": "AutoModelForImageClassification",
    "audio-classification": "AutoModelForAudioClassification",
}
CLASSIFICATION_TASKS = ("image-classification", "audio-classification")
AUDIO_INPUTS = ("input_features", "input_values")
_FEATURE_FIELDS = ("num_mel_bins", "feature_size", "feature_projection_input_dim", "n_mels", "num_mel_filters",
                   "input_dim")
_FRAME_FIELDS = ("max_source_positions", "max_length", "max_audio_length")


def task_modality(task: str, main_input: str) -> str:
    """``text``, ``vision`` or ``audio``: what the model's main input is on ``task`` (token ids win:
    ImageGPT classifies images given as colour-cluster ids)."""
    if main_input in AUDIO_INPUTS:
        return "audio"
    if main_input == "pixel_values" or (task == "image-classification" and main_input != "input_ids"):
        return "vision"
    return "text"


def build_example_inputs(model: torch.nn.Module, config: Any, task: str, batch: int, seq: int,
                         seed: int, where: str) -> dict[str, torch.Tensor]:
    """The keyword inputs (main input + labels) ``model`` trains on for ``task``.

    ``seq`` is the token length (text input, LM labels); audio frame counts come from the config.
    Raises SpecError (naming ``where``) when no audio layout built from the config fits the model.
    """
    generator = torch.Generator().manual_seed(seed)
    main = getattr(model, "main_input_name", "input_ids") or "input_ids"
    modality = task_modality(task, main)
    labels = _labels(model, config, task, batch, seq, generator)
    if modality == "vision":
        return {main: _image(config, batch, generator), **labels}
    if modality == "audio":
        return _fitting_audio(model, config, main, batch, seq, generator, labels, where)
    ids = _token_ids(model, config, batch, seq, generator)
    if task in ("causal-lm", "masked-lm", "seq2seq-lm"):
        labels = {"labels": ids.clone()}
    if task == "seq2seq-lm" and _takes(model, "attention_mask"):
        # As a tokenizer gives it. Some encoders (LongT5, Switch Transformers) make this default only when
        # not compiling (`is_torchdynamo_compiling()`), so under export they would see None and fail.
        labels = {"attention_mask": torch.ones_like(ids), **labels}
    return {main: ids, **labels}


def _takes(model: torch.nn.Module, name: str) -> bool:
    """Whether ``model.forward`` has a parameter called ``name``."""
    import inspect

    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _labels(model: torch.nn.Module, config: Any, task: str, batch: int, seq: int,
            generator: torch.Generator) -> dict[str, torch.Tensor]:
    if task in CLASSIFICATION_TASKS:
        classes = int(safe_getattr(config, "num_labels") or 2)
        return {"labels": torch.randint(0, classes, (batch,), generator=generator)}
    if task == "speech-seq2seq":
        return {"labels": _token_ids(model, config, batch, seq, generator)}
    return {}


def _token_ids(model: torch.nn.Module, config: Any, batch: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    vocab = _vocab_size(model, config)
    special = {i for i in _special_token_ids(config) if 0 <= i < vocab}
    allowed = torch.tensor([i for i in range(vocab) if i not in special] or list(range(vocab)))
    return allowed[torch.randint(0, len(allowed), (batch, seq), generator=generator)]


def _vocab_size(model: torch.nn.Module, config: Any) -> int:
    """Ids must index the input embedding and, as labels, the output layer: the smaller of the two."""
    sizes = []
    for getter, attribute in (("get_input_embeddings", "num_embeddings"), ("get_output_embeddings", "out_features")):
        try:
            layer = getattr(model, getter)()
        except Exception:  # NotImplementedError, AttributeError, models without the accessor
            layer = None
        if isinstance(getattr(layer, attribute, None), int):
            sizes.append(int(getattr(layer, attribute)))
    if sizes:
        return min(sizes)
    for candidate in configs_of(config):
        vocab = safe_getattr(candidate, "vocab_size")
        if isinstance(vocab, int) and vocab > 0:
            return vocab
    return 100


def safe_getattr(config: Any, name: str) -> Any:
    """``getattr(config, name, None)``, also None where the config refuses the read (a per-layer field of
    a heterogeneous config raises instead of answering)."""
    try:
        return getattr(config, name, None)
    except Exception:
        return None


def configs_of(config: Any) -> Iterator[Any]:
    """``config`` and its sub-configs (``text_config``, ``encoder``, ...), depth first."""
    yield config
    for value in vars(config).values():
        if hasattr(value, "to_dict") and hasattr(value, "model_type") and value is not config:
            yield from configs_of(value)


def _special_token_ids(config: Any) -> set[int]:
    ids: set[int] = set()
    for candidate in configs_of(config):
        for key, value in vars(candidate).items():
            if not (key.endswith("token_id") or key.endswith("token_index") or key.endswith("token_ids")):
                continue
            values = value if isinstance(value, (list, tuple)) else [value]
            ids.update(v for v in values if isinstance(v, int) and not isinstance(v, bool))
    return ids


def _field(config: Any, names: tuple[str, ...]) -> Any:
    for candidate in configs_of(config):
        for name in names:
            value = safe_getattr(candidate, name)
            if value is not None:
                return value
    return None


def _image(config: Any, batch: int, generator: torch.Generator) -> torch.Tensor:
    channels = _field(config, ("num_channels", "in_channels", "input_channels")) or 3
    size = _field(config, ("image_size", "img_size", "input_size")) or 224
    height, width = (size, size) if isinstance(size, int) else (tuple(size)[-2:] if len(size) >= 2 else (size[0],) * 2)
    return torch.randn(batch, int(channels), int(height), int(width), generator=generator)


def one_line(error: BaseException, limit: int = 160) -> str:
    """``Type: first line of the message`` (cut at ``limit`` characters)."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:limit]}" if text else type(error).__name__


def _audio_candidates(config: Any, main: str, batch: int, seq: int, generator: torch.Generator) -> list[torch.Tensor]:
    features: list[int] = []
    for candidate in configs_of(config):
        per_channel = safe_getattr(candidate, "input_feat_per_channel")
        if isinstance(per_channel, int):
            features.append(per_channel * int(safe_getattr(candidate, "input_channels") or 1))
        features += [v for v in (safe_getattr(candidate, f) for f in _FEATURE_FIELDS) if isinstance(v, int) and v > 0]
    frames: list[int] = []
    for name in _FRAME_FIELDS:
        value = _field(config, (name,))
        if isinstance(value, int) and value > 0:
            frames += [2 * value, value] if name == "max_source_positions" else [value]
    frames += [4 * seq, 8 * seq]
    strides = _field(config, ("conv_stride",))
    samples = [seq * math.prod(strides)] if isinstance(strides, (list, tuple)) and strides else []
    samples += [seq * 320, 16000]
    candidates = []
    if main == "input_values":
        candidates += [torch.randn(batch, n, generator=generator) for n in dict.fromkeys(samples)]
    for f in dict.fromkeys(features or [80]):
        for t in dict.fromkeys(t for t in frames if t <= 16384):
            candidates.append(torch.randn(batch, f, t, generator=generator))
            candidates.append(torch.randn(batch, t, f, generator=generator))
    if main == "input_features":
        candidates += [torch.randn(batch, n, generator=generator) for n in dict.fromkeys(samples)]
    return candidates


def _fitting_audio(model: torch.nn.Module, config: Any, main: str, batch: int, seq: int, generator: torch.Generator,
                   labels: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    first_error = ""
    training = model.training
    model.eval()
    try:
        for audio in _audio_candidates(config, main, batch, seq, generator):
            inputs = {main: audio, **labels}
            try:
                with torch.no_grad():
                    output = model(**inputs)
            except Exception as error:  # the wrong layout raises whatever the model's first op raises
                first_error = first_error or one_line(error)
                continue
            loss = getattr(output, "loss", None)
            if isinstance(loss, torch.Tensor) and loss.dim() == 0:
                return inputs
            first_error = first_error or "the model returned no loss for its labels"
    finally:
        model.train(training)
    raise SpecError(f"{where}: no audio input built from the config fits {type(model).__name__}'s `{main}` "
                    f"(first try: {first_error}); write a model file with example_inputs() for it")
