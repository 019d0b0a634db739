"""Dynamic batching that knows nothing of T5 or HTTP: jobs queue, a batch closes at `max_batch_size` or
`max_wait_ms`, and jobs of similar size (their `bucket`) travel together.

Back-pressure: the queue is bounded and `submit` raises `QueueFull` at once when it is full. A job whose
future was cancelled (its client went away, or its deadline passed) before its batch started is dropped
and never reaches the model. Batches run in a worker thread so the event loop keeps accepting requests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    pass


@dataclass
class Job:
    payload: Any
    bucket: Hashable  # jobs with equal buckets may share a batch
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(
        self,
        name: str,
        run_batch: Callable[[Sequence[Any]], Sequence[Any]],
        executor: Executor,
        max_batch_size: int = 16,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
        on_batch: Callable[[str, int, float, list[float]], None] | None = None,
        on_depth: Callable[[str, int], None] | None = None,
        on_formed: Callable[[str, list[Any]], None] | None = None,
    ) -> None:
        self.name = name
        self.run_batch = run_batch
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.on_batch = on_batch or (lambda *a: None)
        self.on_depth = on_depth or (lambda *a: None)
        self.on_formed = on_formed  # (name, payloads) when a batch closes, before it waits for the executor
        self.pending: list[Job] = []
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.running = 0  # jobs inside a batch that has started
        self.closed = False

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.name}")

    def submit(self, payload: Any, bucket: Hashable = 0) -> asyncio.Future:
        """Queue a job; its future resolves to the job's result. Raises QueueFull when the queue is full."""
        self.pending = [j for j in self.pending if not j.future.done()]
        if self.closed:
            raise QueueFull("shutting down")
        if len(self.pending) >= self.max_queue:
            raise QueueFull(f"{self.name} queue is full ({self.max_queue} waiting)")
        future = asyncio.get_running_loop().create_future()
        self.pending.append(Job(payload, bucket, future))
        self.on_depth(self.name, len(self.pending))
        self.wakeup.set()
        return future

    @property
    def depth(self) -> int:
        return sum(not j.future.done() for j in self.pending)

    def _take(self) -> list[Job]:
        """The oldest live job's bucket, up to max_batch_size jobs of it, oldest first."""
        self.pending = [j for j in self.pending if not j.future.done()]
        if not self.pending:
            return []
        bucket = self.pending[0].bucket
        batch = [j for j in self.pending if j.bucket == bucket][: self.max_batch_size]
        taken = {id(j) for j in batch}
        self.pending = [j for j in self.pending if id(j) not in taken]
        self.on_depth(self.name, len(self.pending))
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.pending:
                if self.closed:
                    return
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            oldest = self.pending[0].enqueued
            full = sum(j.bucket == self.pending[0].bucket for j in self.pending) >= self.max_batch_size
            wait = self.max_wait - (time.perf_counter() - oldest)
            if not full and wait > 0 and not self.closed:
                self.wakeup.clear()
                try:
                    await asyncio.wait_for(self.wakeup.wait(), timeout=wait)
                except asyncio.TimeoutError:
                    pass
                continue
            batch = self._take()
            if not batch:
                continue
            if self.on_formed is not None:
                self.on_formed(self.name, [j.payload for j in batch])
            started = time.perf_counter()
            waits = [started - j.enqueued for j in batch]
            self.running = len(batch)
            try:
                results = await loop.run_in_executor(self.executor, self.run_batch, [j.payload for j in batch])
            except Exception as exc:  # the model failed: every job of the batch gets the error
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(exc)
            else:
                for j, r in zip(batch, results):
                    if not j.future.done():
                        j.future.set_result(r)
            finally:
                self.running = 0
            self.on_batch(self.name, len(batch), time.perf_counter() - started, waits)

    async def close(self) -> None:
        """Finish every queued and running job, then stop."""
        self.closed = True
        self.wakeup.set()
        if self.task is not None:
            await self.task
