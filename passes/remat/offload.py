"""``remat``'s offload mechanics: selected activations go to pinned host memory on a side stream during the
forward and come back, prefetched, during the backward. Exact: the bytes that come back are the bytes that
left, so gradients are bit-identical.

How (``torch.autograd.graph.saved_tensors_hooks``, like ``save_on_cpu`` but selective, asynchronous and
prefetching):

1. The rewritten graph runs a span of nodes inside ``OffloadedSpan``, which opens a ``_Session`` and installs
   its pack/unpack hooks for the span's forward only. Inside the span, ``offload_mark(session, t, region)``
   nodes name the storages the plan offloads (right after the node that produced them), and
   ``offload_region_end(session, region, t)`` nodes close each region whose previous region offloads.
   Under ``torch.compile`` the marks and region ends are graph breaks (their bookkeeping stays Python); the
   compiled pieces' saved tensors go through the same hooks.
2. Every tensor autograd saves in the span is wrapped in a ``_Saved``. Once its storage is marked (before or
   after the save — an op may save its own output), the storage is copied to host memory on the link's side
   stream after the compute stream's work so far, every ``_Saved`` of that storage drops its device
   reference, and the caching allocator reuses the device memory once the copy is done (``record_stream``).
   Unmarked storages stay on the device as autograd would keep them.
3. At the end of region r+1 the compute stream waits for region r's copies (a no-op when they hid behind
   r+1's forward), and a hook on r+1's output gradient prefetches region r when the backward reaches r+1.
4. Unpacking waits (on the device, not the CPU) for the prefetch, fetching first if nothing prefetched it,
   and rebuilds the saved view (dtype, size, stride, offset) over the restored bytes. A storage's device copy
   is dropped after its last unpack.

The link is pluggable: ``CudaLink`` (pinned memory, a side CUDA stream, events) is used for CUDA tensors; on
the CPU nothing is offloaded unless a link is given (``OffloadedSpan.use_link``, e.g. ``SimulatedLink`` in
tests, whose "device" is the CPU and which logs every copy and wait).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.fx.node import has_side_effect
from torch.multiprocessing.reductions import StorageWeakRef

from effcompile.export.registry import serializable


class Link(Protocol):
    """Moves whole storages (as 1-D uint8 tensors) between device and host memory without blocking compute."""

    def to_host(self, source: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Start copying ``source`` to host memory after the compute queued so far; return (host, event)."""

    def to_device(self, host: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, Any]:
        """Start copying ``host`` back to ``device``; return (device tensor, event)."""

    def wait(self, event: Any) -> None:
        """Make the compute stream wait for ``event`` (does not block the CPU)."""

    def note(self, kind: str, region: int, nbytes: int) -> None:
        """Record one step of the protocol (``mark``, ``prefetch``, ``fetch``, ``unpack``, ``forward_wait``)."""


