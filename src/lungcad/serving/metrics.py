"""Server metrics in the Prometheus text exposition format (0.0.4), written by hand.

Requests by endpoint and status, queue depth, batch sizes and request latency. Counters
are updated on the event loop and from the batch worker, so each update takes a lock.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
CLIENT_CLOSED_REQUEST = 499  # nginx's code for "client went away before the answer"


class Histogram:
    """Cumulative-bucket histogram: counts of observations <= each upper bound."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # the last slot is +Inf only
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    def lines(self, name: str, labels: dict[str, str]) -> list[str]:
        out, running = [], 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            running += count
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            out.append(f"{name}_bucket{_labels({**labels, 'le': le})} {running}")
        out.append(f"{name}_sum{_labels(labels)} {self.total:.6g}")
        out.append(f"{name}_count{_labels(labels)} {running}")
        return out


class Metrics:
    """Everything ``GET /metrics`` reports; ``queue_depth`` is read at render time."""

    def __init__(self, endpoints: Iterable[str], queue_depth: Callable[[], int] = lambda: 0):
        self.endpoints = frozenset(endpoints)
        self.queue_depth = queue_depth
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, int]] = Counter()
        self._latency: dict[str, Histogram] = {}
        self._batch_sizes = Histogram(BATCH_SIZE_BUCKETS)
        self._batches_failed = 0

    def endpoint_label(self, path: str) -> str:
        """Known paths name themselves; anything else is "other" (bounded label values)."""
        return path if path in self.endpoints else "other"

    def record_request(self, path: str, status: int, seconds: float) -> None:
        endpoint = self.endpoint_label(path)
        with self._lock:
            self._requests[endpoint, status] += 1
            self._latency.setdefault(endpoint, Histogram(LATENCY_BUCKETS_S)).observe(seconds)

    def record_batch(self, size: int, failed: bool) -> None:
        with self._lock:
            self._batch_sizes.observe(size)
            self._batches_failed += int(failed)

    def render(self) -> str:
        with self._lock:
            lines = _header("lungcad_requests_total", "counter", "HTTP requests by status.")
            for (endpoint, status), count in sorted(self._requests.items()):
                labels = {"endpoint": endpoint, "status": str(status)}
                lines.append(f"lungcad_requests_total{_labels(labels)} {count}")
            lines += _header("lungcad_queue_depth", "gauge", "Crops waiting to be batched.")
            lines.append(f"lungcad_queue_depth {self.queue_depth()}")
            lines += _header("lungcad_batch_size", "histogram", "Crops per model call.")
            lines += self._batch_sizes.lines("lungcad_batch_size", {})
            lines += _header("lungcad_batches_failed_total", "counter", "Model calls that raised.")
            lines.append(f"lungcad_batches_failed_total {self._batches_failed}")
            name = "lungcad_request_duration_seconds"
            lines += _header(name, "histogram", "Time from request to response, by endpoint.")
            for endpoint, histogram in sorted(self._latency.items()):
                lines += histogram.lines(name, {"endpoint": endpoint})
        return "\n".join(lines) + "\n"


class MetricsMiddleware:
    """ASGI middleware timing every HTTP request and counting it by its response status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = CLIENT_CLOSED_REQUEST

        async def send_and_note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        except Exception:
            status = 500
            raise
        finally:
            self.metrics.record_request(scope["path"], status, time.perf_counter() - start)


def _header(name: str, kind: str, help_text: str) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_escape(value)}"' for key, value in labels.items()) + "}"


def _escape(value: str) -> str:
    """Label values escape backslash, double quote and newline."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
