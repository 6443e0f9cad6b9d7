"""``lungcad evaluate`` on tiny tables, through a typer app holding only that command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from click.testing import Result
from typer.testing import CliRunner

from lungcad.cli import app as lungcad_app
from lungcad.errors import LungcadError

HEADER = "seriesuid,coordX,coordY,coordZ"
SUMMARY_KEYS = {"cpm", "sensitivity_at_fp", "nodules", "detected", "false_positives", "scans"}
POINT_KEYS = ["0.125", "0.25", "0.5", "1", "2", "4", "8"]


def make_app() -> typer.Typer:
    """The real ``lungcad`` command, as a user calls it."""
    return lungcad_app


@pytest.fixture
def tables(tmp_path: Path) -> dict[str, Path]:
    # Scans 1.1 and 1.2 listed, 1.9 not. Nodules: 1.1 at the origin (hit at 0.9) and 1.2 at
    # (10,10,10) (missed). FPs: 1.1 at 0.8 and 1.2 at 0.3 -> 2 FPs / 2 scans = 1 FP/scan at the
    # end; the excluded finding swallows the 0.7 mark; 1.9's mark is ignored. Sensitivity is
    # 1/2 from 0 FP/scan on, so CPM 0.5.
    files = {
        "annotations": f"{HEADER},diameter_mm\n1.1,0,0,0,6\n1.2,10,10,10,6\n",
        "excluded": f"{HEADER},diameter_mm\n1.1,40,0,0,-1\n",
        "seriesuids": "1.1\n1.2\n",
        "results": (
            f"{HEADER},probability\n1.1,0.5,0,0,0.9\n1.1,-30,0,0,0.8\n1.1,42,0,0,0.7\n"
            "1.2,-30,0,0,0.3\n1.9,0,0,0,0.99\n"
        ),
    }
    paths = {}
    for name, text in files.items():
        paths[name] = tmp_path / f"{name}.csv"
        paths[name].write_text(text)
    return paths


def run(tables: dict[str, Path], out: Path, *extra: str) -> Result:
    args = ["evaluate", "--out", str(out), *extra]
    for name, path in tables.items():
        args += [f"--{name}", str(path)]
    return CliRunner().invoke(make_app(), args)


def test_evaluate_writes_summary_curve_and_plot(tables: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = run(tables, out)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == SUMMARY_KEYS
    assert list(summary["sensitivity_at_fp"]) == POINT_KEYS
    assert summary["cpm"] == pytest.approx(0.5)
    assert (summary["nodules"], summary["detected"]) == (2, 1)
    assert (summary["false_positives"], summary["scans"]) == (2, 2)
    curve = (out / "froc.csv").read_text().splitlines()
    assert curve[0] == "fps_per_scan,sensitivity"
    assert [tuple(map(float, line.split(","))) for line in curve[1:]] == [
        (0.0, 0.0),
        (0.0, 0.5),
        (0.5, 0.5),
        (1.0, 0.5),
    ]
    assert (out / "froc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("*.tmp-*"))
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("CPM 0.5000: 1/2 nodules detected, 2 false positives over 2 scans")


def test_evaluate_bootstrap_adds_intervals(tables: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = run(tables, out, "--bootstrap", "50", "--seed", "7")
    assert result.exit_code == 0, result.output
    boot = json.loads((out / "summary.json").read_text())["bootstrap"]
    assert (boot["replicates"], boot["seed"], boot["confidence"]) == (50, 7, 0.95)
    assert list(boot["sensitivity_at_fp"]) == POINT_KEYS
    assert boot["cpm"]["low"] <= boot["cpm"]["mean"] <= boot["cpm"]["high"]
    assert "95% CI" in result.output


def test_evaluate_malformed_results_is_a_user_error(
    tables: dict[str, Path], tmp_path: Path
) -> None:
    tables["results"].write_text(f"{HEADER},probability\n1.1,0,0,zero,0.9\n")
    result = run(tables, tmp_path / "report")
    assert isinstance(result.exception, LungcadError)
    assert f"{tables['results']}:2: bad coordinates" in str(result.exception)
    assert not (tmp_path / "report").exists()
