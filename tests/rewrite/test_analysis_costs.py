"""The cost model's time side: device profiles, the roofline per node, exposed copy time, and the host link's
bandwidth (measured once per device and cached; the default without CUDA)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from effcompile import analysis, devices
from effcompile.analysis import (
    DEVICE_PROFILES,
    analyze,
    device_profile,
    exposed_copy_seconds,
    host_link_bandwidth,
    node_recompute_cost,
    node_time_cost,
    written_bytes,
)
from effcompile.capture import capture

from conftest import tiny_spec


def test_profiles_by_name_and_device():
    assert device_profile("h200") is DEVICE_PROFILES["h200"]
    assert device_profile(torch.device("cpu")).name == "cpu"
    assert device_profile("h200").flops_per_byte == pytest.approx(200.0)  # remat's original ridge point
    assert device_profile("h100").flops_per_byte == pytest.approx(200.0)
    assert device_profile("cpu").host_link_bytes_per_second == 0  # host memory is the device's memory
    with pytest.raises(KeyError):
        device_profile("meta")


def test_roofline_node_costs():
    program = capture(tiny_spec("gpt2"))
    costs = analyze(program)
    h200, cpu = DEVICE_PROFILES["h200"], DEVICE_PROFILES["cpu"]
    checked = 0
    for node in program.gm.graph.nodes:
        if node.name not in costs.costs:
            continue
        flops, moved = costs[node].flops, 2 * written_bytes(node, costs)
        if not moved:
            assert node_time_cost(node, costs, h200) == 0.0  # views and nodes writing nothing are free
            continue
        assert node_time_cost(node, costs, h200) == max(flops, 200.0 * moved)
        assert node_time_cost(node, costs, cpu) == max(flops, cpu.flops_per_byte * moved)
        assert node_recompute_cost(node, costs, "flops", h200) == flops
        checked += 1
    assert checked > 20
    with pytest.raises(ValueError, match="cost model"):
        node_recompute_cost(next(iter(program.gm.graph.nodes)), costs, "bytes", h200)


def test_exposed_copy_time():
    assert exposed_copy_seconds(0, 0.0, 1e9) == 0.0
    assert exposed_copy_seconds(1e9, 0.5, 1e9) == pytest.approx(0.5)  # 1 s of copy, 0.5 s hidden
    assert exposed_copy_seconds(1e9, 2.0, 1e9) == 0.0
    assert math.isinf(exposed_copy_seconds(1.0, 10.0, 0.0))  # no link: never hides


def test_host_link_default_without_cuda(monkeypatch, tmp_path):
    monkeypatch.setenv(analysis.LINK_CACHE_ENV, str(tmp_path))
    bandwidth, source = host_link_bandwidth("cpu")
    assert (bandwidth, source) == (0.0, "default")
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert host_link_bandwidth("cuda")[1] == "default"
    assert not (tmp_path / "link.json").exists()  # nothing measured, nothing written


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_link_measured_once_then_cached(monkeypatch, tmp_path):
    monkeypatch.setenv(analysis.LINK_CACHE_ENV, str(tmp_path))
    measured, source = host_link_bandwidth("cuda")
    assert source == "measured" and measured > 1e9
    entry = next(iter(json.loads((tmp_path / "link.json").read_text()).values()))
    assert entry["bytes_per_second"] == measured
    monkeypatch.setattr(devices, "measure_host_link", lambda *a, **k: pytest.fail("measured twice"))
    assert host_link_bandwidth("cuda") == (measured, "cached")
