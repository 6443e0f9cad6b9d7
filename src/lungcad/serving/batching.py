"""Dynamic batching: many concurrent single-item requests, few batched model calls.

Requests wait in a bounded queue. A batch runs when ``max_batch_size`` requests wait or
the oldest has waited ``max_wait_s``; the model runs on one worker thread so the event
loop stays free, and while it runs the next batch fills up. A model error fails only the
requests of its batch; a cancelled request (timeout, client gone) is dropped before its
batch runs; ``close`` lets queued and running batches finish, then fails what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

Predict = Callable[[np.ndarray], np.ndarray]
"""(N, *item_shape) -> (N, ...): one output row per input item, in order."""


class QueueFullError(Exception):
    """The queue already holds ``max_queue`` requests; the caller should retry later."""


class BatcherClosedError(Exception):
    """The batcher is shutting down (or its worker died) and takes no more requests."""


class BatchFailedError(Exception):
    """The model raised on the batch this request was in; the message says why."""


@dataclass
class _Request:
    item: np.ndarray
    future: asyncio.Future[np.ndarray]
    enqueued_at: float


class DynamicBatcher:
    """Collects ``submit``ted items into batches for ``predict``; use inside a running loop.

    ``on_batch(size, failed)`` is told about every model call (for metrics).
    """

    def __init__(
        self,
        predict: Predict,
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        on_batch: Callable[[int, bool], None] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError(
                f"need max_batch_size >= 1, max_queue >= 1, max_wait_s >= 0; got "
                f"{max_batch_size}, {max_queue}, {max_wait_s}"
            )
        self.predict = predict
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.on_batch = on_batch or (lambda size, failed: None)
        self._pending: deque[_Request] = deque()
        self._arrived = asyncio.Event()
        self._closing = False
        self._collector: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lungcad-batch")

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch (not counting the batch now running)."""
        return len(self._pending)

    def start(self) -> None:
        if self._collector is None:
            self._collector = asyncio.get_running_loop().create_task(self._collect())

    async def __aenter__(self) -> DynamicBatcher:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def submit(self, item: np.ndarray, timeout: float | None = None) -> np.ndarray:
        """The model's output row for ``item``.

        Raises ``QueueFullError`` at once when the queue is full, ``BatcherClosedError``
        when shutting down, ``BatchFailedError`` when the model raised on its batch and
        ``TimeoutError`` after ``timeout`` seconds (the request is then dropped).
        """
        if self._closing or self._collector is None or self._collector.done():
            raise BatcherClosedError("the inference queue is not running (server shutting down?)")
        if len(self._pending) >= self.max_queue:
            raise QueueFullError(f"inference queue is full ({self.max_queue} requests waiting)")
        loop = asyncio.get_running_loop()
        request = _Request(item, loop.create_future(), loop.time())
        self._pending.append(request)
        self._arrived.set()
        # Cancelling this coroutine (timeout, disconnect) cancels the future, which the
        # collector then skips.
        return await asyncio.wait_for(request.future, timeout)

    async def close(self, timeout: float | None = None) -> None:
        """Stop taking requests; finish queued and running batches within ``timeout`` s."""
        self._closing = True
        self._arrived.set()
        if self._collector is not None and not self._collector.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._collector), timeout)
            except TimeoutError:
                log.warning("inference queue did not drain in %s s; failing the rest", timeout)
                self._collector.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._collector
        self._fail(list(self._pending), BatcherClosedError, "server shut down before this ran")
        self._pending.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _collect(self) -> None:
        while True:
            batch = await self._next_batch()
            if batch is None:
                return
            try:
                await self._run(batch)
            except asyncio.CancelledError:
                self._fail(batch, BatcherClosedError, "server shut down while this ran")
                raise
            except Exception as exc:  # a bug here must not kill the queue for everyone
                log.exception("inference batch failed outside the model")
                self._fail(batch, BatchFailedError, f"batch failed: {exc}")

    async def _next_batch(self) -> list[_Request] | None:
        """Wait until a batch is due; ``None`` once closing and nothing is left."""
        loop = asyncio.get_running_loop()
        while not self._pending:
            if self._closing:
                return None
            self._arrived.clear()
            await self._arrived.wait()
        deadline = self._pending[0].enqueued_at + self.max_wait_s
        while len(self._pending) < self.max_batch_size and not self._closing:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)
        count = min(self.max_batch_size, len(self._pending))
        return [self._pending.popleft() for _ in range(count)]

    async def _run(self, batch: list[_Request]) -> None:
        live = [request for request in batch if not request.future.done()]
        if not live:
            return
        stacked = np.stack([request.item for request in live])
        loop = asyncio.get_running_loop()
        try:
            outputs = await loop.run_in_executor(self._executor, self.predict, stacked)
            if len(outputs) != len(live):
                raise ValueError(f"model gave {len(outputs)} outputs for {len(live)} inputs")
        except Exception as exc:
            log.warning("model failed on a batch of %d: %s", len(live), exc)
            self.on_batch(len(live), True)
            self._fail(live, BatchFailedError, f"model failed on this batch: {exc}")
            return
        self.on_batch(len(live), False)
        for request, output in zip(live, outputs, strict=True):
            if not request.future.done():
                request.future.set_result(output)

    @staticmethod
    def _fail(requests: list[_Request], error: type[Exception], message: str) -> None:
        for request in requests:
            if not request.future.done():
                request.future.set_exception(error(message))
