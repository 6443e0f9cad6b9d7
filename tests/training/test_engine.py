"""The shared training engine on a toy task: resume, Ctrl-C, best.pt, metrics, torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import lungcad
from lungcad.errors import LungcadError
from lungcad.models import load_checkpoint
from lungcad.training.engine import EngineOptions, train
from tests.training.engine_worker import SAMPLES, SCORES, ToyTask, weights_hash

REPO_ROOT = Path(__file__).resolve().parents[2]
BATCH = 4


def options(out: Path, epochs: int, resume: bool = False, seed: int = 0) -> EngineOptions:
    return EngineOptions(
        out_dir=out,
        epochs=epochs,
        batch_size=BATCH,
        seed=seed,
        resume=resume,
        tensorboard=False,
        command_line=("lungcad", "train", "toy"),
    )


def final_weights(out: Path) -> str:
    return weights_hash(load_checkpoint(out / "last.pt")["model_state"])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    train(ToyTask(), options(out, epochs=3))
    return out


def test_resume_at_an_epoch_boundary_ends_in_the_same_weights(
    uninterrupted: Path, tmp_path: Path
) -> None:
    train(ToyTask(), options(tmp_path, epochs=1))
    result = train(ToyTask(), options(tmp_path, epochs=3, resume=True))
    assert result.epochs_done == 3 and not result.interrupted
    assert result.samples_seen == 3 * SAMPLES
    assert final_weights(tmp_path) == final_weights(uninterrupted)


def test_ctrl_c_mid_epoch_writes_last_pt_and_resume_completes_identically(
    uninterrupted: Path, tmp_path: Path
) -> None:
    steps_per_epoch = SAMPLES // BATCH
    stop_after = steps_per_epoch + 5  # the 5th step of epoch 2
    interrupted = train(ToyTask(interrupt_after=stop_after), options(tmp_path, epochs=3))
    assert interrupted.interrupted and interrupted.epochs_done == 1
    checkpoint = load_checkpoint(tmp_path / "last.pt")
    assert checkpoint["epoch"] == 1 and checkpoint["extra"]["step_in_epoch"] == 5
    assert checkpoint["samples_seen"] == stop_after * BATCH
    resumed = train(ToyTask(), options(tmp_path, epochs=3, resume=True))
    assert resumed.epochs_done == 3 and resumed.samples_seen == 3 * SAMPLES
    assert final_weights(tmp_path) == final_weights(uninterrupted)
    # The resumed epoch's training metrics cover the steps before the interruption too.
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    reference = (uninterrupted / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["train/loss"] for x in lines] == pytest.approx(
        [json.loads(x)["train/loss"] for x in reference]
    )


def test_cosine_schedule_and_bf16_resume_mid_epoch_identically(tmp_path: Path) -> None:
    def cosine_bf16(out: Path, resume: bool = False) -> EngineOptions:
        return replace(
            options(out, epochs=3, resume=resume), lr_schedule="cosine", precision="bf16"
        )

    train(ToyTask(), cosine_bf16(tmp_path / "whole"))
    stop_after = SAMPLES // BATCH + 3
    train(ToyTask(interrupt_after=stop_after), cosine_bf16(tmp_path / "split"))
    train(ToyTask(), cosine_bf16(tmp_path / "split", resume=True))
    assert final_weights(tmp_path / "split") == final_weights(tmp_path / "whole")
    # The rate decayed from 0.1 to nearly 0 over the run; the last step's rate is kept.
    last_lr = load_checkpoint(tmp_path / "whole" / "last.pt")["optimizer_state"]["param_groups"]
    assert 0 < last_lr[0]["lr"] < 0.1 * 0.01


def test_another_seed_gives_other_weights(uninterrupted: Path, tmp_path: Path) -> None:
    train(ToyTask(), options(tmp_path, epochs=3, seed=1))
    assert final_weights(tmp_path) != final_weights(uninterrupted)


def test_best_pt_is_the_epoch_with_the_best_metric(uninterrupted: Path) -> None:
    best = load_checkpoint(uninterrupted / "best.pt")
    assert best["epoch"] == max(SCORES, key=lambda e: SCORES[e] if e <= 3 else -1) == 2
    assert best["metrics"]["val/score"] == SCORES[2]
    assert load_checkpoint(uninterrupted / "last.pt")["epoch"] == 3


def test_metrics_jsonl_has_one_line_per_epoch(uninterrupted: Path) -> None:
    lines = [json.loads(x) for x in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2, 3]
    assert [line["samples_seen"] for line in lines] == [SAMPLES, 2 * SAMPLES, 3 * SAMPLES]
    assert [line["val/score"] for line in lines] == [SCORES[1], SCORES[2], SCORES[3]]
    assert all({"seconds", "train/loss", "val/loss", "train/score"} <= set(x) for x in lines)
    assert lines[0]["seconds"] <= lines[1]["seconds"] <= lines[2]["seconds"]


def test_checkpoint_holds_what_rebuilds_and_resumes_the_run(uninterrupted: Path) -> None:
    checkpoint = load_checkpoint(uninterrupted / "last.pt")
    assert checkpoint["model_kind"] == "classifier"
    assert checkpoint["model_config"] == {"kind": "classifier"}
    assert checkpoint["epoch"] == 3 and checkpoint["samples_seen"] == 3 * SAMPLES
    assert checkpoint["command_line"] == ["lungcad", "train", "toy"]
    assert checkpoint["lungcad_version"] == lungcad.__version__
    assert checkpoint["data_fingerprint"] == ToyTask().data_fingerprint()
    assert checkpoint["optimizer_name"] == "SGD"
    momentum = checkpoint["optimizer_state"]["state"][0]["momentum_buffer"]
    assert isinstance(momentum, torch.Tensor) and momentum.abs().sum() > 0
    assert checkpoint["extra"]["step_in_epoch"] == 0 and checkpoint["extra"]["seed"] == 0


def test_resume_refuses_other_data_and_a_missing_checkpoint(
    uninterrupted: Path, tmp_path: Path
) -> None:
    with pytest.raises(LungcadError, match="nothing to resume"):
        train(ToyTask(), options(tmp_path, epochs=1, resume=True))

    class OtherData(ToyTask):
        def data_fingerprint(self) -> str:
            return "0" * 64

    with pytest.raises(LungcadError, match="trained on other data"):
        train(OtherData(), options(uninterrupted, epochs=4, resume=True))


@pytest.mark.slow
def test_torchrun_two_processes_end_with_identical_weights(tmp_path: Path) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    worker = Path(__file__).with_name("engine_worker.py")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    odd = SAMPLES + 1  # 25 + 24 samples: the engine drops one so both ranks take 6 steps
    completed = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc-per-node",
            "2",
            str(worker),
            str(tmp_path),
            str(odd),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    hashes = [(tmp_path / f"rank{rank}.sha256").read_text() for rank in (0, 1)]
    assert hashes[0] == hashes[1]
    # Rank 0 wrote the run: both epochs in metrics.jsonl, each sample counted once per epoch.
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["samples_seen"] for line in lines] == [SAMPLES, 2 * SAMPLES]
    assert weights_hash(load_checkpoint(tmp_path / "run" / "last.pt")["model_state"]) == hashes[0]
