"""Bounds for every option of every pass, checked in one place (each pass's Config): the error names the
pass, the option, the value and what is allowed."""

import dataclasses
import typing

import pytest

import effcompile
from effcompile.errors import OptionError
from effcompile.options import build_config
from effcompile.pass_manager import registry

from conftest import tiny_spec


def _options(kind):
    """(pass, option) for every option whose type admits ``kind`` (int or float)."""
    found = []
    for name, cls in registry().items():
        hints = typing.get_type_hints(cls.Config)
        for option in dataclasses.fields(cls.Config):
            members = typing.get_args(hints[option.name]) or (hints[option.name],)
            if kind in members and not (kind is float and int in members):
                found.append((name, option.name))
    return found


@pytest.mark.parametrize("pass_name, option", _options(float))
@pytest.mark.parametrize("value", ["nan", "inf", float("nan"), float("-inf")])
def test_no_float_option_takes_nan_or_inf(pass_name, option, value):
    with pytest.raises(OptionError) as error:
        build_config(pass_name, registry()[pass_name].Config, {option: value})
    assert f"{pass_name}" in str(error.value) and option in str(error.value)


@pytest.mark.parametrize("pass_name, option", [(p, o) for p, o in _options(int) if o != "seed"])
def test_no_count_or_size_option_takes_a_negative_value(pass_name, option):
    with pytest.raises(OptionError) as error:
        build_config(pass_name, registry()[pass_name].Config, {option: "-1"})
    assert f"{pass_name}" in str(error.value) and option in str(error.value)


@pytest.mark.parametrize("pass_name, options, message", [
    ("remat", {"budget": "7"}, "remat: budget=7.0 is not allowed: a fraction of the un-checkpointed model's "
                               "saved activations must be > 0 and ≤ 1, in (0, 1]"),
    ("remat", {"budget": "0"}, "in (0, 1]"),
    ("remat", {"budget": "1.5"}, "in (0, 1]"),
    ("remat", {"budget": "-2GiB"}, "neither a fraction nor a size"),
    ("pipeline", {"stages_per_rank": "0"}, "pipeline: stages_per_rank=0 must be at least 1"),
    ("lora", {"dropout": "1"}, "lora: dropout 1.0 must be in [0, 1)"),
    ("sas", {"density": "0"}, "sas: density 0.0 must be in (0, 1]"),
    ("lowrank", {"energy": "1.5"}, "lowrank: energy 1.5 is outside (0, 1]"),
])
def test_out_of_range_values_are_refused_naming_the_range(pass_name, options, message):
    with pytest.raises(OptionError) as error:
        build_config(pass_name, registry()[pass_name].Config, options)
    assert message in str(error.value)


def test_remat_budget_of_one_and_of_bytes_are_accepted():
    config_class = registry()["remat"].Config
    assert build_config("remat", config_class, {"budget": "1"}).budget == 1.0
    assert build_config("remat", config_class, {"budget": "2GiB"}).budget == "2GiB"


def test_lora_rank_above_a_targets_dimensions_is_refused_naming_the_layer():
    spec = tiny_spec("gpt2", seq=8)  # width 64: c_attn is 64 → 192, c_proj 64 → 64
    with pytest.raises(OptionError) as error:
        effcompile.compile(spec, passes=["lora"], options={"lora": {"rank": 10**9}}, verify=False, measure=False)
    message = str(error.value)
    assert message.startswith("lora: rank=1000000000 is not allowed: it must be ≤ min(in, out) of every target")
    assert "transformer.h.0.attn" in message and "lora.rank=<1..64>" in message
    result = effcompile.compile(tiny_spec("gpt2", seq=8), passes=["lora"], options={"lora": {"rank": 64}},
                                verify=False, measure=False)
    assert result.report.record("lora").changed


#: Options a pass needs before its Config is valid at all (lowrank: a rank or an energy).
_REQUIRED = {"lowrank": {"energy": 0.9}}


@pytest.mark.parametrize("pass_name, option", _options(float))
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_configs_built_directly_refuse_nan_and_inf(pass_name, option, value):
    # the Python API builds Config(...) without build_config's parsing: __post_init__ holds the bounds
    config_class = registry()[pass_name].Config
    hint = typing.get_type_hints(config_class)[option]
    given = (value,) if typing.get_origin(hint) is tuple else value
    with pytest.raises(OptionError) as error:
        config_class(**{**_REQUIRED.get(pass_name, {}), option: given})
    assert f"{pass_name}" in str(error.value) and option in str(error.value)
