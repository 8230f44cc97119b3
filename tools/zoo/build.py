"""Build a zoo entry's ModelSpec through effcompile's own spec code (``load_hf_spec`` / ``load_file_spec``,
what ``effcompile hf:<type>`` and ``effcompile model.py`` run), at the tiniest shrink level that builds."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .catalog import Arch
from .shrink import LEVELS, shrink_overrides

BATCH, SEQ = 2, 32
MAX_PARAMETERS = 30_000_000  # a level that leaves more is too big for a CPU zoo run
# How a BuildError opens when transformers itself fails on the architecture's own default config (making the
# config, or building the model from it): the table counts such an architecture apart.
DEFAULT_BREAKS = "transformers cannot build"


@dataclass
class Built:
    """A spec and how it was made: the shrink level, the config overrides, and why gentler levels were
    needed (``tries``: level → the first line of what went wrong)."""

    spec: Any
    level: str
    overrides: dict[str, Any] = field(default_factory=dict)
    tries: dict[str, str] = field(default_factory=dict)
    parameters: int = 0
    path: str | None = None
    seq: int = SEQ

    def command(self) -> str:
        """The effcompile command line that builds this spec (add ``--passes ...``)."""
        if self.path is not None:
            return f"effcompile {self.path}"
        args = " ".join(f"--model-arg {k}={_literal(v)}" for k, v in self.overrides.items())
        return f"effcompile {self.spec.name} {args} --batch {BATCH} --seq {self.seq}".replace("  ", " ")


class BuildError(Exception):
    """No shrink level gave a model that builds and trains one step; the message lists each level's error."""


def _literal(value: Any) -> str:
    text = repr(value).replace(" ", "")
    return f"'{text}'" if any(c in text for c in "[]()'\"") else text


def build(arch: Arch, batch: int = BATCH, seq: int = SEQ) -> Built:
    """The entry's spec: a vendored model file as it is; a Hugging Face config shrunk at the first level
    of ``LEVELS`` whose model builds, has ≤ ``MAX_PARAMETERS`` parameters and runs forward and backward
    on its example inputs with a finite loss. Raises BuildError listing every level's failure."""
    from effcompile.spec import load_file_spec

    if arch.path is not None:
        spec = load_file_spec(arch.path)
        root = Path(__file__).resolve().parents[2]
        relative = Path(arch.path).resolve().relative_to(root) if Path(arch.path).resolve().is_relative_to(root) \
            else Path(arch.path)
        return Built(spec, "as written", parameters=_count(spec.module), path=str(relative))
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from effcompile.errors import EffcompileError
    from effcompile.spec import load_hf_spec

    tries: dict[str, str] = {}
    try:
        defaults = CONFIG_MAPPING[arch.model_type]()
    except Exception as error:
        raise BuildError(f"{DEFAULT_BREAKS} {arch.class_name} from its own default config "
                         f"(making the config: {_line(error)})") from None
    seen: list[dict[str, Any]] = []
    for level in LEVELS:
        overrides = shrink_overrides(defaults, level)
        if overrides in seen:
            continue
        seen.append(overrides)
        try:
            parameters = _meta_parameters(arch, overrides)
            if parameters > MAX_PARAMETERS:
                tries[level] = f"{parameters / 1e6:.0f}M parameters (limit {MAX_PARAMETERS / 1e6:.0f}M)"
                continue
            spec = load_hf_spec(arch.model_type, overrides, batch, seq, task=arch.task)
            parameters = _count(spec.module)
            length = seq
            try:
                _check_trains(spec)
            except ValueError as error:
                length = _fixed_output_length(error, batch, seq)
                if length is None:
                    raise
                spec = load_hf_spec(arch.model_type, overrides, batch, length, task=arch.task)
                _check_trains(spec)
        except (EffcompileError, Exception) as error:  # noqa: B014 - say which kind it was
            tries[level] = _line(error)
            continue
        return Built(spec, level, overrides, tries, parameters, seq=length)
    broken = _default_breaks(arch)
    prefix = f"{DEFAULT_BREAKS} {arch.class_name} from its own default config ({broken}); " if broken else ""
    raise BuildError(prefix + "; ".join(f"{level}: {message}" for level, message in tries.items()))


def _default_breaks(arch: Arch) -> str:
    """The error ``transformers`` raises building the unmodified default config (on the meta device),
    or "" when it builds."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from effcompile.hf_inputs import HF_TASKS

    try:
        config = CONFIG_MAPPING[arch.model_type]()
        with torch.device("meta"):
            getattr(transformers, HF_TASKS[arch.task]).from_config(config)
    except Exception as error:
        return _line(error, 160)
    return ""


def _meta_parameters(arch: Arch, overrides: dict[str, Any]) -> int:
    """Parameters of the model ``overrides`` give, counted on the meta device (nothing allocated), so a
    level that leaves a billion-parameter model is skipped before it fills the memory. 0 when the model
    cannot be built on the meta device."""
    import transformers

    from effcompile.hf_inputs import HF_TASKS
    from effcompile.spec import hf_config

    config = hf_config(arch.model_type, overrides, arch.task)
    try:
        with torch.device("meta"):
            model = getattr(transformers, HF_TASKS[arch.task]).from_config(config)
    except Exception:  # some models cannot be built on the meta device: build them for real, unchecked
        return 0
    return _count(model)


_LENGTHS = re.compile(r"Expected input batch_size \((\d+)\) to match target batch_size \((\d+)\)")


def _fixed_output_length(error: ValueError, batch: int, seq: int) -> int | None:
    """The sequence length a model's loss wants when its output length is fixed by the config rather than
    by its input (Perceiver's masked LM decodes ``max_position_embeddings`` positions): read from the loss's
    mismatch, when the labels were ``batch × seq`` and the output a whole number of rows per example."""
    match = _LENGTHS.search(str(error))
    if not match:
        return None
    rows, labels = int(match.group(1)), int(match.group(2))
    if labels != batch * seq or rows % batch or rows // batch in (0, seq) or rows // batch > 512:
        return None
    return rows // batch


def _check_trains(spec: Any) -> None:
    spec.module.zero_grad(set_to_none=True)
    output = spec.module(*spec.args, **spec.kwargs)
    loss = spec.loss_fn(output, *spec.args, **spec.kwargs) if spec.loss_fn else output.loss
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not math.isfinite(float(loss.detach())):
        raise ValueError(f"the example inputs give no finite scalar loss ({loss!r:.80})")
    loss.backward()
    spec.module.zero_grad(set_to_none=True)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _line(error: BaseException, limit: int = 240) -> str:
    text = str(error).strip()
    first = text.splitlines()[0][:limit] if text else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__
