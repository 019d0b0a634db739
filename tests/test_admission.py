"""Admission decisions without a server: 429 at the door (full queue, foreseen wait over half the deadline,
too many requests in flight), 504 past the deadline, a client that leaves frees its slot; the throughput
estimate they rest on; and the batcher's model thread, which never waits for the event loop."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from service.admission import RETRY_AFTER_S, Admission, ClientGone, DeadlinePassed, Overloaded, Throughput
from service.batcher import Batcher, QueueFull, Worker


class FakeQueue:
    """A queue with a given depth; records what was submitted."""

    def __init__(self, depth: int = 0, running: int = 0, full: bool = False, max_queue: int = 256) -> None:
        self.depth, self.running, self.full, self.max_queue = depth, running, full, max_queue
        self.submitted: list[tuple[object, int]] = []

    def submit(self, payload: object, bucket: int = 0) -> asyncio.Future:
        if self.full:
            raise QueueFull("sequential queue is full (4 waiting)")
        self.submitted.append((payload, bucket))
        return asyncio.get_running_loop().create_future()


def measured(rate: float, task: str = "sequential") -> Throughput:
    """A throughput estimate that has seen `rate` jobs/s (one batch of `rate` jobs in 1 s, from idle)."""
    t = Throughput()
    t.on_batch(task, int(rate), 1.0, [0.0], end=100.0)
    return t


def run(coro):
    return asyncio.run(coro)


# Throughput ---------------------------------------------------------------------------------------------------


def test_no_measurement_foresees_no_wait():
    assert Throughput().wait_s("sequential", 1000) == 0.0


def test_rate_is_jobs_over_busy_time_and_idle_time_does_not_count():
    t = Throughput()
    t.on_batch("topn", 10, 0.5, [0.0], end=10.0)  # from idle: 10 jobs in 0.5 s
    assert t.rate["topn"] == pytest.approx(20.0)
    # an hour idle, then a batch whose oldest job waited 0.5 s: its time starts at that job's arrival
    t.on_batch("topn", 10, 0.5, [0.5, 0.1], end=3610.0)
    assert t.rate["topn"] == pytest.approx(0.8 * 20 + 0.2 * 10)
    assert t.wait_s("topn", 36) == pytest.approx(36 / 18)


def test_back_to_back_batches_count_the_gap_between_them():
    """Jobs already waiting when the previous batch ended: the gap (overhead, other tasks) is time spent."""
    t = Throughput()
    t.on_batch("sequential", 8, 1.0, [0.0], end=1.0)
    t.on_batch("sequential", 8, 1.0, [3.0], end=3.0)  # its jobs waited since before 1.0; batch ran 2.0-3.0
    assert t.rate["sequential"] == pytest.approx(0.8 * 8 + 0.2 * 4)


def test_tasks_are_measured_apart():
    t = measured(10.0, "explanation")
    assert t.wait_s("explanation", 5) == pytest.approx(0.5) and t.wait_s("sequential", 5) == 0.0


# Admission at the door --------------------------------------------------------------------------------------


def test_a_job_within_the_budget_is_queued():
    async def go():
        queue = FakeQueue(depth=3)
        future = Admission(10.0, measured(10.0)).admit("sequential", queue, "job", 2, elapsed=0.5)
        assert isinstance(future, asyncio.Future) and queue.submitted == [("job", 2)]

    run(go())


def test_a_full_queue_is_refused_with_retry_after():
    async def go():
        with pytest.raises(Overloaded, match="queue is full") as err:
            Admission(10.0).admit("sequential", FakeQueue(full=True), "job", 0, elapsed=0.0)
        assert err.value.retry_after_s == RETRY_AFTER_S == 1

    run(go())


@pytest.mark.parametrize(
    "depth,running,elapsed,admitted",
    [
        (45, 0, 0.0, True),  # 4.5 s foreseen at 10 jobs/s: under half of the 10 s deadline
        (45, 8, 0.0, False),  # the batch already running counts too: 5.3 s
        (60, 0, 0.0, False),  # 6 s foreseen: over half the deadline
        (40, 0, 1.5, False),  # 4 s of queue after 1.5 s spent before admission (parsing, the event loop)
        (0, 0, 5.5, False),  # an empty queue, but half the deadline is already gone
        (0, 0, 4.9, True),
    ],
)
def test_the_foreseen_wait_from_arrival_is_held_to_half_the_deadline(depth, running, elapsed, admitted):
    async def go():
        admission = Admission(10.0, measured(10.0))
        queue = FakeQueue(depth=depth, running=running)
        foreseen = admission.foreseen_s("sequential", queue, elapsed)
        assert foreseen == pytest.approx(elapsed + (depth + running) / 10.0)
        if admitted:
            admission.admit("sequential", queue, "job", 0, elapsed)
            assert queue.submitted
        else:
            with pytest.raises(Overloaded, match=r"would be served in about .* over half the 10 s deadline"):
                admission.admit("sequential", queue, "job", 0, elapsed)
            assert not queue.submitted

    run(go())


# The door: before the body is read ------------------------------------------------------------------------------


def test_the_door_refuses_a_full_queue_without_touching_it():
    queue = FakeQueue(depth=4, max_queue=4)
    refused = Admission(10.0).would_shed("sequential", queue)
    assert isinstance(refused, Overloaded) and "sequential queue is full (4 waiting)" in str(refused)
    assert refused.retry_after_s == RETRY_AFTER_S and not queue.submitted
    assert Admission(10.0).would_shed("sequential", FakeQueue(depth=3, max_queue=4)) is None


def test_the_door_and_the_queue_apply_the_same_wait_budget():
    admission, queue = Admission(10.0, measured(10.0)), FakeQueue(depth=60)
    refused = admission.would_shed("sequential", queue)
    assert refused is not None and "over half the 10 s deadline" in str(refused)
    assert admission.would_shed("sequential", FakeQueue(depth=40)) is None
    assert admission.would_shed("sequential", FakeQueue(depth=40), elapsed=1.5) is not None


def test_requests_past_the_door_count_as_in_flight_until_they_leave():
    admission = Admission(10.0, max_in_flight=2)
    queue = FakeQueue()
    assert admission.enter("topn", queue) is None and admission.enter("topn", queue) is None
    refused = admission.enter("topn", queue)
    assert isinstance(refused, Overloaded) and "topn has 2 requests in flight" in str(refused)
    assert admission.in_flight == {"topn": 2}  # a refused request is not counted
    assert admission.enter("sequential", queue) is None  # the limit is per task
    admission.leave("topn")
    assert admission.enter("topn", queue) is None and admission.in_flight == {"topn": 2, "sequential": 1}


def test_no_in_flight_limit_by_default():
    admission = Admission(10.0)
    assert all(admission.enter("topn", FakeQueue()) is None for _ in range(1000))


def test_requests_in_flight_are_ahead_in_the_foreseen_wait():
    """Requests past the door but not queued yet (being parsed) will be served first: the 51st request past the
    door foresees 50 ahead of it at 10 jobs/s, 5 s (admitted); the 52nd 5.1 s, over half the deadline."""
    admission, queue = Admission(10.0, measured(10.0)), FakeQueue()
    for _ in range(51):
        assert admission.enter("sequential", queue) is None
    refused = admission.enter("sequential", queue)
    assert refused is not None and "served in about 5.1 s, over half the 10 s deadline" in str(refused)
    assert admission.in_flight["sequential"] == 51


# Waiting for the answer -----------------------------------------------------------------------------------------


async def never() -> None:
    await asyncio.Event().wait()


def test_an_answer_before_the_deadline_is_returned():
    async def go():
        future = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.01, future.set_result, "ranked")
        assert await Admission(1.0).outcome(future, 0.0, never()) == "ranked"

    run(go())


def test_past_the_deadline_the_job_is_abandoned():
    async def go():
        future = asyncio.get_running_loop().create_future()
        with pytest.raises(DeadlinePassed, match="not served within the 0.05 s deadline"):
            await Admission(0.05).outcome(future, 0.0, never())
        assert future.cancelled()  # its queue slot is freed if its batch has not started

    run(go())


def test_the_deadline_counts_from_arrival():
    async def go():
        future = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.2, future.set_result, "late")
        with pytest.raises(DeadlinePassed):
            await Admission(1.0).outcome(future, 0.95, never())  # 0.95 s spent before admission

    run(go())


def test_a_client_that_leaves_cancels_its_job():
    async def go():
        future = asyncio.get_running_loop().create_future()
        with pytest.raises(ClientGone):
            await Admission(10.0).outcome(future, 0.0, asyncio.sleep(0.01))
        assert future.cancelled()

    run(go())


def test_with_a_real_batcher_a_refused_or_abandoned_job_never_reaches_the_model():
    seen: list[str] = []

    def model(jobs):
        seen.extend(jobs)
        return [j.upper() for j in jobs]

    async def go():
        batcher = Batcher("sequential", model, max_batch_size=4, max_wait_ms=200, max_queue=2)
        batcher.start()
        admission = Admission(10.0)
        left = admission.admit("sequential", batcher, "left", 0, 0.0)
        stayed = admission.admit("sequential", batcher, "stayed", 0, 0.0)
        assert admission.would_shed("sequential", batcher) is not None  # what the door sees, before any parsing
        with pytest.raises(Overloaded, match="queue is full"):
            admission.admit("sequential", batcher, "refused", 0, 0.0)
        with pytest.raises(ClientGone):
            await admission.outcome(left, 0.0, asyncio.sleep(0))
        assert await admission.outcome(stayed, 0.0, never()) == "STAYED"
        await batcher.close()

    run(go())
    assert seen == ["stayed"]


# The model thread ------------------------------------------------------------------------------------------------


def test_the_model_thread_takes_its_next_batch_without_the_event_loop():
    """Under a flood the event loop is busy; the model thread must go from one batch to the next anyway."""
    starts: list[float] = []

    def model(jobs):
        starts.append(time.perf_counter())
        time.sleep(0.05)
        return jobs

    async def go():
        batcher = Batcher("sequential", model, max_batch_size=4, max_wait_ms=1000, max_queue=16)
        batcher.start()
        futures = [batcher.submit(i) for i in range(8)]  # two full batches
        time.sleep(0.3)  # the event loop is blocked (parsing a flood of requests)
        assert len(starts) == 2 and starts[1] - starts[0] < 0.1, starts
        assert await asyncio.gather(*futures) == list(range(8))
        await batcher.close()

    run(go())


def test_a_job_cancelled_while_its_batch_waits_never_reaches_the_model():
    seen: list[list[int]] = []
    release = threading.Event()

    def model(jobs):
        seen.append(list(jobs))
        release.wait(5)
        return jobs

    async def go():
        batcher = Batcher("sequential", model, max_batch_size=2, max_wait_ms=0, max_queue=16)
        batcher.start()
        first = [batcher.submit(i) for i in (1, 2)]
        while not seen:
            await asyncio.sleep(0.01)
        second = [batcher.submit(i) for i in (3, 4)]
        second[0].cancel()  # its client left while the first batch ran
        release.set()
        assert await asyncio.gather(*first, second[1]) == [1, 2, 4]
        await batcher.close()

    run(go())
    assert seen == [[1, 2], [4]]


def test_tasks_sharing_the_model_thread_take_turns_oldest_first():
    order: list[str] = []

    def model(name):
        def run_batch(jobs):
            order.append(name)
            time.sleep(0.01)
            return jobs

        return run_batch

    async def go():
        worker = Worker()
        batchers = {n: Batcher(n, model(n), worker, max_batch_size=1, max_wait_ms=0) for n in ("a", "b")}
        for b in batchers.values():
            b.start()
        futures = []
        for i in range(3):
            futures += [batchers["a"].submit(i), batchers["b"].submit(i)]
        await asyncio.gather(*futures)
        await asyncio.gather(*(b.close() for b in batchers.values()))
        worker.stop()

    run(go())
    assert order == ["a", "b"] * 3  # submitted alternately: served in the order of arrival, not task by task


def test_close_finishes_every_admitted_job_and_a_model_error_reaches_each_job():
    def model(jobs):
        if "bad" in jobs:
            raise ValueError("model failed")
        return jobs

    async def go():
        batcher = Batcher("sequential", model, max_batch_size=2, max_wait_ms=50, max_queue=16)
        batcher.start()
        good = [batcher.submit(i) for i in ("a", "b", "c")]
        bad = [batcher.submit("bad", bucket=1), batcher.submit("x", bucket=1)]
        await batcher.close()  # returns once every queued job is answered
        assert all(f.done() for f in good + bad)
        assert [f.result() for f in good] == ["a", "b", "c"]
        assert all(isinstance(f.exception(), ValueError) for f in bad)
        with pytest.raises(QueueFull, match="shutting down"):
            batcher.submit("late")

    run(go())
