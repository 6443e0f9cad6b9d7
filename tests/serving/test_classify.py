"""``POST /v1/classify`` over real HTTP: encodings, bad input, batching, overload, errors."""

from __future__ import annotations

import asyncio
import io
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from lungcad.data.crops import clip_hu
from lungcad.models import load_model
from tests.serving.conftest import FakeRunner, fake_models, live_server, random_crops

NPY = {"content-type": "application/x-npy"}
RAW_F32 = {"x-shape": "32,48,48", "x-dtype": "float32"}


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def eager_probabilities(path: Path, crops: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return load_model(path)(torch.from_numpy(clip_hu(crops))[:, None])[1][:, 1].numpy()


def test_npy_and_raw_bodies_match_the_eager_models_after_clipping(
    models_dir: Path, make_app: Callable[..., Any], serve: Callable[..., str]
) -> None:
    crops = random_crops(2)
    base = serve(make_app(folder=models_dir))
    with httpx.Client(base_url=base, timeout=30) as client:
        answers = [
            client.post("/v1/classify", content=npy(crops[0]), headers=NPY),
            client.post("/v1/classify", content=crops[1].tobytes(), headers=RAW_F32),
            client.post(
                "/v1/classify",
                content=np.rint(crops[1]).astype("<i2").tobytes(),
                headers={**RAW_F32, "x-dtype": "int16"},
            ),
        ]
    assert [a.status_code for a in answers] == [200, 200, 200]
    bodies = [a.json() for a in answers]
    expected_nodule = eager_probabilities(models_dir / "classifier.pt", crops)
    expected_malignant = eager_probabilities(models_dir / "malignancy.pt", crops)
    assert bodies[0]["p_nodule"] == pytest.approx(expected_nodule[0], abs=1e-6)
    assert bodies[1]["p_nodule"] == pytest.approx(expected_nodule[1], abs=1e-6)
    assert bodies[1]["p_malignant"] == pytest.approx(expected_malignant[1], abs=1e-6)
    assert bodies[2]["p_nodule"] == pytest.approx(expected_nodule[1], abs=1e-3)


def test_p_malignant_is_null_without_a_malignancy_model(
    make_app: Callable[..., Any], serve: Callable[..., str]
) -> None:
    base = serve(make_app(fake_models(FakeRunner())))
    crop = np.full((32, 48, 48), 500.0, dtype=np.float32)
    answer = httpx.post(f"{base}/v1/classify", content=npy(crop), headers=NPY)
    assert answer.json() == {"p_nodule": pytest.approx(0.5), "p_malignant": None}


def crop_bytes(dtype: str = "<f4", shape: tuple[int, ...] = (32, 48, 48)) -> bytes:
    return npy(np.zeros(shape, dtype=dtype))


BAD_REQUESTS = [
    ("not an npy", b"hello", NPY, 400, "malformed .npy"),
    ("pickled object array", npy(np.array([{}], dtype=object)), NPY, 400, "malformed .npy"),
    ("wrong shape", crop_bytes(shape=(1, 32, 48, 48)), NPY, 400, "shape 1x32x48x48"),
    ("wrong dtype", crop_bytes(dtype="<i4"), NPY, 400, "dtype int32"),
    ("NaN", npy(np.full((32, 48, 48), np.nan, dtype="<f4")), NPY, 400, "NaN"),
    ("raw without headers", b"\0" * 294912, {}, 400, "X-Shape and X-Dtype"),
    ("raw bad dtype", b"\0" * 73728, {**RAW_F32, "x-dtype": "uint8"}, 400, "'uint8'"),
    ("raw bad shape header", b"\0" * 4, {**RAW_F32, "x-shape": "32;48"}, 400, "comma-separated"),
    ("raw short body", b"\0" * 1000, RAW_F32, 400, "needs 294912"),
    ("raw wrong shape", b"\0" * 4 * 32 * 48 * 48, {**RAW_F32, "x-shape": "48,48,32"}, 400, "shape"),
    ("too large", b"\0" * 500_000, RAW_F32, 413, "exceeds"),
]


@pytest.mark.parametrize(
    ("body", "headers", "status", "reason"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_input_is_refused_with_the_reason(
    body: bytes,
    headers: dict[str, str],
    status: int,
    reason: str,
    make_app: Callable[..., Any],
    serve: Callable[..., str],
) -> None:
    runner = FakeRunner()
    base = serve(make_app(fake_models(runner)))
    answer = httpx.post(f"{base}/v1/classify", content=body, headers=headers)
    assert answer.status_code == status
    assert reason in answer.json()["detail"]
    assert runner.seen == []


def test_body_without_length_is_refused_while_streaming(
    make_app: Callable[..., Any], serve: Callable[..., str]
) -> None:
    base = serve(make_app(fake_models(FakeRunner())))
    chunks = (b"\0" * 65536 for _ in range(10))  # chunked: no Content-Length to check first
    answer = httpx.post(f"{base}/v1/classify", content=chunks, headers=RAW_F32)
    assert answer.status_code == 413
    assert "exceeds the limit of 400000 bytes" in answer.json()["detail"]


async def post_many(base: str, crops: list[np.ndarray]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        return await asyncio.gather(
            *(client.post("/v1/classify", content=npy(crop), headers=NPY) for crop in crops)
        )


def test_concurrent_requests_are_batched(
    make_app: Callable[..., Any], serve: Callable[..., str]
) -> None:
    runner = FakeRunner(delay_s=0.2)
    base = serve(make_app(fake_models(runner), max_batch_size=8, max_wait_ms=50))
    crops = [np.full((32, 48, 48), 100.0 * i, dtype=np.float32) for i in range(8)]
    answers = asyncio.run(post_many(base, crops))
    assert [a.json()["p_nodule"] for a in answers] == pytest.approx([0.1 * i for i in range(8)])
    metrics = httpx.get(f"{base}/metrics").text
    assert "lungcad_batch_size_count 8" not in metrics  # fewer model calls than requests
    assert 'lungcad_requests_total{endpoint="/v1/classify",status="200"} 8' in metrics


def test_full_queue_answers_503_with_retry_after(
    make_app: Callable[..., Any], serve: Callable[..., str]
) -> None:
    runner = FakeRunner(delay_s=0.3)
    base = serve(make_app(fake_models(runner), max_batch_size=1, max_queue=1, retry_after_s=2))
    answers = asyncio.run(post_many(base, [np.zeros((32, 48, 48), np.float32)] * 6))
    statuses = sorted(a.status_code for a in answers)
    # How many get in depends on when the worker dequeues (machine load); every request is
    # answered, at least one served and at least one refused.
    assert statuses.count(200) >= 1 and statuses.count(503) >= 1
    assert set(statuses) == {200, 503}
    refused = next(a for a in answers if a.status_code == 503)
    assert refused.headers["retry-after"] == "2"
    assert "queue is full" in refused.json()["detail"]


def test_model_error_answers_500_for_its_batch_and_the_next_batch_succeeds(
    make_app: Callable[..., Any], serve: Callable[..., str]
) -> None:
    base = serve(make_app(fake_models(FakeRunner(poison=-999.0)), max_batch_size=1))
    poisoned = np.full((32, 48, 48), -999.0, dtype=np.float32)
    healthy = np.full((32, 48, 48), 250.0, dtype=np.float32)
    with httpx.Client(base_url=base, timeout=30) as client:
        failed = client.post("/v1/classify", content=npy(poisoned), headers=NPY)
        after = client.post("/v1/classify", content=npy(healthy), headers=NPY)
    assert failed.status_code == 500
    assert "poisoned input -999.0" in failed.json()["detail"]
    assert after.status_code == 200 and after.json()["p_nodule"] == pytest.approx(0.25)
    assert "lungcad_batches_failed_total 1" in httpx.get(f"{base}/metrics").text


def test_client_that_hangs_up_is_dropped_before_its_batch_runs(
    make_app: Callable[..., Any], serve: Callable[..., str]
) -> None:
    runner = FakeRunner(delay_s=0.5)
    base = serve(make_app(fake_models(runner), max_batch_size=1))
    port = int(base.rsplit(":", 1)[1])

    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            busy = asyncio.create_task(
                client.post(
                    "/v1/classify", content=npy(np.full((32, 48, 48), 1.0, np.float32)), headers=NPY
                )
            )
            await asyncio.sleep(0.2)  # the first crop is in the model now
            body = npy(np.full((32, 48, 48), 2.0, dtype=np.float32))
            head = (
                "POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            with socket.create_connection(("127.0.0.1", port)) as quitter:
                quitter.sendall(head + body)
                await asyncio.sleep(0.1)  # queued behind the first crop
            return await busy

    assert asyncio.run(scenario()).status_code == 200
    time.sleep(0.7)
    assert runner.seen == [1.0]
    assert 'endpoint="/v1/classify",status="499"} 1' in httpx.get(f"{base}/metrics").text


def test_shutdown_finishes_in_flight_requests(make_app: Callable[..., Any]) -> None:
    app = make_app(fake_models(FakeRunner(delay_s=0.5)), max_batch_size=1)
    crop = npy(np.full((32, 48, 48), 400.0, dtype=np.float32))
    answers: list[httpx.Response] = []
    with live_server(app) as base:
        client = threading.Thread(
            target=lambda: answers.append(
                httpx.post(f"{base}/v1/classify", content=crop, headers=NPY, timeout=30)
            )
        )
        client.start()
        time.sleep(0.2)  # in the model when the server is told to stop
    client.join(timeout=10)
    assert answers[0].status_code == 200
    assert answers[0].json()["p_nodule"] == pytest.approx(0.4)
