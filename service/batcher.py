"""Dynamic batching that knows nothing of T5 or HTTP: jobs queue, a batch closes at `max_batch_size` or
`max_wait_ms`, and jobs of similar size (their `bucket`) travel together.

Back-pressure: the queue is bounded and `submit` raises `QueueFull` at once when it is full. A job whose
future was cancelled (its client went away, or its deadline passed) before its batch started is dropped
and never reaches the model.

Batches run in a model thread (`Worker`), which one or several batchers share: batches of different tasks
then take turns (the oldest waiting job first) instead of fighting over the cores. The worker takes its next
batch itself, as soon as the previous one ends, and hands the results to the event loop; it never waits for
the event loop in between. (It did when the event loop formed the batches: under a flood of requests the
loop is busy, and the model thread sat idle 90% of the time with a full queue; RELIABILITY.md.)
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("pod.service")


class QueueFull(Exception):
    pass


@dataclass
class Job:
    payload: Any
    bucket: Hashable  # jobs with equal buckets may share a batch
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class Worker:
    """The model thread: runs the batches of its batchers one at a time, oldest waiting job first."""

    def __init__(self, name: str = "pod-model-batches") -> None:
        self.name = name
        self.cond = threading.Condition()  # guards every batcher's queue; notified on each submit
        self.batchers: list[Batcher] = []
        self.thread: threading.Thread | None = None
        self.stopping = False

    def start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self.thread.start()

    def stop(self) -> None:
        """Stop once the batch running now has ended (close the batchers first to finish their jobs)."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join()

    def _next(self) -> tuple[Batcher, list[Job]] | None:
        """The next batch to run, waiting for one; None when stopping."""
        with self.cond:
            while not self.stopping:
                now = time.perf_counter()
                ready: list[tuple[float, Batcher]] = []
                sleep: float | None = None
                for b in self.batchers:
                    oldest = b._oldest()
                    if oldest is None:
                        continue
                    left = b._left_s(oldest, now)
                    if left <= 0:
                        ready.append((oldest.enqueued, b))
                    else:
                        sleep = left if sleep is None else min(sleep, left)
                if ready:
                    batcher = min(ready, key=lambda r: r[0])[1]
                    return batcher, batcher._take()
                self.cond.wait(sleep)
        return None

    def _run(self) -> None:
        while (picked := self._next()) is not None:
            try:
                picked[0]._run(picked[1])
            except Exception:  # e.g. the event loop closed: the thread every request waits on must go on
                log.exception("batch hand-over failed", extra={"fields": {"task": picked[0].name}})


