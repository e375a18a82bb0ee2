"""The micro-batches a rank trains on: the DataLoader the spec describes, epoch after epoch, and a
prefetcher that has the next ones on the GPU before the step asks for them.

`LoaderFeed` is this rank's endless stream of collated host batches: a DataLoader over the dataset
with the spec's loader settings (`data.num_workers`, `pin_memory`, `prefetch_factor`,
`persistent_workers`) and a batch sampler that walks the balanced sampler's plan epoch after
epoch. The feed keeps its own epoch position: a feed that runs ahead of training (DataLoader
workers, the prefetcher) reaches the next epoch before the last step of this one is trained, and
the trained position (what a checkpoint saves) stays the sampler's, moved by the trainer's
`sampler.advance()`.

`BatchPrefetcher` keeps `data.prefetch_batches` micro-batches ready on the device: a feeding thread
takes host batches from the feed, counts them on the host (`inspect`) and copies their tensors to
the GPU on a side CUDA stream while the current step runs; the step's thread then only takes the
oldest ready batch (see its docstring for the stream rules that keep this safe).
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from janus_job.train.engine import to_device

JOIN_TIMEOUT_S = 120.0  # a feeding thread still inside a loader read after this is left behind (daemon)
_POLL_S = 0.1


class _EpochCursor:
    """The DataLoader's batch sampler: the sampler's plan of one epoch from a position; `next_epoch`
    moves it on when the feed has read the epoch to its end."""

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler
        self.epoch, self.first_step = sampler.epoch, sampler.step_in_epoch

    def __iter__(self) -> Iterator[list[int]]:
        return self.sampler.micro_batches(self.epoch, self.first_step)

    def __len__(self) -> int:
        return max(0, self.sampler.steps_per_epoch - self.first_step) * self.sampler.accumulation

    def next_epoch(self) -> None:
        self.epoch, self.first_step = self.epoch + 1, 0


class LoaderFeed:
    """This rank's collated host micro-batches, from the sampler's position, epoch after epoch.

    The first epoch's loader iterator (and with it the worker processes) is started here, in the
    caller's thread: workers are forked from the training thread, and the DataLoader installs its
    worker-failure handler only from the main thread. `close()` shuts the workers down.
    """

    def __init__(self, dataset: Any, sampler: Any, collator: Any, data: Any, device: Any) -> None:
        from torch.utils.data import DataLoader

        from janus_job.train.stop import own_process_group

        workers = data.num_workers
        self.cursor = _EpochCursor(sampler)
        self.loader = DataLoader(
            dataset,
            batch_sampler=self.cursor,
            collate_fn=collator,
            num_workers=workers,
            # page-locked host memory only where a GPU copies from it
            pin_memory=data.pin_memory and device.type == "cuda",
            prefetch_factor=data.prefetch_factor if workers else None,
            persistent_workers=data.persistent_workers and workers > 0,
            worker_init_fn=own_process_group,
        )
        self._iterator: Any = iter(self.loader)

    def __iter__(self) -> "LoaderFeed":
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            raise StopIteration
        while True:
            try:
                return next(self._iterator)
            except StopIteration:
                self.cursor.next_epoch()
                self._iterator = iter(self.loader)  # persistent workers are reused, others restarted

    def close(self) -> None:
        """Ends the loader's iterator: its worker processes are shut down and joined."""
        iterator, self._iterator = self._iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self.loader = None  # type: ignore[assignment]


