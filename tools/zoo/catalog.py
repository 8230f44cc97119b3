"""What the zoo runs: every (model type, task) the installed ``transformers`` builds from a config — read
from its auto mappings, never a hand list — and the vendored public model files under ``vendored/``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

VENDORED = Path(__file__).resolve().parent / "vendored"
# Preference when one model class serves several tasks (BART's conditional-generation class is also its
# masked-LM entry): the sequence-to-sequence reading, which feeds the labels to the decoder, wins.
TASK_ORDER = ("seq2seq-lm", "speech-seq2seq", "causal-lm", "masked-lm", "image-classification",
              "audio-classification")
MODALITY = {"causal-lm": "text", "masked-lm": "text", "seq2seq-lm": "text", "speech-seq2seq": "audio",
            "image-classification": "vision", "audio-classification": "audio"}


@dataclass(frozen=True)
class Arch:
    """One zoo entry. ``key`` is what the CLI takes (``hf:bert``, ``hf:bert:causal-lm``) or
    ``vendored:<name>``; ``model_type``/``task`` are None for vendored files (``path`` is the model file)."""

    key: str
    modality: str
    class_name: str
    model_type: str | None = None
    task: str | None = None
    path: str | None = None


def hf_architectures() -> list[Arch]:
    """Every (model type, task) pair in the ``transformers`` auto mappings for the zoo's tasks, one entry
    per model class (sorted by key). The key omits the task where it is the type's default task."""
    from transformers.models.auto import modeling_auto
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    from effcompile.spec import default_hf_task, hf_tasks

    mappings = {"causal-lm": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                "masked-lm": modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
                "seq2seq-lm": modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
                "speech-seq2seq": modeling_auto.MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES,
                "image-classification": modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
                "audio-classification": modeling_auto.MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES}
    entries: list[Arch] = []
    for model_type in sorted(set().union(*mappings.values())):
        if model_type not in CONFIG_MAPPING_NAMES or not hf_tasks(model_type):
            continue
        try:
            default = default_hf_task(model_type)
        except Exception:  # a config that cannot even be built with its defaults: still listed, under its first task
            default = None
        by_class: dict[str, list[str]] = {}
        for task in TASK_ORDER:
            names = mappings[task].get(model_type)
            if names is not None:
                by_class.setdefault(names if isinstance(names, str) else names[0], []).append(task)
        for class_name, tasks in by_class.items():
            task = default if default in tasks else tasks[0]
            key = f"hf:{model_type}" if task == default else f"hf:{model_type}:{task}"
            entries.append(Arch(key, MODALITY[task], class_name, model_type, task))
    return sorted(entries, key=lambda a: a.key)


def vendored_architectures() -> list[Arch]:
    """The vendored public model files: ``vendored/<name>/effcompile_model.py`` (each beside its LICENSE)."""
    entries = []
    for wrapper in sorted(VENDORED.glob("*/effcompile_model.py")):
        name = wrapper.parent.name
        modality = "vision" if "vit" in name.lower() else "text"
        entries.append(Arch(f"vendored:{name}", modality, name, path=str(wrapper)))
    return entries


def arch_from_key(key: str) -> Arch:
    """The entry a key names (``hf:<type>``, ``hf:<type>:<task>``, ``vendored:<name>``) without listing
    the whole catalogue. Raises ValueError for a key that names nothing."""
    if key.startswith("vendored:"):
        wrapper = VENDORED / key.partition(":")[2] / "effcompile_model.py"
        if not wrapper.exists():
            raise ValueError(f"no vendored model {key}; see python -m tools.zoo list")
        name = wrapper.parent.name
        return Arch(key, "vision" if "vit" in name.lower() else "text", name, path=str(wrapper))
    from effcompile.hf_inputs import HF_TASKS
    from effcompile.spec import default_hf_task, mapping_names

    model_type, _, task = key.removeprefix("hf:").partition(":")
    task = task or default_hf_task(model_type)
    if task not in HF_TASKS:
        raise ValueError(f"{key}: unknown task {task!r}")
    names = mapping_names(HF_TASKS[task]).get(model_type)
    if names is None:
        raise ValueError(f"{key}: transformers has no {task} class for {model_type}")
    return Arch(key, MODALITY[task], names if isinstance(names, str) else names[0], model_type, task)


def all_architectures() -> list[Arch]:
    """Hugging Face architectures, then the vendored files."""
    return hf_architectures() + vendored_architectures()
