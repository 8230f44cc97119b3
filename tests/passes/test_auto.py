"""``auto``: it picks a stack on the bundled GPT (CPU, small budget), the record lists every candidate with its
predicted and measured numbers, approximate passes are candidates only when allowed, the memory limit is
never exceeded by the choice (an impossible one is a one-line error), the search budget bounds the timing,
and the execution plan it leaves decides how the module runs."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import effcompile
from effcompile.errors import OptionError, PassError
from effcompile.pass_manager import registry
from effcompile.passes.auto.space import (
    Candidate,
    SpaceContext,
    local_window,
    make_step,
    pass_choices,
    sas_block_size,
    stacks,
)
from effcompile.plans import ExecutionPlan
from effcompile.train.backends import should_compile

from conftest import example_gpt_spec

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = {"steps": 2, "warmup": 1}


@pytest.fixture(scope="module")
def chosen():
    """auto on the bundled GPT with a budget that times several candidates."""
    return effcompile.compile(example_gpt_spec(), passes=["auto"], options={"auto": {"budget_seconds": 20, **FAST}})


def details(result) -> dict:
    return result.report.record("auto").details


def test_auto_picks_a_stack_and_reports_every_candidate(chosen):
    info = details(chosen)
    rows = info["candidates"]
    winners = [r for r in rows if r["status"] == "winner"]
    assert len(winners) == 1 and info["winner"]["label"] == winners[0]["label"]
    timed = [r for r in rows if r["status"] in ("winner", "lost", "stopped")]
    assert len(timed) >= 2
    for row in timed:
        assert row["predicted_step_seconds"] > 0 and row["predicted_memory_bytes"] > 0
        assert row["measured_step_seconds"] > 0 and row["measured_memory_bytes"] > 0 and row["steps_timed"] >= 1
    for row in rows:
        assert row["status"] and (row["status"] == "winner" or row["reason"]), row
    fastest = min((r for r in rows if r["status"] in ("winner", "lost")), key=lambda r: r["measured_step_seconds"])
    assert winners[0]["measured_step_seconds"] <= fastest["measured_step_seconds"] * (1 + 0.03)
    assert winners[0]["measured_memory_bytes"] <= info["memory_limit_bytes"]
    assert info["why"] and info["search_seconds"] > 0
    assert "compile" not in winners[0]["label"] and any("torch.compile" in n for n in info["notes"])


def test_the_choice_is_installed_and_runs(chosen):
    plan = chosen.program.plan(ExecutionPlan)
    winner = details(chosen)["winner"]
    assert plan is not None and plan.chosen_by == "auto" and list(plan.stack) == winner["passes"]
    assert plan.compile is False and chosen.runnable() is chosen.module
    assert chosen.report.to_dict()["execution"]["stack"] == winner["passes"]
    for record in details(chosen)["passes"]:  # the winner's passes, each verified against its input
        assert record["verify"] is not None and record["verify"]["ok"]
    spec = example_gpt_spec()
    replay = effcompile.compile(spec, passes=list(plan.stack), options=plan.options, verify=False)
    torch.manual_seed(0)
    expected = spec.loss_fn(replay.module(*spec.args), *spec.args)
    torch.manual_seed(0)
    assert torch.allclose(spec.loss_fn(chosen.module(*spec.args), *spec.args), expected)


def test_approximate_passes_only_when_allowed(chosen):
    for row in details(chosen)["candidates"]:
        assert not {"sas", "lowrank"} & set(row["passes"]) and row["options"].get("amp", {}).get("dtype") != "float8"
    passes = {n: c for n, c in registry().items() if n != "auto"}
    context = SpaceContext("cpu", 2048, frozenset())
    choices, left_out = pass_choices(passes, context)
    assert "sas" not in choices and "allow" in left_out["sas"] and "lowrank" not in choices
    assert "amp" in choices and "fuse" in choices
    allowed, _ = pass_choices(passes, dataclasses.replace(context, allow=frozenset({"sas"})))
    windows = sorted(c["window"] for c in allowed["sas"])
    assert windows == [local_window(2048, 0.25, 128), local_window(2048, 0.5, 128)]
    assert all(any(name == "sas" for name, _ in stack) or stack in stacks(passes, choices)
               for stack in stacks(passes, allowed))
    with pytest.raises(OptionError, match="allow nope unknown; choose from"):
        effcompile.compile(example_gpt_spec(), passes=["auto"], options={"auto": {"allow": "nope"}})


def test_sas_window_keeps_the_asked_density():
    for seq, density in ((8192, 0.25), (8192, 0.5), (1024, 0.25)):
        block = sas_block_size(seq)
        window = local_window(seq, density, block)
        kept = 2 * window / seq - (window / seq) ** 2
        assert window % block == 0 and density <= kept <= density + 2 * block / seq
    assert sas_block_size(8192) == 128 and sas_block_size(256) == 32


def test_stacks_follow_declared_order_and_label():
    passes = {n: c for n, c in registry().items() if n != "auto"}
    choices = {"amp": [{"dtype": "bfloat16"}], "fuse": [{}], "sas": [{"pattern": "local", "window": 256}]}
    found = stacks(passes, choices)
    assert found[0] == () and len(found) == 8
    full = [s for s in found if len(s) == 3][0]
    assert [name for name, _ in full] == ["sas", "fuse", "amp"]
    label = Candidate(full, compile=True).label
    assert label.startswith("sas(local, window=256)+fuse+amp(bfloat16)") and label.endswith("+compile")
    assert make_step("amp", {"dtype": "bfloat16"}) == ("amp", (("dtype", "bfloat16"),))


def test_memory_limit_is_respected_and_an_impossible_one_is_one_line():
    spec = example_gpt_spec()
    limit = 20 * 2**20  # below every stack without remat (about 21-24 MiB here), above remat's plans
    result = effcompile.compile(spec, passes=["auto"], options={"auto": {"budget_seconds": 8, "memory": "20MiB",
                                                                          **FAST}})
    info = details(result)
    assert info["memory_limit_bytes"] == limit
    winner = info["winner"]
    assert "remat" in winner["passes"] and winner["measured_memory_bytes"] <= limit
    for row in info["candidates"]:
        size = row["measured_memory_bytes"] or row["predicted_memory_bytes"]
        if size is not None and size > limit:
            assert row["status"] in ("over memory", "pruned", "duplicate"), row
    with pytest.raises(PassError) as error:
        effcompile.compile(spec, passes=["auto"], options={"auto": {"memory": "1MiB", "budget_seconds": 1, **FAST}})
    message = str(error.value)
    assert "\n" not in message and "no candidate fits the memory limit" in message and "auto.memory" in message


def test_budget_bounds_the_search():
    result = effcompile.compile(example_gpt_spec(), passes=["auto"],
                                options={"auto": {"budget_seconds": 0, **FAST}})
    rows = details(result)["candidates"]
    timed = [r for r in rows if r["steps_timed"]]
    assert len(timed) == 1 and timed[0]["status"] == "winner"
    assert all(r["status"] in ("not built", "not timed", "pruned", "duplicate", "winner") for r in rows)
    assert any(r["status"] in ("not built", "not timed") for r in rows)


def test_option_errors():
    for options, match in (({"memory": "lots"}, "neither a fraction nor a size"),
                           ({"memory": 3}, "fraction in \\(0, 1\\]"), ({"steps": 0}, "steps 0 must be ≥ 1"),
                           ({"sas_densities": "1.5"}, "not in \\(0, 1\\)")):
        with pytest.raises(OptionError, match=match):
            effcompile.compile(example_gpt_spec(), passes=["auto"], options={"auto": options})


def test_execution_plan_decides_compilation():
    plan = ExecutionPlan(compile=True, stack=("amp",), chosen_by="auto")
    assert should_compile("auto", plan) and not should_compile("auto", None)
    assert not should_compile("off", plan) and should_compile("on", None)
    assert not should_compile("auto", dataclasses.replace(plan, compile=False))
    assert ExecutionPlan.from_dict(plan.to_dict()) == plan
    module = torch.nn.Linear(2, 2)
    assert plan.runnable(module) is not module and ExecutionPlan().runnable(module) is module


def test_cli_prints_the_candidate_table_and_the_json(capsys):
    from effcompile.cli.main import main

    from conftest import ROOT

    argv = [str(ROOT / "examples" / "gpt.py"), "--passes", "auto", "--no-verify", "--set", "auto.budget_seconds=0",
            "--set", "auto.steps=1", "--set", "auto.warmup=0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "auto: candidates" in out and "winner" in out and "chose " in out and "not built" in out
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    record = report["passes"][0]
    assert record["name"] == "auto" and record["details"]["candidates"]
    assert report["execution"]["stack"] == record["details"]["winner"]["passes"]
