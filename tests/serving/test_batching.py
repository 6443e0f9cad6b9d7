"""The dynamic batcher on its own: batch formation, error isolation, cancellation, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest

from lungcad.serving.batching import (
    BatcherClosedError,
    BatchFailedError,
    DynamicBatcher,
    QueueFullError,
)

TEST_TIMEOUT_S = 5.0  # every test finishes far sooner; a hang fails instead of blocking CI


class RecordingModel:
    """Doubles each item; records batch contents; can be held, slowed or poisoned."""

    def __init__(self, delay_s: float = 0.0, poison: float | None = None) -> None:
        self.batches: list[list[float]] = []
        self.delay_s = delay_s
        self.poison = poison
        self.release = threading.Event()
        self.release.set()
        self.started = threading.Event()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.started.set()
        self.batches.append([float(v) for v in batch[:, 0]])
        assert self.release.wait(TEST_TIMEOUT_S)
        time.sleep(self.delay_s)
        if self.poison is not None and self.poison in batch:
            raise RuntimeError(f"cannot handle {self.poison}")
        return batch * 2


def run(test: Callable[[], Awaitable[Any]]) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(test(), TEST_TIMEOUT_S)

    return asyncio.run(bounded())


def item(value: float) -> np.ndarray:
    return np.array([value], dtype=np.float32)


def batcher(model: RecordingModel, **overrides: Any) -> DynamicBatcher:
    options: dict[str, Any] = {"max_batch_size": 4, "max_wait_s": 0.01, "max_queue": 100}
    return DynamicBatcher(model, **{**options, **overrides})


def test_full_batches_run_without_waiting_and_answers_go_to_their_requests() -> None:
    model = RecordingModel()

    async def scenario() -> tuple[list[np.ndarray], float]:
        async with batcher(model, max_batch_size=4, max_wait_s=10.0) as queue:
            start = time.perf_counter()
            results = await asyncio.gather(*(queue.submit(item(v)) for v in range(8)))
            return results, time.perf_counter() - start

    results, seconds = run(scenario)
    assert [float(r[0]) for r in results] == [2.0 * v for v in range(8)]
    assert model.batches == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert seconds < 2.0  # never waited for the 10 s deadline


def test_partial_batch_runs_once_the_oldest_request_waited_max_wait() -> None:
    model = RecordingModel()

    async def scenario() -> float:
        async with batcher(model, max_batch_size=64, max_wait_s=0.1) as queue:
            start = time.perf_counter()
            await asyncio.gather(*(queue.submit(item(v)) for v in range(3)))
            return time.perf_counter() - start

    seconds = run(scenario)
    assert model.batches == [[0, 1, 2]]
    assert 0.09 <= seconds < 2.0


def test_model_error_fails_only_its_batch_and_the_next_batch_succeeds() -> None:
    model = RecordingModel(poison=3.0)

    async def scenario() -> list[Any]:
        async with batcher(model, max_batch_size=2) as queue:
            first = await asyncio.gather(
                *(queue.submit(item(v)) for v in (1, 2, 3, 4)), return_exceptions=True
            )
            return [*first, await queue.submit(item(5))]

    results = run(scenario)
    assert [float(r[0]) for r in (results[0], results[1], results[4])] == [2.0, 4.0, 10.0]
    for failed in results[2:4]:
        assert isinstance(failed, BatchFailedError)
        assert "cannot handle 3.0" in str(failed)


def test_wrong_number_of_outputs_fails_the_batch() -> None:
    async def scenario() -> None:
        queue = DynamicBatcher(
            lambda batch: batch[:1], max_batch_size=2, max_wait_s=0.0, max_queue=4
        )
        async with queue:
            with pytest.raises(BatchFailedError, match="1 outputs for 2 inputs"):
                await asyncio.gather(queue.submit(item(1)), queue.submit(item(2)))

    run(scenario)


def test_cancelled_request_is_dropped_before_its_batch_runs() -> None:
    model = RecordingModel()
    model.release.clear()

    async def scenario() -> float:
        async with batcher(model, max_batch_size=1) as queue:
            running = asyncio.create_task(queue.submit(item(1)))
            while not model.started.is_set():
                await asyncio.sleep(0.005)
            with pytest.raises(TimeoutError):
                await queue.submit(item(2), timeout=0.05)
            waiting = asyncio.create_task(queue.submit(item(3)))
            await asyncio.sleep(0.01)
            waiting.cancel()
            model.release.set()
            await running
            return float((await queue.submit(item(4)))[0])

    assert run(scenario) == 8.0
    assert model.batches == [[1], [4]]


def test_full_queue_is_refused_at_once() -> None:
    model = RecordingModel()
    model.release.clear()

    async def scenario() -> None:
        async with batcher(model, max_batch_size=1, max_queue=2) as queue:
            tasks = [asyncio.create_task(queue.submit(item(1)))]
            while not model.started.is_set():
                await asyncio.sleep(0.005)
            tasks += [asyncio.create_task(queue.submit(item(v))) for v in (2, 3)]
            await asyncio.sleep(0.01)
            assert queue.queue_depth == 2
            with pytest.raises(QueueFullError, match="2 requests waiting"):
                await queue.submit(item(4))
            model.release.set()
            assert [float(r[0]) for r in await asyncio.gather(*tasks)] == [2.0, 4.0, 6.0]

    run(scenario)


def test_close_drains_queued_and_running_batches_then_refuses() -> None:
    model = RecordingModel(delay_s=0.05)

    async def scenario() -> None:
        queue = batcher(model, max_batch_size=2)
        queue.start()
        tasks = [asyncio.create_task(queue.submit(item(v))) for v in range(5)]
        await asyncio.sleep(0)
        await queue.close(timeout=3.0)
        assert [float(t.result()[0]) for t in tasks] == [0.0, 2.0, 4.0, 6.0, 8.0]
        with pytest.raises(BatcherClosedError):
            await queue.submit(item(9))

    run(scenario)


def test_close_with_a_stuck_model_fails_waiting_requests_instead_of_hanging() -> None:
    model = RecordingModel()
    model.release.clear()

    async def scenario() -> None:
        queue = batcher(model, max_batch_size=1)
        queue.start()
        tasks = [asyncio.create_task(queue.submit(item(v))) for v in range(3)]
        while not model.started.is_set():
            await asyncio.sleep(0.005)
        await queue.close(timeout=0.1)
        for task in tasks:
            with pytest.raises(BatcherClosedError):
                await task

    try:
        run(scenario)
    finally:
        model.release.set()


@pytest.mark.parametrize(
    "options",
    [{"max_batch_size": 0}, {"max_queue": 0}, {"max_wait_s": -1.0}],
)
def test_bad_limits_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="need max_batch_size"):
        batcher(RecordingModel(), **options)
