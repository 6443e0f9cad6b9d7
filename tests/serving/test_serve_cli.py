"""``lungcad serve``: refusals before starting, and a real server process end to end."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from lungcad.cli import app as lungcad_app
from lungcad.errors import LungcadError


def make_app() -> typer.Typer:
    """The real ``lungcad`` command, as a user calls it."""
    return lungcad_app


def test_folder_without_classifier_is_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(make_app(), ["serve", "--models", str(tmp_path)])
    assert isinstance(result.exception, LungcadError)
    assert "no classifier.pt" in str(result.exception)


def test_bad_option_is_refused(models_dir: Path) -> None:
    result = CliRunner().invoke(
        make_app(), ["serve", "--models", str(models_dir), "--max-batch-size", "0"]
    )
    assert isinstance(result.exception, LungcadError)
    assert "max_batch_size" in str(result.exception)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_two_worker_processes_serve_and_stop_cleanly_on_sigterm(models_dir: Path) -> None:
    port = free_port()
    command = [sys.executable, "-m", "lungcad", "serve", "--models", str(models_dir)]
    command += ["--port", str(port), "--workers", "2"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, server.stdout.read() if server.stdout else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.5)
        buffer = io.BytesIO()
        np.save(buffer, np.zeros((32, 48, 48), np.float32))
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/classify",
            content=buffer.getvalue(),
            headers={"content-type": "application/x-npy"},
            timeout=30,
        )
        assert answer.status_code == 200
        assert answer.json()["p_malignant"] is not None
    finally:
        os.kill(server.pid, signal.SIGTERM)
        output = server.communicate(timeout=60)[0]
    assert server.returncode == 0, output
    assert output.count("Application startup complete") == 2
