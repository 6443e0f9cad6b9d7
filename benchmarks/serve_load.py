"""Load test of ``lungcad serve``: dynamic batching on vs off, then an overload run.

Starts the server on 127.0.0.1 (free port, subprocess) with the book's trained classifier,
sends bounded numbers of /v1/classify requests at concurrency 1, 8, 32 and 64 with
batching on (``--max-batch-size 64``) and off (``--max-batch-size 1``), and prints
throughput and p50/p99 latency side by side. Then it overloads a server with a small
queue: every request must get an answer (200 or 503 + Retry-After) within the timeout,
and the server must still be healthy afterwards. Exits 1 if any check fails.

    python benchmarks/serve_load.py [--checkpoint PATH] [--scale 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LUNGCAD_SHARED", REPO.parent / "shared"))
BOOK_CLASSIFIER = SHARED / "models/dlwpt/cls_2020-02-06_14.16.55_final-nodule-nonnodule.best.state"
VAL_EXAMPLE = SHARED / "models/dlwpt/cls_val_example.pt"
REQUESTS_AT = {1: 12, 8: 48, 32: 96, 64: 128}  # bounded request count per concurrency
REQUEST_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Run:
    concurrency: int
    seconds: float
    latencies_s: list[float]
    statuses: Counter[str]

    @property
    def throughput(self) -> float:
        return self.statuses["200"] / self.seconds

    def percentile_ms(self, q: float) -> float:
        return (
            float(np.percentile(self.latencies_s, q)) * 1000 if self.latencies_s else float("nan")
        )


def crop_body() -> bytes:
    """A real validation crop as .npy when the shared data exists, else random HU."""
    if VAL_EXAMPLE.exists():
        import torch

        crop = torch.load(VAL_EXAMPLE, map_location="cpu", weights_only=True)[0][0].numpy()
    else:
        crop = np.random.default_rng(0).uniform(-1000, 1000, (32, 48, 48)).astype(np.float32)
    buffer = io.BytesIO()
    np.save(buffer, crop)
    return buffer.getvalue()


class Server:
    """``lungcad serve`` in a subprocess on a free loopback port."""

    def __init__(self, models: Path, *options: str) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "lungcad", "serve", "--models", str(models)]
        command += ["--port", str(self.port), *options]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.process.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.3)
        raise RuntimeError("server did not start within 120 s")

    def __exit__(self, *exc_info: object) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


async def drive(url: str, body: bytes, concurrency: int, requests: int) -> Run:
    """``requests`` POSTs from ``concurrency`` workers; every one is answered or times out."""
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    remaining = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"content-type": "application/x-npy"}
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=REQUEST_TIMEOUT_S) as client:

        async def worker() -> None:
            for _ in remaining:
                start = time.perf_counter()
                try:
                    answer = await client.post("/v1/classify", content=body, headers=headers)
                except httpx.TimeoutException:
                    statuses["timeout"] += 1
                    continue
                except httpx.TransportError as exc:
                    statuses[type(exc).__name__] += 1
                    continue
                statuses[str(answer.status_code)] += 1
                if answer.status_code == 200:
                    latencies.append(time.perf_counter() - start)
                elif answer.status_code == 503 and "retry-after" not in answer.headers:
                    statuses["503 without Retry-After"] += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Run(concurrency, time.perf_counter() - start, latencies, statuses)


def measure(models: Path, body: bytes, scale: float, *options: str) -> dict[int, Run]:
    with Server(models, *options) as server:
        asyncio.run(drive(server.url, body, 4, 8))  # warm-up: first calls are slower
        return {
            c: asyncio.run(drive(server.url, body, c, max(c, round(n * scale))))
            for c, n in REQUESTS_AT.items()
        }


def mean_batch_size(url: str) -> float:
    samples = dict(
        line.rsplit(" ", 1)
        for line in httpx.get(f"{url}/metrics").text.splitlines()
        if line[:1] != "#"
    )
    return float(samples["lungcad_batch_size_sum"]) / max(
        float(samples["lungcad_batch_size_count"]), 1
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=BOOK_CLASSIFIER)
    parser.add_argument("--scale", type=float, default=1.0, help="Multiply the request counts.")
    args = parser.parse_args()
    if not args.checkpoint.is_file():
        print(f"no classifier checkpoint at {args.checkpoint} (set --checkpoint)", file=sys.stderr)
        return 2
    body = crop_body()
    with tempfile.TemporaryDirectory(prefix="lungcad-load-") as folder:
        models = Path(folder)
        (models / "classifier.pt").symlink_to(args.checkpoint.resolve())
        started = time.perf_counter()
        on = measure(models, body, args.scale, "--max-batch-size", "64", "--max-wait-ms", "5")
        off = measure(models, body, args.scale, "--max-batch-size", "1")
        print(f"cores: {os.cpu_count()}, classifier: {args.checkpoint.name}")
        print(
            f"{'conc':>4} {'requests':>8} | {'batched req/s':>13} {'p50 ms':>8} {'p99 ms':>8} | "
            f"{'unbatched req/s':>15} {'p50 ms':>8} {'p99 ms':>8} | {'speed-up':>8}"
        )
        for c in REQUESTS_AT:
            a, b = on[c], off[c]
            print(
                f"{c:>4} {len(a.latencies_s):>8} | {a.throughput:>13.1f} {a.percentile_ms(50):>8.0f} "
                f"{a.percentile_ms(99):>8.0f} | {b.throughput:>15.1f} {b.percentile_ms(50):>8.0f} "
                f"{b.percentile_ms(99):>8.0f} | {a.throughput / b.throughput:>7.1f}x"
            )
        failures = [
            f"{label} c={c}: {dict(r.statuses)}"
            for label, runs in (("on", on), ("off", off))
            for c, r in runs.items()
            if set(r.statuses) != {"200"}
        ]
        at32 = (
            on[32].throughput / off[32].throughput,
            on[32].percentile_ms(99),
            off[32].percentile_ms(99),
        )
        print(
            f"at concurrency 32: {at32[0]:.1f}x throughput, p99 {at32[1]:.0f} ms vs {at32[2]:.0f} ms "
            f"({'meets' if at32[0] >= 4 and at32[1] <= at32[2] else 'MISSES'} >= 4x and p99 no worse)"
        )

        # Overload: far more concurrent requests than the queue holds.
        with Server(models, "--max-batch-size", "16", "--max-queue", "16") as server:
            total = round(400 * max(args.scale, 0.25))
            run = asyncio.run(drive(server.url, body, 200, total))
            healthy = httpx.get(f"{server.url}/health", timeout=10).status_code == 200
            print(
                f"overload: {total} requests at concurrency 200, queue 16 -> {dict(run.statuses)} "
                f"in {run.seconds:.1f} s; mean batch {mean_batch_size(server.url):.1f}; "
                f"healthy afterwards: {healthy}"
            )
        answered = run.statuses["200"] + run.statuses["503"]
        if answered != total or not run.statuses["503"] or not healthy:
            failures.append(f"overload: {dict(run.statuses)}, healthy {healthy}")
        print(f"total {time.perf_counter() - started:.0f} s")
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