class CudaLink:
    """Pinned host memory and one side stream per device; events order the two streams. With ``timing``,
    each copy is bracketed by timing events (``copy_seconds`` sums them: what the link was busy)."""

    def __init__(self, device: torch.device, timing: bool = False) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.counts: dict[str, int] = {}
        self.bytes: dict[str, int] = {}
        self.timing = timing
        self.timed: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def _copy(self, target: torch.Tensor, source: torch.Tensor) -> torch.cuda.Event:
        with torch.cuda.stream(self.stream):
            if self.timing:
                start = torch.cuda.Event(enable_timing=True)
                start.record(self.stream)
            target.copy_(source, non_blocking=True)
            event = torch.cuda.Event(enable_timing=self.timing)
            event.record(self.stream)
        if self.timing:
            self.timed.append((start, event))
        return event

    def to_host(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        """Copy on the side stream once the compute stream has produced ``source``."""
        host = torch.empty(source.numel(), dtype=torch.uint8, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(source.device))
        event = self._copy(host, source)
        source.record_stream(self.stream)  # the allocator reuses the device block only after the copy
        return host, event

    def to_device(self, host: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.cuda.Event]:
        """Allocate on the compute stream (its memory is then free for it), fill on the side stream."""
        target = torch.empty(host.numel(), dtype=torch.uint8, device=device)
        self.stream.wait_stream(torch.cuda.current_stream(device))
        event = self._copy(target, host)
        target.record_stream(self.stream)  # safe even if it is freed before the compute stream used it
        return target, event

    def copy_seconds(self) -> float:
        """Seconds the side stream spent copying since the last call (``timing`` links; synchronises)."""
        self.stream.synchronize()
        seconds = sum(start.elapsed_time(end) for start, end in self.timed) / 1000
        self.timed.clear()
        return seconds

    def wait(self, event: torch.cuda.Event) -> None:
        """The compute stream waits; the CPU goes on."""
        torch.cuda.current_stream(self.device).wait_event(event)

    def note(self, kind: str, region: int, nbytes: int) -> None:
        """Count protocol steps and bytes (read by the benchmark)."""
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.bytes[kind] = self.bytes.get(kind, 0) + nbytes


class SimulatedLink:
    """A link whose "device" is the CPU, for tests: copies are clones made at once, and every copy, wait and
    protocol step is appended to ``log`` as ``(kind, region, nbytes)`` (copies log region -1). ``released``
    holds weak references to every storage sent to host memory, to check the device copy was let go."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int, int]] = []
        self.released: list[StorageWeakRef] = []

    def to_host(self, source: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Clone ``source`` (the host copy); the event is the log position."""
        self.released.append(StorageWeakRef(source.untyped_storage()))
        self.log.append(("to_host", -1, source.numel()))
        return source.clone(), len(self.log)

    def to_device(self, host: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, int]:
        """Clone ``host`` back."""
        self.log.append(("to_device", -1, host.numel()))
        return host.clone(), len(self.log)

    def wait(self, event: int) -> None:
        """Log the wait."""
        self.log.append(("wait", -1, event))

    def note(self, kind: str, region: int, nbytes: int) -> None:
        """Log a protocol step."""
        self.log.append((kind, region, nbytes))


class _Stored:
    """One offloaded storage: its host copy, its device copy while fetched, and how many saves refer to it."""

    def __init__(self, link: Link, region: int, storage: torch.UntypedStorage) -> None:
        self.link, self.region, self.device = link, region, storage.device
        self.nbytes = storage.nbytes()
        self.weak = StorageWeakRef(storage)
        self.host: torch.Tensor | None = None
        self.host_event: Any = None
        self.on_device: torch.Tensor | None = None
        self.device_event: Any = None
        self.waited = False
        self.saves = 0
        self.unpacked = 0

    def copy_out(self, storage: torch.UntypedStorage) -> None:
        """Start the device → host copy of the whole storage (once)."""
        if self.host is None:
            with torch.no_grad():
                source = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
            self.host, self.host_event = self.link.to_host(source)

    def prefetch(self) -> None:
        """Start the host → device copy unless the bytes are on the device or on their way."""
        if self.on_device is None and self.host is not None:
            self.on_device, self.device_event = self.link.to_device(self.host, self.device)
            self.waited = False
            self.link.note("prefetch", self.region, self.nbytes)

    def restore(self, saved: _Saved) -> torch.Tensor:
        """The saved view over the bytes back on the device (fetched now if no prefetch ran)."""
        if self.on_device is None:
            self.link.note("fetch", self.region, self.nbytes)
            self.prefetch()
        if not self.waited:
            self.link.wait(self.device_event)
            self.waited = True
        self.link.note("unpack", self.region, self.nbytes)
        assert self.on_device is not None
        with torch.no_grad():
            tensor = torch.empty(0, dtype=saved.dtype, device=self.device).set_(
                self.on_device.untyped_storage(), saved.offset, saved.size, saved.stride)
        self.unpacked += 1
        if self.unpacked >= self.saves:  # every save has its tensor: the next unpack (retain_graph) fetches again
            self.on_device, self.unpacked = None, 0
        return tensor


class _Saved:
    """What the pack hook returns: the saved tensor (detached), or, once its storage is offloaded, the view's
    layout over that storage."""

    __slots__ = ("tensor", "version", "stored", "dtype", "size", "stride", "offset")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor: torch.Tensor | None = tensor.detach()
        self.version = tensor._version
        self.stored: _Stored | None = None

    def attach(self, stored: _Stored) -> None:
        """Refer to ``stored`` instead of the device tensor (which is let go)."""
        tensor = self.tensor
        assert tensor is not None
        self.dtype, self.size, self.stride, self.offset = tensor.dtype, tensor.size(), tensor.stride(), tensor.storage_offset()
        self.stored, self.tensor = stored, None
        stored.saves += 1

    def unpack(self) -> torch.Tensor:
        """The tensor autograd saved."""
        if self.stored is not None:
            return self.stored.restore(self)
        assert self.tensor is not None
        if self.tensor._version != self.version:  # what autograd itself checks when no hooks are installed
            raise RuntimeError("one of the variables needed for gradient computation has been modified by an "
                               "inplace operation (inside a remat offload span)")
        return self.tensor


class _Session:
    """One forward of an ``OffloadedSpan``: the storages marked for offload, the saves waiting for a mark, and
    the offloaded storages by region."""

    def __init__(self, link: Link, device: torch.device) -> None:
        self.link, self.device = link, device
        self.marked: dict[int, tuple[StorageWeakRef, int]] = {}  # storage address → (storage, region)
        self.stored: dict[int, _Stored] = {}
        self.pending: dict[int, list[_Saved]] = {}
        self.by_region: dict[int, list[_Stored]] = {}

    def _live(self, table: dict, key: int, weak_of: Any) -> Any:
        entry = table.get(key)
        if entry is not None and weak_of(entry).expired():  # the address now belongs to a new storage
            del table[key]
            return None
        return entry

    def pack(self, tensor: torch.Tensor) -> _Saved:
        """Wrap a saved tensor; offload it when its storage is marked."""
        saved = _Saved(tensor)
        if tensor.device != self.device or tensor.layout != torch.strided:
            return saved
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        stored = self._live(self.stored, key, lambda s: s.weak)
        if stored is None and self._live(self.marked, key, lambda m: m[0]) is not None:
            stored = self._store(key, storage)
        if stored is not None:
            stored.copy_out(storage)
            saved.attach(stored)
        else:
            self.pending.setdefault(key, []).append(saved)
        return saved

    def _store(self, key: int, storage: torch.UntypedStorage) -> _Stored:
        region = self.marked.pop(key)[1]
        stored = _Stored(self.link, region, storage)
        self.stored[key] = stored
        self.by_region.setdefault(region, []).append(stored)
        self.link.note("mark", region, stored.nbytes)
        return stored

    @staticmethod
    def unpack(saved: _Saved) -> torch.Tensor:
        """The tensor back (from host memory when offloaded)."""
        return saved.unpack()

    def mark(self, tensor: Any, region: int) -> None:
        """Offload ``tensor``'s storage: now if something already saved it, else at its first save."""
        if not isinstance(tensor, torch.Tensor) or tensor.device != self.device or tensor.layout != torch.strided:
            return
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if self._live(self.stored, key, lambda s: s.weak) is not None:
            return
        self.marked[key] = (StorageWeakRef(storage), region)
        waiting = [s for s in self.pending.pop(key, []) if s.tensor is not None]
        if waiting:
            stored = self._store(key, storage)
            stored.copy_out(storage)
            for saved in waiting:
                saved.attach(stored)

    def region_end(self, region: int, outputs: Sequence[Any]) -> None:
        """Close ``region``: wait for the previous region's copies to host, and prefetch that region when the
        backward reaches this one (hooks on the gradients of ``outputs``, the region's values read later:
        the first to arrive starts the prefetch)."""
        previous = [s for s in self.by_region.get(region - 1, []) if s.host is not None]
        if not previous:
            return
        self.link.note("forward_wait", region - 1, sum(s.nbytes for s in previous))
        self.link.wait(previous[-1].host_event)  # one stream: the last copy finishing means all did
        for tensor in outputs:
            if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                tensor.register_hook(lambda grad: self.prefetch(region - 1))

    def prefetch(self, region: int) -> None:
        """Start bringing ``region``'s storages back to the device."""
        for stored in self.by_region.get(region, []):
            stored.prefetch()

    def close(self) -> None:
        """The span's forward is over: forget what was waiting for a mark (autograd holds the saves)."""
        self.pending.clear()
        self.marked.clear()


@serializable
def no_session() -> None:
    """The session placeholder in the parent graph (``OffloadedSpan`` passes the real one to its body)."""
    return None


@serializable
@has_side_effect  # no users, and no dead-code pass may drop it
@torch._dynamo.disable  # under torch.compile: a graph break, the session's bookkeeping stays Python
def offload_mark(session: _Session | None, tensor: Any, region: int) -> None:
    """Graph node: offload ``tensor``'s storage (a no-op outside an offloading forward)."""
    if session is not None:
        session.mark(tensor, region)


@serializable
@has_side_effect
@torch._dynamo.disable
def offload_region_end(session: _Session | None, region: int, outputs: Sequence[Any]) -> None:
    """Graph node: the end of ``region`` (see ``_Session.region_end``)."""
    if session is not None:
        session.region_end(region, outputs)


@serializable(transient={"_links": dict, "_fixed_link": lambda: None})
class OffloadedSpan(torch.nn.Module):
    """Runs ``body`` (a stateless GraphModule holding ``offload_mark``/``offload_region_end`` nodes) with the
    offload hooks installed for its forward. ``session_input`` is the position of the body input that
    receives the session. Offloads CUDA tensors through a ``CudaLink`` per device; elsewhere, only with a
    link given by ``use_link``."""

    def __init__(self, body: torch.fx.GraphModule, session_input: int) -> None:
        super().__init__()
        self.body = body
        self.session_input = session_input
        self._links: dict[torch.device, Link] = {}
        self._fixed_link: Link | None = None
        self._disabled = False

    def use_link(self, link: Link | None) -> None:
        """Offload through ``link`` whatever the device (tests, benchmarks); None: back to the default."""
        self._fixed_link = link

    def set_offloading(self, enabled: bool) -> None:
        """Turn offloading off (everything stays on the device, as without the plan's offloads) or back on."""
        self._disabled = not enabled

    def links(self) -> list[Link]:
        """The links this span has used (one per device, or the one given to ``use_link``)."""
        return [self._fixed_link] if self._fixed_link is not None else list(self._links.values())

    def link_for(self, device: torch.device) -> Link | None:
        """The link used for tensors on ``device`` (None: nothing is offloaded there)."""
        if getattr(self, "_disabled", False):
            return None
        if self._fixed_link is not None:
            return self._fixed_link
        if device.type != "cuda":
            return None
        if device not in self._links:
            self._links[device] = CudaLink(device)
        return self._links[device]

    def forward(self, *args: Any) -> Any:
        args_list = list(args)
        session = self._open(args_list)
        if session is None:
            return self.body(*args_list)
        args_list[self.session_input] = session
        try:
            with torch.autograd.graph.saved_tensors_hooks(session.pack, session.unpack):
                return self.body(*args_list)
        finally:
            _close(session)

    @torch._dynamo.disable
    def _open(self, args: list[Any]) -> _Session | None:
        if any(isinstance(a, torch.Tensor) and is_fake(a) for a in args):  # traced (export): nothing to move
            return None
        device = _first_device(args)
        link = self.link_for(device) if device is not None and torch.is_grad_enabled() else None
        return _Session(link, device) if link is not None else None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_links"], state["_fixed_link"] = {}, None  # streams and events are not data
        state.pop("_disabled", None)
        return state

    def __deepcopy__(self, memo: dict) -> OffloadedSpan:
        import copy

        clone = OffloadedSpan(copy.deepcopy(self.body, memo), self.session_input)
        clone.train(self.training)
        return clone


@torch._dynamo.disable
def _close(session: _Session) -> None:
    session.close()


def _first_device(values: Sequence[Any]) -> torch.device | None:
    """The device of the first floating-point tensor among ``values`` (the activations)."""
    for value in values:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.device
    return None
