"""Admission: whether a job may join its task's queue, and how long its client waits for the answer.

A bounded queue alone admits more than the model can serve before the deadline when the hardware is slow
(measured: 256 queued at 25 jobs/s is a 10 s wait, so the admitted ended in 504s). So a job is refused at
the door (429, retry shortly) when the queue is full or when the wait foreseen from the measured
throughput passes half the deadline; an admitted job that is still not served when the deadline passes is
abandoned (504), and one whose client went away is dropped before its batch starts. The deadline runs from
the request's arrival, not from admission.

The same decision is taken twice: at the door (`enter`, called by `service.middleware.Shed` before the body
is read or parsed, so that refusing costs microseconds and leaves the event loop and the GIL to the admitted)
and at the queue (`admit`, after validation: the state may have changed meanwhile). The door also bounds the
requests of a task that are past it and not yet answered (`max_in_flight`): a burst is refused there, not
after parsing a body that could never be queued.

Plain Python over `asyncio` futures: no HTTP here, so each decision is tested directly
(`tests/test_admission.py`); `service.routes` turns the exceptions into status codes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Hashable
from typing import Any, Protocol

from service.batcher import QueueFull

RETRY_AFTER_S = 1  # seconds a refused client is told to wait: batches last milliseconds, queues drain fast


class Overloaded(Exception):
    """Refused at the door (the queue is full, or the foreseen wait is too long): answered 429."""

    retry_after_s = RETRY_AFTER_S


class DeadlinePassed(Exception):
    """Admitted but not served within the deadline: answered 504."""


class ClientGone(Exception):
    """The client disconnected before its answer was ready; its job was dropped if its batch had not started."""


class Queue(Protocol):
    """What admission needs of a queue (`service.batcher.Batcher` is one)."""

    @property
    def depth(self) -> int: ...

    running: int
    max_queue: int

    def submit(self, payload: Any, bucket: Hashable = 0) -> asyncio.Future: ...


class Throughput:
    """Jobs served per wall-clock second, per task (a moving average over batches), to foresee a job's wait.

    A batch's time runs from the previous batch's end when its jobs were already waiting then (the gap is the
    server's own overhead, or other tasks' batches on the shared worker), else from its oldest job's arrival
    (the server was idle): idle time must not make the server look slow.
    """

    def __init__(self) -> None:
        self.rate: dict[str, float] = {}
        self.last_end: dict[str, float] = {}

    def on_batch(self, task: str, size: int, seconds: float, waits: list[float], end: float | None = None) -> None:
        """The batcher's per-batch callback; `end` (a `perf_counter` time) defaults to now."""
        end = time.perf_counter() if end is None else end
        since = max(self.last_end.get(task, 0.0), end - seconds - max(waits, default=0.0))
        self.last_end[task] = end
        now = size / max(end - since, 1e-6)
        self.rate[task] = now if task not in self.rate else 0.8 * self.rate[task] + 0.2 * now

    def wait_s(self, task: str, jobs: int) -> float:
        """Seconds until `jobs` more jobs of `task` are served; 0 before any batch has been measured."""
        rate = self.rate.get(task)
        return jobs / rate if rate else 0.0


class Admission:
    """The admission policy of one server: a deadline per request, the throughput measured so far, and (when
    `max_in_flight` > 0) how many requests of a task may be past the door at once."""

    def __init__(self, deadline_s: float, throughput: Throughput | None = None, max_in_flight: int = 0) -> None:
        self.deadline_s = deadline_s
        self.throughput = throughput or Throughput()
        self.max_in_flight = max_in_flight
        self.in_flight: dict[str, int] = {}  # per task: past the door (`enter`), not yet answered (`leave`)

    def foreseen_s(self, task: str, queue: Queue, elapsed: float, ahead: int = 0) -> float:
        """When, counted from the request's arrival, a job joining `queue` now would be served; `ahead`: jobs
        known to be coming before it that the queue does not hold yet (requests past the door, being parsed)."""
        return elapsed + self.throughput.wait_s(task, max(queue.depth + queue.running, ahead))

    def would_shed(self, task: str, queue: Queue, elapsed: float = 0.0, ahead: int = 0) -> Overloaded | None:
        """Why a job of `task` would be refused now (full queue, or a foreseen wait over half the deadline), or
        None. Half the deadline leaves room for the estimate to be wrong (a rate is a moving average; a burst
        of slow jobs lands after it)."""
        if queue.depth >= queue.max_queue:
            return Overloaded(f"{task} queue is full ({queue.max_queue} waiting)")
        foreseen = self.foreseen_s(task, queue, elapsed, ahead)
        if foreseen > self.deadline_s / 2:
            return Overloaded(
                f"{task} would be served in about {foreseen:.1f} s, over half the {self.deadline_s:g} s deadline"
            )
        return None

    def enter(self, task: str, queue: Queue) -> Overloaded | None:
        """The door, before the request's body is read: why it is refused, or None, and then it counts as in
        flight until `leave`. Requests already past the door are counted as ahead of it in the queue."""
        inside = self.in_flight.get(task, 0)
        if self.max_in_flight and inside >= self.max_in_flight:
            return Overloaded(f"{task} has {inside} requests in flight, the limit")
        refused = self.would_shed(task, queue, 0.0, inside)
        if refused is None:
            self.in_flight[task] = inside + 1
        return refused

    def leave(self, task: str) -> None:
        """A request that passed the door has been answered (whatever the answer)."""
        self.in_flight[task] -= 1

    def admit(self, task: str, queue: Queue, job: Any, bucket: Hashable, elapsed: float) -> asyncio.Future:
        """Queue `job` and return its future, or raise `Overloaded`."""
        refused = self.would_shed(task, queue, elapsed)
        if refused is not None:
            raise refused
        try:
            return queue.submit(job, bucket)
        except QueueFull as exc:
            raise Overloaded(str(exc)) from None

    async def outcome(self, future: asyncio.Future, elapsed: float, gone: Awaitable[Any]) -> Any:
        """The job's result; raises `ClientGone` when `gone` completes first (the client disconnected) and
        `DeadlinePassed` when the deadline does. Either way the future is cancelled, which frees its queue
        slot if its batch has not started (a started batch runs to its end: a model call is not interruptible).
        """
        watcher = asyncio.ensure_future(gone)
        try:
            done, _ = await asyncio.wait(
                {future, watcher}, timeout=self.deadline_s - elapsed, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            watcher.cancel()
        if future in done:
            return future.result()
        future.cancel()
        if watcher in done:
            raise ClientGone()
        raise DeadlinePassed(f"not served within the {self.deadline_s} s deadline")
