"""What devices do per second, the numbers the cost model (``effcompile.analysis``) prices time with:
``DeviceProfile`` (the roofline's FLOP/s per dtype and memory bytes/s, the host link's bytes/s, the launch
and fusion figures), the named profiles and this process's own (``local_profile``), conversions between
seconds and FLOP-equivalents, and the host link's measurement and on-disk cache (``host_link_bandwidth``:
called by the caller — ``effcompile.compile`` — never by a pass, which reads ``HostLink`` off the Program).
``effcompile.analysis`` re-exports every public name here.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class DeviceProfile:
    """What one kind of device does per second: the two roofs of the roofline and the host link.

    ``flops_per_second``: dense matmul FLOP/s that large GEMMs reach (bf16 tensor cores on a GPU);
    ``memory_bytes_per_second``: bytes/s that elementwise kernels reach in device memory (HBM);
    ``host_link_bytes_per_second``: pinned host memory ↔ device, per direction (0: the device's memory
    is the host's, nothing to offload to); ``segment_overhead_share``: the fixed cost of one
    checkpointed segment (Python, dispatch), as a share of the whole forward's time;
    ``eager_time_scale``: how much longer an eager (uncompiled) forward takes than the roofline says
    (launches, unfused elementwise kernels) — what copies can hide behind is real time.

    Per-dtype and per-kernel rates (what ``--passes auto``'s step-time prediction reads):
    ``float32_flops_per_second`` / ``float16_flops_per_second``: matmul FLOP/s producing float32 / float16
    (None: 1/8 of ``flops_per_second`` — no TF32 — / the same as it); ``attention_share``: the share of the
    matmul rate attention kernels reach; ``kernel_seconds``: the fixed cost of one eager op (launch,
    dispatch); ``fused_memory_share``: the share of elementwise traffic left when compiled (Inductor fuses
    chains of elementwise ops)."""

    name: str
    flops_per_second: float
    memory_bytes_per_second: float
    host_link_bytes_per_second: float
    segment_overhead_share: float = 0.002
    eager_time_scale: float = 1.0
    float32_flops_per_second: float | None = None
    float16_flops_per_second: float | None = None
    attention_share: float = 0.5
    kernel_seconds: float = 8e-6
    fused_memory_share: float = 0.35

    @property
    def flops_per_byte(self) -> float:
        """The roofline's ridge point: FLOPs per byte at which compute and memory time are equal."""
        return self.flops_per_second / self.memory_bytes_per_second

    def matmul_rate(self, dtype: torch.dtype | None) -> float:
        """FLOP/s of a matmul producing ``dtype``: bfloat16 at ``flops_per_second``, float16 at
        ``float16_flops_per_second``, anything else (float32, unknown) at ``float32_flops_per_second``."""
        if dtype == torch.bfloat16:
            return self.flops_per_second
        if dtype == torch.float16:
            return self.float16_flops_per_second if self.float16_flops_per_second is not None else self.flops_per_second
        return self.float32_flops_per_second if self.float32_flops_per_second is not None else self.flops_per_second / 8


# Achieved, not datasheet, figures. H100/H200 keep remat's original ridge point (200 FLOPs per byte) so
# plans made before the profiles existed stay the same; the links are PCIe Gen5 x16 with pinned memory
# (~50 GB/s per direction measured on an H200; ``host_link_bandwidth`` measures the real one). The eager
# scale: GPT-2 medium, batch 8 × 1024, bf16 autocast ran 100 ms a step on an H200 where this roofline
# predicts about 46 (``measure_forward_seconds`` measures it on the device when the program is there).
DEVICE_PROFILES: dict[str, DeviceProfile] = {
    "h200": DeviceProfile("h200", 800e12, 4.0e12, 45e9, eager_time_scale=2.0),
    "h100": DeviceProfile("h100", 660e12, 3.3e12, 45e9, eager_time_scale=2.0),
    "cpu": DeviceProfile("cpu", 1e12, 1e11, 0.0),
}
DEFAULT_ACCELERATOR = "h200"


def device_profile(device: str | torch.device) -> DeviceProfile:
    """The profile for a profile name (``"h200"``, ``"h100"``, ``"cpu"``) or a torch device: a CUDA
    device by its name (H200, H100; any other GPU gets the H100 figures), the CPU the CPU's.
    Raises KeyError for an unknown profile name."""
    if isinstance(device, str) and device in DEVICE_PROFILES:
        return DEVICE_PROFILES[device]
    device = torch.device(device)
    if device.type != "cuda":
        if device.type == "cpu":
            return DEVICE_PROFILES["cpu"]
        raise KeyError(f"no cost profile for device {device}")
    name = torch.cuda.get_device_name(device).upper() if torch.cuda.is_available() else ""
    return DEVICE_PROFILES["h200" if "H200" in name else "h100"]


def cpu_low_precision_factor() -> float:
    """bf16 matmuls on this CPU relative to float32 (a prior; timed steps decide): AMX tiles ~4×, AVX-512
    BF16 ~1.5×, otherwise slower (operands converted), 0.5×. Read from ``/proc/cpuinfo``'s flags (not
    Linux: no bf16 instructions assumed)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:
        flags = []
    if "amx_bf16" in flags:
        return 4.0
    return 1.5 if "avx512_bf16" in flags else 0.5


def local_profile(device: str | torch.device) -> DeviceProfile:
    """The profile of ``device`` as this process sees it, for step-time predictions: a CUDA device its
    named profile (``device_profile``); the CPU sized to this process's threads (25 GFLOP/s float32 per
    core, 10 GB/s of memory bandwidth per core up to 4, bf16 per ``cpu_low_precision_factor``, float16
    at half that, no host link). Raises KeyError for a device without a profile."""
    device = torch.device(device)
    if device.type != "cpu":
        return device_profile(device)
    cores = max(1, min(torch.get_num_threads(), os.cpu_count() or 1))
    fp32 = 2.5e10 * cores
    factor = cpu_low_precision_factor()
    return DeviceProfile("cpu", fp32 * factor, 1e10 * min(cores, 4), 0.0, float32_flops_per_second=fp32,
                         float16_flops_per_second=fp32 * factor / 2, kernel_seconds=15e-6, fused_memory_share=0.5)


def cost_seconds(cost: float, profile: DeviceProfile) -> float:
    """FLOP-equivalents → seconds on ``profile``."""
    return cost / profile.flops_per_second


def seconds_cost(seconds: float, profile: DeviceProfile) -> float:
    """Seconds → FLOP-equivalents on ``profile`` (the unit solvers sum)."""
    return seconds * profile.flops_per_second


def exposed_copy_seconds(nbytes: float, window_seconds: float, link_bytes_per_second: float) -> float:
    """Seconds a copy of ``nbytes`` over the host link adds to a step when compute of
    ``window_seconds`` runs beside it: the part that cannot hide (inf without a link)."""
    if nbytes <= 0:
        return 0.0
    if link_bytes_per_second <= 0:
        return math.inf
    return max(0.0, nbytes / link_bytes_per_second - window_seconds)


@dataclass(frozen=True)
class HostLink:
    """The host link's measured bandwidth, a fact about the device the caller (``effcompile.compile``, the
    command line) measures before passes run and stores on the Program (``program.set_plan(HostLink(...))``):
    passes read it (``program.plan(HostLink)``) and never measure or cache it themselves. ``bytes_per_second``
    per direction (the slower one); ``source``: ``"measured"``, ``"cached"`` or ``"default"``."""

    bytes_per_second: float
    source: str


LINK_CACHE_ENV = "EFFCOMPILE_CACHE_DIR"  # where link.json lives (default ~/.cache/effcompile)


def link_cache_path() -> Path:
    """The file caching measured host-link bandwidths: ``$EFFCOMPILE_CACHE_DIR/link.json``, else
    ``~/.cache/effcompile/link.json``."""
    root = os.environ.get(LINK_CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "effcompile")
    return Path(root) / "link.json"


def measure_host_link(device: torch.device | str, nbytes: int = 256 * 2**20, repeats: int = 5) -> dict[str, float]:
    """Copy ``nbytes`` between pinned host memory and CUDA ``device`` on a side stream, both directions,
    and return the median bandwidth of ``repeats`` copies in bytes/s (``device_to_host``,
    ``host_to_device``). Raises RuntimeError without CUDA."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(f"measure_host_link needs a CUDA device, got {device}")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    on_device = torch.empty(nbytes, dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device)
    bandwidth = {}
    with torch.cuda.stream(stream):
        for name, target, source in (("device_to_host", host, on_device), ("host_to_device", on_device, host)):
            target.copy_(source, non_blocking=True)  # warm-up
            seconds = []
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(stream)
                target.copy_(source, non_blocking=True)
                end.record(stream)
                end.synchronize()
                seconds.append(start.elapsed_time(end) / 1000)
            bandwidth[name] = nbytes / sorted(seconds)[len(seconds) // 2]
    return bandwidth


def host_link_bandwidth(device: torch.device | str, measure: bool = True) -> tuple[float, str]:
    """Bytes/s the host link moves per direction (the slower one) for ``device``, and where the figure
    came from (``"measured"``, ``"cached"`` or ``"default"``). A CUDA device is measured once
    (``measure_host_link``) and cached in ``link_cache_path()`` under its name and UUID; without CUDA,
    with ``measure=False`` and nothing cached, or when measuring fails, the profile's default."""
    device = torch.device(device)
    default = device_profile(device).host_link_bytes_per_second
    if device.type != "cuda" or not torch.cuda.is_available():
        return default, "default"
    properties = torch.cuda.get_device_properties(device)
    key = f"{properties.name} {getattr(properties, 'uuid', device.index)}"
    path = link_cache_path()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    entry = cached.get(key) if isinstance(cached, dict) else None
    if isinstance(entry, dict) and isinstance(entry.get("bytes_per_second"), (int, float)):
        return float(entry["bytes_per_second"]), "cached"
    if not measure:
        return default, "default"
    try:
        measured = measure_host_link(device)
    except RuntimeError as error:  # out of memory or no pinned memory: the default is still a fair guess
        logging.getLogger(__name__).warning("host link not measured (%s); using %.0f GB/s", error, default / 1e9)
        return default, "default"
    bandwidth = min(measured.values())
    cached = cached if isinstance(cached, dict) else {}
    cached[key] = {"bytes_per_second": bandwidth, **measured, "torch": torch.__version__}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cached, indent=1))
    except OSError:  # a read-only home: measure again next time
        pass
    return bandwidth, "measured"
