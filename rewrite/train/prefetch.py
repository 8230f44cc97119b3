"""Batches made ahead of use: a background thread builds batch i+1, i+2, ... while the device trains on batch i,
and on CUDA copies them from pinned host memory on a side stream, so data loading never stalls a step.

1. The thread calls ``make(index)`` for ``start``, ``start + 1``, ... in order (``make`` must be a pure
   function of the index, as ``Batches.batch`` is) and puts at most ``depth`` finished batches in a queue;
   on CUDA each is pinned first (page-locked memory is what lets a host-to-device copy run asynchronously).
2. ``next()`` takes the next batch in order. On CUDA it is copied with ``non_blocking=True`` on a dedicated
   copy stream; the compute stream waits for that copy (an event, not a host synchronisation) and the
   tensor is marked as used by the compute stream, so its memory is not reused while a step still reads it.
   The copy of the following batch is issued at once when the thread has it ready, so it overlaps the step.
3. An exception raised by ``make`` is re-raised by the ``next()`` that would have returned that batch;
   ``close()`` stops the thread. The order never depends on timing: batch k is always ``make(start + k)``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import torch

_END = object()


class Prefetcher:
    """Yields ``make(start)``, ``make(start + 1)``, ... on ``device``, built ``depth`` batches ahead by a thread.
    Use as a context manager (or call ``close()``)."""

    def __init__(self, make: Callable[[int], torch.Tensor], start: int, device: torch.device | str = "cpu",
                 depth: int = 2) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth {depth} must be ≥ 1")
        self.make, self.position, self.device = make, start, torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._staged: tuple[torch.Tensor | BaseException, torch.cuda.Event | None] | None = None
        self._thread = threading.Thread(target=self._produce, args=(start,), name="effcompile-prefetch", daemon=True)
        self._thread.start()

    def _produce(self, index: int) -> None:
        while not self._stop.is_set():
            try:
                batch = self.make(index)
                if self.cuda:
                    batch = batch.pin_memory()
                item: object = (index, batch)
            except BaseException as error:  # handed to the consumer, which re-raises it in order
                item = (index, error)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item[1], BaseException):  # type: ignore[index]
                return
            index += 1

    def _stage(self, block: bool) -> None:
        """Start copying the next batch to the device (CUDA: on the copy stream); without ``block``, only if
        the thread has it ready. A failure of ``make`` is kept for the ``next()`` that reaches it."""
        try:
            index, host = self._queue.get(block=block)
        except queue.Empty:
            return
        if index != self.position:
            raise RuntimeError(f"prefetcher out of order: got batch {index}, expected {self.position}")  # a bug
        if isinstance(host, BaseException) or not self.cuda:
            self._staged = (host, None)
            return
        with torch.cuda.stream(self._stream):
            on_device = host.to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self._stream)
        self._staged = (on_device, ready)

    def next(self) -> torch.Tensor:
        """The next batch, on the device, in index order (raises what ``make`` raised for it)."""
        if self._staged is None:
            self._stage(block=True)
        batch, ready = self._staged  # type: ignore[misc]
        if isinstance(batch, BaseException):
            raise batch
        self._staged = None
        if ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(ready)
            batch.record_stream(current)
        self.position += 1
        self._stage(block=False)  # overlap the next copy with this step, if the thread is ahead
        return batch

    __call__ = next

    def close(self) -> None:
        """Stop the thread and drop the batches made ahead."""
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=5)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
