"""Prometheus text exposition: well-formed lines, cumulative buckets, live server counts."""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np

from lungcad.serving.metrics import CONTENT_TYPE, Histogram, Metrics
from tests.serving.conftest import FakeRunner, fake_models

SAMPLE = re.compile(
    r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?P<labels>[a-zA-Z_]\w*="(?:[^"\\]|\\.)*"'
    r'(?:,[a-zA-Z_]\w*="(?:[^"\\]|\\.)*")*)\})? (?P<value>-?[0-9.e+-]+|[+-]Inf|NaN)$'
)


def parse(text: str) -> dict[str, float]:
    """``{'name{labels}': value}`` after checking every line is a comment or a sample."""
    samples = {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# "):
            assert re.match(r"^# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* .+$", line), line
            continue
        match = SAMPLE.match(line)
        assert match, f"not a Prometheus sample: {line!r}"
        samples[line.rsplit(" ", 1)[0]] = float(match["value"])
    return samples


def test_histogram_buckets_are_cumulative_and_end_with_inf() -> None:
    histogram = Histogram((1, 4, 16))
    for value in (1, 2, 3, 20):
        histogram.observe(value)
    samples = parse("\n".join(histogram.lines("h", {"k": "v"})) + "\n")
    assert [samples[f'h_bucket{{k="v",le="{le}"}}'] for le in ("1", "4", "16", "+Inf")] == [
        1,
        3,
        3,
        4,
    ]
    assert samples['h_count{k="v"}'] == 4 and samples['h_sum{k="v"}'] == 26


def test_unknown_paths_share_one_label_and_values_are_escaped() -> None:
    metrics = Metrics(["/x"], queue_depth=lambda: 7)
    metrics.record_request("/x", 200, 0.01)
    metrics.record_request("/secret/../random", 404, 0.01)
    metrics.record_request("/another", 404, 0.01)
    samples = parse(metrics.render())
    assert samples['lungcad_requests_total{endpoint="other",status="404"}'] == 2
    assert samples["lungcad_queue_depth"] == 7
    histogram = Histogram((1,))
    assert 'a="q\\"\\\\\\n"' in histogram.lines("h", {"a": 'q"\\\n'})[0]


def test_live_metrics_count_requests_batches_and_latency(
    make_app: Callable[..., Any], serve: Callable[..., str]
) -> None:
    base = serve(make_app(fake_models(FakeRunner())))
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((32, 48, 48), np.float32))
    with httpx.Client(base_url=base) as client:
        for _ in range(3):
            client.post(
                "/v1/classify",
                content=buffer.getvalue(),
                headers={"content-type": "application/x-npy"},
            )
        client.post("/v1/classify", content=b"bad", headers={"content-type": "application/x-npy"})
        client.get("/health")
        answer = client.get("/metrics")
    assert answer.headers["content-type"] == CONTENT_TYPE
    samples = parse(answer.text)
    assert samples['lungcad_requests_total{endpoint="/v1/classify",status="200"}'] == 3
    assert samples['lungcad_requests_total{endpoint="/v1/classify",status="400"}'] == 1
    assert samples['lungcad_requests_total{endpoint="/health",status="200"}'] == 1
    assert samples["lungcad_batch_size_count"] == samples['lungcad_batch_size_bucket{le="+Inf"}']
    assert samples["lungcad_batch_size_sum"] == 3
    assert samples['lungcad_request_duration_seconds_count{endpoint="/v1/classify"}'] == 4
    assert samples["lungcad_queue_depth"] == 0