class _Failed:
    """What the feeding thread hands over instead of a batch when reading one raised."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = object()


class BatchPrefetcher:
    """Device-ready micro-batches, up to `depth` of them read and copied ahead of the step.

    `next(prefetcher)` returns `(batch, info)`: the batch with its tensors on `device` (the keys
    `janus_job.train.engine.HOST_KEYS` stay on the host, as `micro_step` expects) and `inspect(host
    batch)` (None without `inspect`), computed on the host copy before it is sent, so host-side
    bookkeeping needs no device synchronisation.

    With `depth` >= 1 a feeding thread reads batches from `source` (a `LoaderFeed`: the DataLoader
    has already collated them in its workers and, with `data.pin_memory`, page-locked them), runs
    `inspect`, and issues the host-to-device copies on a side CUDA stream, recording an event after
    them; at most `depth` batches are read and not yet handed over. `next()` takes the oldest:

    - the host waits for that batch's copy event (a copy still running is data wait, and the
      caller's timer around `next()` counts it), then the current (compute) stream is ordered after
      the event, so no kernel reads a tensor before its copy has landed;
    - every device tensor of the batch is marked as used on the compute stream (`record_stream`):
      its memory was allocated on the side stream, and without the mark the caching allocator
      could hand it to the side stream's next copy while the step still reads it.

    `depth` 0: no thread; `next()` reads, inspects and copies in the caller's thread (the copy on
    the side stream and waited for in the same way). Without CUDA there are no streams and the
    tensors stay where they are; the thread, the queue and the hand-over work as on a GPU.

    An error raised while reading a batch (e.g. a JobError from a DataLoader worker) is raised by
    the `next()` that would have returned that batch. `close()` stops the thread and closes `source`.
    """

    def __init__(self, source: Iterator[dict], device: Any, depth: int,
                 inspect: Callable[[dict], Any] | None = None) -> None:
        import torch

        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self.source = source
        self.device = device
        self.depth = depth
        self.inspect = inspect
        self.cuda = device.type == "cuda" and torch.cuda.is_available()
        self.stream = torch.cuda.Stream(device=device) if self.cuda else None
        self._ready: queue.SimpleQueue = queue.SimpleQueue()
        self._slots = threading.Semaphore(depth)
        self._stop = threading.Event()
        self._done = False
        self._thread: threading.Thread | None = None
        if depth > 0:
            self._thread = threading.Thread(target=self._feed, name="janus-batch-prefetch", daemon=True)
            self._thread.start()

    # -- the feeding side ------------------------------------------------------------------------

    def _stage(self, host: dict) -> tuple[dict, Any, Any]:
        """(batch on the device, inspect's result, copy-done event or None)."""
        import torch

        info = self.inspect(host) if self.inspect is not None else None
        if self.stream is None:
            return host, info, None
        with torch.cuda.stream(self.stream):
            batch = to_device(host, self.device)
            event = torch.cuda.Event()
            event.record(self.stream)
        return batch, info, event

    def _feed(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.set_device(self.device)  # a new thread starts on device 0
        while not self._stop.is_set():
            if not self._slots.acquire(timeout=_POLL_S):
                continue
            if self._stop.is_set():
                return
            try:
                item: Any = self._stage(next(self.source))
            except StopIteration:
                self._ready.put(_END)
                return
            except BaseException as err:  # handed to the step's thread, which raises it
                self._ready.put(_Failed(err))
                return
            self._ready.put(item)

    # -- the step's side -------------------------------------------------------------------------

    def __iter__(self) -> "BatchPrefetcher":
        return self

    def __next__(self) -> tuple[dict, Any]:
        if self._done:
            raise StopIteration
        if self._thread is None:
            try:
                item: Any = self._stage(next(self.source))
            except BaseException:
                self._done = True  # as with the thread: the feed ends at its first error
                raise
        else:
            item = self._ready.get()
            if item is _END or isinstance(item, _Failed):
                self._done = True
                if item is _END:
                    raise StopIteration
                raise item.error
            self._slots.release()
        batch, info, event = item
        if event is not None:
            self._hand_over(batch, event)
        return batch, info

    def _hand_over(self, batch: dict, event: Any) -> None:
        import torch

        event.synchronize()
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(event)
        for value in batch.values():
            for tensor in value if isinstance(value, list) else [value]:
                if isinstance(tensor, torch.Tensor) and tensor.device.type == "cuda":
                    tensor.record_stream(compute)

    def close(self) -> None:
        """Stops the feeding thread (after the read it is in, if any) and closes the source."""
        self._stop.set()
        self._done = True
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(JOIN_TIMEOUT_S)
            if thread.is_alive():  # still blocked in the loader: closing the source under it would fail
                print(f"batch prefetch: the feeding thread is still reading after {JOIN_TIMEOUT_S:.0f}s; "
                      "leaving it to the process exit", file=sys.stderr, flush=True)
                return
        while not self._ready.empty():
            self._ready.get_nowait()  # batches read ahead and never trained
        close = getattr(self.source, "close", None)
        if close is not None:
            close()
