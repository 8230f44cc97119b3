"""Shrink any ``transformers`` config to a tiny one by reading its own fields (no per-model list).

Each field of the config (and of its sub-configs: ``text_config``, ``vision_config``, ``encoder``…) gets
a role from its name and type, and the role says what the tiny value is:

1. layer counts (``num_hidden_layers``, ``n_layer``, ``encoder_layers``, ``depth``…) → 2; other layer
   counts (``num_nextn_predict_layers``, ``first_k_dense_replace``) → at most 1; per-stage depth lists
   → 1 each; lists and strings with one entry per layer (``layer_types``, a hybrid's
   ``hybrid_override_pattern``) keep 2 entries, one of each kind first;
2. widths: the hidden size and every field equal to it (``d_model``, ``word_embed_proj_dim``…) → 64,
   intermediate sizes (and fields equal to it) → 128, per-stage width lists scaled down by a power
   of two (≤ 128);
3. heads → 4, key/value heads → 2 (4 where they equalled the heads: no grouping), head dims → 16,
   per-stage head lists divided by their smallest entry; a heads × head-dim product that equalled a
   width (Mamba-2's heads × head dim = expand × hidden) is kept by deriving the heads from it;
4. vocabulary → 256, and every special token id (``pad_token_id``, ``image_token_id``, …) that falls
   outside it is renumbered from the top of the new vocabulary;
5. positions → 128, windows (``sliding_window``, ``attention_window``) → 16, experts → 4 with 2 per
   token and one group, SSM state sizes → 16, image size → 64 with patches ≤ 8;
6. dropout, drop-path, layer-drop, SpecAugment masking and router jitter → 0 (runs must compare exactly);
7. invariants: the hidden size is made a multiple of every head count, group counts divide it.

Fields declared with a None default are never set: the config derives them (``head_dim`` from hidden and
heads, ``layer_types`` from the layer count). ``LEVELS`` go from this full shrink to gentler ones (keep the
heads; shrink only depth, vocabulary and positions; only switch dropout off) for configs whose
invariants the full shrink breaks; the zoo takes the first level whose model builds and runs.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

LAYERS, HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = 2, 64, 128, 4, 2, 16
VOCAB, POSITIONS, WINDOW, EXPERTS, EXPERTS_PER_TOKEN, STATE = 256, 128, 16, 4, 2, 16
IMAGE, PATCH, STAGE_WIDTH = 64, 8, 128

# Gentlest last. Each level is the set of roles it shrinks.
_ALL = frozenset({"dropout", "layers", "layer_lists", "vocab", "positions", "width", "heads", "experts",
                  "window", "vision", "state"})
LEVELS: dict[str, frozenset[str]] = {
    "tiny": _ALL,
    "tiny-keep-heads": _ALL - {"heads"},
    "tiny-keep-lists": _ALL - {"heads", "layer_lists", "vision"},
    "tiny-keep-depth": _ALL - {"heads", "layers", "layer_lists"},
    "shallow": frozenset({"dropout", "layers", "vocab", "positions", "experts"}),
    "default": frozenset({"dropout"}),
}

_PRIMARY_LAYERS = re.compile(r"^(num_hidden_layers|n_layers?|num_layers|encoder_layers|decoder_layers|"
                             r"num_decoder_layers|num_encoder_layers|depth|num_hidden_blocks|n_blocks|"
                             r"num_self_attends_per_block)$")
_OTHER_LAYERS = re.compile(r"(_layers$|^first_k_dense|dense_replace)")
_HIDDEN = re.compile(r"^(hidden_size|d_model|n_embd|n_embed|embed_dim|dim|model_dim|d_embed|embedding_size|"
                     r"conv_channels|word_embed_proj_dim|d_latents)$")
_INTERMEDIATE = re.compile(r"(intermediate|ffn_dim|^d_ff$|^n_inner$|ffn_hidden_size|^d_inner$)")
_HEADS = re.compile(r"(^n_heads?$|heads$)")
_KV = re.compile(r"(key_value|kv_heads|num_kv|multi_query_group_num)")
_HEAD_DIM = re.compile(r"(head_dim$|^d_kv$|^dim_head$|^kv_channels$|head_size$|d_head$)")
_ROTARY_DIM = re.compile(r"^rotary_dim$")
_POSITIONS = re.compile(r"(max_position|^n_positions$|^n_ctx$|^max_source_positions$|^max_target_positions$|"
                        r"^max_seq_len$|^max_sequence_length$|^max_length$|^max_text_positions$|"
                        r"^max_speech_positions$)")
_WINDOW = re.compile(r"window")
_EXPERTS = re.compile(r"(^(num|n)_(local_|routed_)?experts$|^moe_num_experts$|^num_experts$)")
_EXPERTS_PER_TOKEN = re.compile(r"(experts_per_tok|experts_per_token|^top_?k$|^moe_topk$|num_selected_experts|"
                                r"^moe_k$|router_topk)")
_EXPERT_GROUPS = re.compile(r"(^n_group$|^topk_group$|^num_expert_group$|^n_shared_experts$|^num_shared_experts$)")
_STATE = re.compile(r"(^state_size$|d_state$|ssm_state_size$)")
_DROPOUT = re.compile(r"(drop|jitter|^mask_time_prob$|^mask_feature_prob$)")
_GROUPS = re.compile(r"groups$")
_STAGE_WIDTHS = re.compile(r"^(hidden_sizes|embed_dims|conv_dim|neck_hidden_sizes|embed_dim|channels|"
                           r"stage_(in|mid|out)_channels|(in|out)_channels)$")
_STAGE_DEPTHS = re.compile(r"^(depths|depth|num_block_repeats|stage_num_blocks|block_repeats)$")
_TOKEN_ID = re.compile(r"(token_id|token_index|token_ids)$")


def is_config(value: Any) -> bool:
    """True for a ``transformers`` config object (it has ``to_dict`` and ``model_type``)."""
    return hasattr(value, "to_dict") and hasattr(value, "model_type")


def shrink_overrides(config: Any, level: str = "tiny") -> dict[str, Any]:
    """Overrides (``field`` or ``sub_config.field`` → value) that turn ``config`` (a default config
    instance) into a tiny one at ``level`` (a key of ``LEVELS``). Pure: reads ``config`` only."""
    roles = LEVELS[level]
    token_ids: dict[int, int] = {}
    overrides: dict[str, Any] = {}
    _shrink_node(config, "", roles, overrides, token_ids)
    if "width" in roles:
        _follow_hidden_sizes(config, "", overrides, _hidden_aliases(config, "", overrides))
    return overrides


def _hidden_aliases(config: Any, prefix: str, overrides: dict[str, Any]) -> dict[int, int]:
    """Old → new value of every hidden size the shrink changed, in any sub-config."""
    aliases: dict[int, int] = {}
    for name, value in vars(config).items():
        if is_config(value) and not name.startswith("_"):
            aliases.update(_hidden_aliases(value, f"{prefix}{name}.", overrides))
        elif _HIDDEN.search(name.lower()) and _int(value) and prefix + name in overrides:
            aliases.setdefault(value, overrides[prefix + name])
    return aliases


def _follow_hidden_sizes(config: Any, prefix: str, overrides: dict[str, Any], aliases: dict[int, int]) -> None:
    """A sub-config's field that names another sub-config's hidden size (BLT's ``hidden_size_global``)
    follows that size when it shrinks."""
    for name, value in _declared_fields(config):
        if is_config(value):
            continue
        lower = name.lower()
        if prefix + name not in overrides and _int(value) in aliases and ("hidden" in lower or "dim" in lower):
            overrides[prefix + name] = aliases[value]
    for name, value in vars(config).items():
        if is_config(value) and not name.startswith("_"):
            _follow_hidden_sizes(value, f"{prefix}{name}.", overrides, aliases)


def _declared_fields(config: Any) -> list[tuple[str, Any]]:
    """(name, value) of the fields this config declares with a concrete default."""
    if dataclasses.is_dataclass(config):
        return [(f.name, _get(config, f.name)) for f in dataclasses.fields(config)
                if f.default is not None and not f.name.startswith("_") and _get(config, f.name) is not None]
    return [(k, v) for k, v in vars(config).items() if not k.startswith("_")]


def _shrink_node(config: Any, prefix: str, roles: frozenset[str], out: dict[str, Any],
                 token_ids: dict[int, int]) -> None:
    fields = dict(_declared_fields(config))
    for name, value in vars(config).items():
        if is_config(value) and not name.startswith("_"):
            _shrink_node(value, f"{prefix}{name}.", roles, out, token_ids)
    new: dict[str, Any] = {}
    layers = _int(_get(config, "num_hidden_layers"))
    hidden = _int(_get(config, "hidden_size"))
    intermediate = _int(_get(config, "intermediate_size"))
    target = _layer_target(fields, layers) if "layer_lists" in roles else LAYERS
    routed = any(_EXPERTS.search(name.lower()) and _int(value) for name, value in vars(config).items())
    for name, value in vars(config).items():
        # A router's top-k left unset by the default config (DeepSeek-V2) that a config with experts needs.
        if value is None and "experts" in roles and routed and _EXPERTS_PER_TOKEN.search(name.lower()):
            new[name] = EXPERTS_PER_TOKEN
    for name, value in fields.items():
        if isinstance(value, bool) or is_config(value) or value is None:
            continue
        changed = _shrink_field(name, value, roles, layers, hidden, intermediate, target)
        if changed is not None and changed != value:
            new[name] = changed
    _keep_relations(config, fields, new, roles)
    if "layers" in roles:
        _keep_layer_parts(config, fields, new)
    if "vocab" in roles:
        _renumber_token_ids(fields, new, token_ids)
    out.update({prefix + k: v for k, v in new.items()})


def _layer_target(fields: dict[str, Any], layers: int | None) -> int:
    """Layers to keep: 2, or one per kind of layer a per-layer list names (hybrids), at most 4."""
    kinds = [len(set(v)) for v in fields.values()
             if isinstance(v, (list, tuple, str)) and layers and len(v) == layers > LAYERS and len(set(v)) <= 4]
    return min(max([LAYERS, *kinds]), 4)


def _get(config: Any, name: str) -> Any:
    try:
        return getattr(config, name, None)
    except Exception:  # a heterogeneous config refuses to read a per-layer field globally: its stored value
        return vars(config).get(name)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _shrink_field(name: str, value: Any, roles: frozenset[str], layers: int | None, hidden: int | None,
                  intermediate: int | None, target: int) -> Any:
    lower = name.lower()
    if isinstance(value, float):
        return 0.0 if "dropout" in roles and _DROPOUT.search(lower) and value > 0 else None
    if isinstance(value, (list, tuple)):
        return _shrink_list(lower, value, roles, layers, target)
    if isinstance(value, str):  # a hybrid's layer pattern ("M-M*-..."), one character per layer
        per_layer = "layer_lists" in roles and layers and len(value) == layers > LAYERS and len(set(value)) <= 4
        return _keep_kinds(value, target) if per_layer else None
    if _int(value) is None:
        return None
    rules = (
        ("layers", _PRIMARY_LAYERS, lambda v: min(v, target)),
        ("layers", _OTHER_LAYERS, lambda v: min(v, 1) if "feat" not in lower and "conv" not in lower else v),
        ("vocab", re.compile("vocab"), lambda v: min(v, VOCAB)),
        ("positions", _POSITIONS, lambda v: min(v, POSITIONS)),
        ("window", _WINDOW, lambda v: min(v, WINDOW)),
        ("experts", _EXPERTS, lambda v: min(v, EXPERTS)),
        ("experts", _EXPERTS_PER_TOKEN, lambda v: min(v, EXPERTS_PER_TOKEN)),
        ("experts", _EXPERT_GROUPS, lambda v: min(v, 1)),
        ("state", _STATE, lambda v: min(v, STATE)),
        ("heads", _KV, lambda v: v),  # decided with the heads in _keep_relations
        ("heads", _HEADS, lambda v: min(v, HEADS)),
        ("heads", _HEAD_DIM, lambda v: min(v, HEAD_DIM)),
        ("heads", _ROTARY_DIM, lambda v: min(v, HEAD_DIM // 2)),
        ("vision", re.compile(r"^image_size$"), lambda v: min(v, IMAGE)),
        ("vision", re.compile(r"^patch_size$"), lambda v: min(v, PATCH)),
        ("width", _HIDDEN, lambda v: min(v, HIDDEN)),
        ("width", _INTERMEDIATE, lambda v: min(v, INTERMEDIATE)),
    )
    for role, pattern, shrink in rules:
        if pattern.search(lower):
            return shrink(value) if role in roles else None
    if "width" in roles and hidden and value == hidden and value > HIDDEN and not _TOKEN_ID.search(lower):
        return HIDDEN  # an alias of the hidden size under another name
    if "width" in roles and intermediate and value == intermediate and value > INTERMEDIATE:
        return INTERMEDIATE
    return None


def _shrink_list(lower: str, value: list | tuple, roles: frozenset[str], layers: int | None, target: int) -> Any:
    if not value or _TOKEN_ID.search(lower) or "token" in lower:
        return None
    kind = type(value)
    ints = all(_int(v) is not None for v in value)
    if "layer_lists" in roles and layers and len(value) == layers > LAYERS:
        return kind(_keep_kinds(list(value), target))
    if "vision" not in roles or not ints:
        if "dropout" in roles and all(isinstance(v, float) for v in value) and _DROPOUT.search(lower):
            return kind(0.0 for _ in value)
        return None
    if _STAGE_DEPTHS.search(lower):
        return kind(min(v, 1) for v in value)
    if _STAGE_WIDTHS.search(lower) and max(value) > STAGE_WIDTH:
        factor = 2 ** math.ceil(math.log2(max(value) / STAGE_WIDTH))
        return kind(max(8, 8 * math.ceil(v / factor / 8)) for v in value)
    if _HEADS.search(lower) and min(value) > 1:
        return kind(max(1, v // min(value)) for v in value)
    if lower == "image_size":
        return kind(min(v, IMAGE) for v in value)
    if lower == "patch_size":
        return kind(min(v, PATCH) for v in value)
    return None


def _keep_kinds(entries: list | str, count: int) -> list | str:
    """``count`` entries of a per-layer list, one of each distinct kind first (in layer order)."""
    chosen: list[int] = []
    seen: set = set()
    for index, entry in enumerate(entries):
        if entry not in seen:
            seen.add(entry)
            chosen.append(index)
    chosen = sorted(chosen[:count])
    for index in range(len(entries)):
        if len(chosen) >= count:
            break
        if index not in chosen:
            chosen = sorted(chosen + [index])
    picked = [entries[i] for i in chosen]
    return "".join(picked) if isinstance(entries, str) else picked


def _keep_layer_parts(config: Any, fields: dict[str, Any], new: dict[str, Any]) -> None:
    """Layer counts of a model's parts that sum to its layer count (Dory: input + recurrent + output layers =
    ``num_hidden_layers``, the recurrent count derived by the config) keep summing to it: each part at most
    one layer, the total their sum, so no part is left with none."""
    primary = next((n for n in fields if _PRIMARY_LAYERS.search(n.lower()) and _int(fields[n])), None)
    if primary is None or primary not in new:
        return
    parts = {n: v for n, v in vars(config).items() if n != primary and _int(v) and v > 0
             and _OTHER_LAYERS.search(n.lower()) and "feat" not in n.lower() and "conv" not in n.lower()}
    if len(parts) < 2 or sum(parts.values()) != fields[primary]:
        return
    for name in parts:
        if name in fields:
            new[name] = 1
    new[primary] = len(parts)


def _keep_relations(config: Any, fields: dict[str, Any], new: dict[str, Any], roles: frozenset[str]) -> None:
    """Key/value heads follow the heads (grouped stays grouped); a heads × head-dim product that equalled
    a width keeps equalling its shrunk value; the hidden size stays a multiple of every head count."""
    def current(name: str) -> Any:
        return new.get(name, fields.get(name))

    heads_names = [n for n in fields if _int(fields[n]) and _HEADS.search(n.lower()) and not _KV.search(n.lower())]
    kv_names = [n for n in fields if _int(fields[n]) and _KV.search(n.lower())]
    dim_names = [n for n in fields if _int(fields[n]) and _HEAD_DIM.search(n.lower())]
    if "heads" in roles:
        for heads in heads_names:
            for dim in dim_names:
                _derive_heads(fields, new, heads, dim)
        reference = next((n for n in heads_names if n in new), None)
        for kv in kv_names:
            old_heads = fields.get(reference) if reference else None
            if fields[kv] == old_heads and reference:
                new[kv] = current(reference)
            elif fields[kv] > KV_HEADS:
                new[kv] = KV_HEADS
    hidden_names = [n for n in fields if _int(fields[n]) and _HIDDEN.search(n.lower())]
    widths = []
    for hidden in hidden_names:
        value = current(hidden)
        for heads in heads_names + kv_names:
            count = current(heads)
            if _int(value) and _int(count) and value % count:
                value = count * math.ceil(value / count)
        if value != fields[hidden]:
            new[hidden] = value
        widths.append(value)
    widths += [w for n in new if isinstance(new[n], (list, tuple)) and _STAGE_WIDTHS.search(n.lower())
               for w in new[n] if _int(w)]
    for name in fields:  # group counts (group norm, grouped convolutions) must divide every width
        if _GROUPS.search(name.lower()) and _int(fields[name]) and widths:
            groups = math.gcd(current(name), *widths)
            if any(isinstance(new[n], (list, tuple)) for n in new if _STAGE_WIDTHS.search(n.lower())):
                groups = min(groups, max(1, min(widths) // 8))  # bottlenecks run at a fraction of the width
            if groups != fields[name]:
                new[name] = groups


def _derive_heads(fields: dict[str, Any], new: dict[str, Any], heads: str, dim: str) -> None:
    product = fields[heads] * fields[dim]
    for name, value in fields.items():
        widths = _HIDDEN.search(name.lower()) or _INTERMEDIATE.search(name.lower())
        if name in (heads, dim) or not _int(value) or name not in new or not widths:
            continue
        for factor in (1, 2, 4):
            if product == factor * value:
                shrunk = new[name] * factor
                if shrunk % new.get(dim, fields[dim]) == 0:
                    new[heads] = max(1, shrunk // new.get(dim, fields[dim]))
                return
    expand = fields.get("expand") or fields.get("mamba_expand")
    hidden = next((n for n in fields if _HIDDEN.search(n.lower()) and n in new), None)
    if _int(expand) and hidden and product == expand * fields[hidden]:
        dim_value = new.get(dim, fields[dim])
        if (expand * new[hidden]) % dim_value == 0:
            new[heads] = max(1, expand * new[hidden] // dim_value)


def _renumber_token_ids(fields: dict[str, Any], new: dict[str, Any], token_ids: dict[int, int]) -> None:
    """Token ids ≥ the tiny vocabulary get fresh ids counted down from its top (one per old id, shared
    across sub-configs, so ``image_token_id`` in the top config and the text config agree)."""
    def renumber(old: int) -> int:
        if old < VOCAB:
            return old
        if old not in token_ids:
            token_ids[old] = VOCAB - 1 - len(token_ids)
        return token_ids[old]

    for name, value in fields.items():
        if "token" not in name.lower():
            continue
        if _int(value) is not None and value >= VOCAB:
            new[name] = renumber(value)
        elif isinstance(value, (list, tuple)) and value and all(_int(v) is not None for v in value) \
                and any(v >= VOCAB for v in value):
            new[name] = type(value)(renumber(v) for v in value)