class Batcher:
    def __init__(
        self,
        name: str,
        run_batch: Callable[[Sequence[Any]], Sequence[Any]],
        worker: Worker | None = None,
        max_batch_size: int = 16,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
        on_batch: Callable[[str, int, float, list[float]], None] | None = None,
        on_depth: Callable[[str, int], None] | None = None,
        on_formed: Callable[[str, list[Any]], None] | None = None,
    ) -> None:
        """`worker`: the model thread to share (None: one of its own, started and stopped with the batcher).
        The callbacks run in the model thread: `on_batch(name, jobs, model seconds, each job's wait)` after a
        batch, `on_depth(name, queued)`, `on_formed(name, payloads)` when a batch closes."""
        self.name = name
        self.run_batch = run_batch
        self.own_worker = worker is None
        self.worker = worker or Worker(f"{name}-batches")
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.on_batch = on_batch or (lambda *a: None)
        self.on_depth = on_depth or (lambda *a: None)
        self.on_formed = on_formed
        self.pending: list[Job] = []  # changed under `worker.cond` only
        self.running = 0  # jobs in the batch the model thread is running (written by that thread only)
        self.taken = 0  # jobs taken by the model thread whose results the event loop has not received
        self.closed = False
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        with self.worker.cond:
            self.worker.batchers.append(self)
        self.worker.start()

    def submit(self, payload: Any, bucket: Hashable = 0) -> asyncio.Future:
        """Queue a job; its future resolves to the job's result. Raises QueueFull when the queue is full."""
        with self.worker.cond:
            self.pending = [j for j in self.pending if not j.future.done()]
            if self.closed:
                raise QueueFull("shutting down")
            if len(self.pending) >= self.max_queue:
                raise QueueFull(f"{self.name} queue is full ({self.max_queue} waiting)")
            future = asyncio.get_running_loop().create_future()
            self.pending.append(Job(payload, bucket, future))
            depth = len(self.pending)
            self.worker.cond.notify()
        self.on_depth(self.name, depth)
        return future

    @property
    def depth(self) -> int:
        return sum(not j.future.done() for j in self.pending)

    # In the model thread, under `worker.cond` ------------------------------------------------------------------

    def _oldest(self) -> Job | None:
        self.pending = [j for j in self.pending if not j.future.done()]
        return self.pending[0] if self.pending else None

    def _left_s(self, oldest: Job, now: float) -> float:
        """Seconds until a batch may close: 0 when the oldest job's bucket fills a batch, when it has waited
        `max_wait`, or when the batcher is closing (finish what was admitted)."""
        if self.closed or sum(j.bucket == oldest.bucket for j in self.pending) >= self.max_batch_size:
            return 0.0
        return self.max_wait - (now - oldest.enqueued)

    def _take(self) -> list[Job]:
        """The oldest live job's bucket, up to max_batch_size jobs of it, oldest first."""
        bucket = self.pending[0].bucket
        batch = [j for j in self.pending if j.bucket == bucket][: self.max_batch_size]
        taken = {id(j) for j in batch}
        self.pending = [j for j in self.pending if id(j) not in taken]
        self.running = len(batch)
        self.taken += len(batch)
        return batch

    # In the model thread ---------------------------------------------------------------------------------------

    def _run(self, batch: list[Job]) -> None:
        """Run a batch and hand its results to the event loop. A job cancelled since the batch closed is left
        out; a model error goes to every job of the batch; a failing callback is logged, nothing more."""
        self._hook(self.on_depth, self.name, len(self.pending))
        if self.on_formed is not None:
            self._hook(self.on_formed, self.name, [j.payload for j in batch])
        live = [j for j in batch if not j.future.done()]
        self.running = len(live)
        results: Sequence[Any] = []
        error: Exception | None = None
        started = time.perf_counter()
        if live:
            try:
                results = self.run_batch([j.payload for j in live])
            except Exception as exc:  # the model failed: every job of the batch gets the error
                error = exc
        seconds = time.perf_counter() - started
        self.running = 0
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self._deliver, live, results, error, len(batch))
        if live:
            self._hook(self.on_batch, self.name, len(live), seconds, [started - j.enqueued for j in live])

    def _hook(self, hook: Callable[..., None], *args: Any) -> None:
        try:
            hook(*args)
        except Exception:
            log.exception("batcher callback failed", extra={"fields": {"task": self.name}})

    # In the event loop -----------------------------------------------------------------------------------------

    def _deliver(self, jobs: list[Job], results: Sequence[Any], error: Exception | None, taken: int) -> None:
        for i, j in enumerate(jobs):
            if not j.future.done():
                if error is not None:
                    j.future.set_exception(error)
                else:
                    j.future.set_result(results[i])
        with self.worker.cond:
            self.taken -= taken

    async def close(self) -> None:
        """Finish every queued and running job, then stop (the worker too, when it is the batcher's own)."""
        with self.worker.cond:
            self.closed = True
            self.worker.cond.notify_all()
        if self.loop is not None:
            while True:
                with self.worker.cond:
                    if not self.taken and not self._oldest():
                        break
                await asyncio.sleep(0.01)
        if self.own_worker:
            await asyncio.get_running_loop().run_in_executor(None, self.worker.stop)
