"""``lungcad analyze`` end to end on tiny CTs with hand-wired models, and its user errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner, Result

from lungcad.cli import app as lungcad_app
from lungcad.cli import main
from lungcad.data.ct import write_metaimage
from lungcad.data.geometry import irc_to_xyz
from tests.analysis.conftest import SPHERE_CENTERS_IRC, TINY_GEOMETRY, tiny_hu

UID_A, UID_B = "1.2.3.4", "1.2.3.5"


def make_app() -> typer.Typer:
    """The real ``lungcad`` command, as a user calls it."""
    return lungcad_app


def analyze(*args: str | Path) -> Result:
    return CliRunner().invoke(make_app(), ["analyze", *(str(a) for a in args)])


@pytest.fixture
def luna_root(tmp_path: Path) -> Path:
    """Two scans; one annotated nodule on scan A's first sphere, one (missed) far away."""
    root = tmp_path / "luna"
    for uid in (UID_A, UID_B):
        (root / "subset0").mkdir(parents=True, exist_ok=True)
        write_metaimage(root / "subset0" / f"{uid}.mhd", tiny_hu(), TINY_GEOMETRY)
    x, y, z = irc_to_xyz(SPHERE_CENTERS_IRC[0], TINY_GEOMETRY)
    (root / "annotations.csv").write_text(
        "seriesuid,coordX,coordY,coordZ,diameter_mm\n"
        f"{UID_A},{x},{y},{z},5\n{UID_B},-100,-100,-100,5\n"
    )
    return root


def test_one_mhd_writes_every_output(tmp_path: Path, tiny_mhd: Path, model_dir: Path) -> None:
    out = tmp_path / "run"
    result = analyze(tiny_mhd, "--out", out, "--models", model_dir, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "analysed 1 scans" in result.output and "2 nodules, 0 malignant" in result.output
    names = {p.name for p in out.iterdir()}
    assert names == {f"{UID_A}.json", f"{UID_A}.html", "detections.csv", "index.html"}
    record = json.loads((out / f"{UID_A}.json").read_text())
    assert record["funnel"]["nodules"] == 2 and record["funnel"]["malignant"] == 0
    with (out / "detections.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["seriesuid"] for r in rows] == [UID_A, UID_A]


def test_explicit_paths_and_no_malignancy_model(
    tmp_path: Path, tiny_mhd: Path, model_dir: Path
) -> None:
    out = tmp_path / "run"
    result = analyze(
        tiny_mhd, "--out", out, "--seg", model_dir / "segmentation.pt",
        "--cls", model_dir / "classifier.pt", "--nodule-threshold", "0.999",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads((out / f"{UID_A}.json").read_text())
    assert record["nodules"] == [] and record["funnel"]["malignant"] is None
    assert set(record["models"]) == {"segmentation", "classifier"}


def test_luna_root_split_validates_against_annotations(
    tmp_path: Path, luna_root: Path, model_dir: Path
) -> None:
    out = tmp_path / "run"
    result = analyze(luna_root, "--split", "all", "--out", out, "--models", model_dir)
    assert result.exit_code == 0, result.output
    assert "total over 2 series" in result.output
    confusion = json.loads((out / "confusion.json").read_text())
    # Scan A: 1 nodule found benign + 1 false positive; scan B: 2 false positives, 1 miss.
    assert confusion["series"][UID_A] == [[0, 0, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert confusion["total"] == [[0, 0, 3, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    assert (out / "confusion.txt").is_file() and (out / f"{UID_B}.html").is_file()


@pytest.mark.parametrize(("selection", "expected"), [("--split=val", UID_A), ("--series", UID_B)])
def test_luna_root_selects_series(
    tmp_path: Path, luna_root: Path, model_dir: Path, selection: str, expected: str
) -> None:
    args = [selection] if "=" in selection else [selection, expected]
    out = tmp_path / "run"
    result = analyze(luna_root, *args, "--val-stride", "2", "--out", out, "--models", model_dir)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.json") if p.name != "confusion.json") == [
        f"{expected}.json"
    ]


def run_main(monkeypatch: pytest.MonkeyPatch, *args: str | Path) -> int:
    monkeypatch.setattr(sys, "argv", ["lungcad", "analyze", *(str(a) for a in args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return int(exit_info.value.code or 0)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing model", "missing.pt: no such checkpoint file"),
        ("unknown series", "no scan for series 9.9.9"),
        ("no input", "nowhere.mhd: input not found"),
        ("no models", "give --models DIR or --seg PATH"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(
    tmp_path: Path,
    luna_root: Path,
    tiny_mhd: Path,
    model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    case: str,
    message: str,
) -> None:
    out = tmp_path / "run"
    models: list[str | Path] = ["--models", model_dir]
    args: dict[str, list[str | Path]] = {
        "missing model": [tiny_mhd, "--out", out, *models, "--cls", tmp_path / "missing.pt"],
        "unknown series": [luna_root, "--series", "9.9.9", "--out", out, *models],
        "no input": [tmp_path / "nowhere.mhd", "--out", out, *models],
        "no models": [tiny_mhd, "--out", out],
    }
    assert run_main(monkeypatch, *args[case]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lungcad: error: ") and "\n" not in err
    assert message in err


@pytest.mark.slow
def test_torchrun_shards_scans_and_rank_0_merges(tmp_path: Path, model_dir: Path) -> None:
    root = tmp_path / "luna"
    uids = ["1.2.3.4", "1.2.3.5", "1.2.3.6"]
    (root / "subset0").mkdir(parents=True)
    for uid in uids:
        write_metaimage(root / "subset0" / f"{uid}.mhd", tiny_hu(), TINY_GEOMETRY)
    (root / "annotations.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n")
    out = tmp_path / "run"
    torchrun = Path(sys.executable).parent / "torchrun"
    completed = subprocess.run(
        [
            str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "lungcad", "analyze",
            str(root), "--split", "all", "--out", str(out), "--models", str(model_dir),
            "--device", "cpu",
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.count("analysed 3 scans") == 1  # only rank 0 reports
    with (out / "detections.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["seriesuid"] for r in rows) == sorted(uids * 2)
    assert sorted(p.stem for p in out.glob("*.html") if p.stem != "index") == uids
    assert set(json.loads((out / "confusion.json").read_text())["series"]) == set(uids)
