"""``POST /v1/analyze`` over real HTTP: every upload form, the same JSON as the pipeline,
a responsive server during analysis, and hostile or oversized uploads refused."""

from __future__ import annotations

import io
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import SimpleITK as sitk

from lungcad.analysis.pipeline import analyze_ct
from lungcad.data.ct import read_ct
from tests.serving.conftest import (
    SPHERE_CENTRES_IRC,
    FakeRunner,
    analysis_models,
    fake_models,
    synthetic_ct_image,
)

RUN_DEPENDENT = ("timings_s", "source")


@pytest.fixture(scope="module")
def ct_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The synthetic CT as .nrrd, .nii.gz and .mhd + .raw."""
    folder = tmp_path_factory.mktemp("ct")
    image = synthetic_ct_image()
    paths = {suffix: folder / f"phantom{suffix}" for suffix in (".nrrd", ".nii.gz", ".mhd")}
    for path in paths.values():
        sitk.WriteImage(image, str(path), useCompression=path.suffix != ".mhd")
    paths[".raw"] = folder / "phantom.raw"
    return paths


@pytest.fixture
def analysis_app(tmp_path: Path, make_app: Callable[..., Any]) -> Any:
    return make_app(analysis_models(tmp_path / "models"))


def expected_json(models_folder_app: Any, path: Path) -> dict[str, Any]:
    bundle = models_folder_app.state.serving.models.analysis
    body = analyze_ct(read_ct(path), bundle).to_json()
    return {k: v for k, v in body.items() if k not in RUN_DEPENDENT}


def without_run_fields(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in (*RUN_DEPENDENT, "thumbnails")}


def test_raw_nrrd_body_gives_the_pipelines_json_with_thumbnails(
    analysis_app: Any, serve: Callable[..., str], ct_files: dict[str, Path]
) -> None:
    base = serve(analysis_app)
    answer = httpx.post(
        f"{base}/v1/analyze?thumbnails=true",
        content=ct_files[".nrrd"].read_bytes(),
        headers={"x-filename": "phantom.nrrd"},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert without_run_fields(body) == expected_json(analysis_app, ct_files[".nrrd"])
    assert body["source"] == "phantom.nrrd"
    assert sorted(tuple(n["center_irc"]) for n in body["nodules"]) == sorted(SPHERE_CENTRES_IRC)
    assert len(body["thumbnails"]) == 2
    assert all(t.startswith("iVBORw0KGgo") for t in body["thumbnails"])  # PNG signature


def test_unnamed_gzip_body_is_sniffed_and_multipart_pairs_work(
    analysis_app: Any, serve: Callable[..., str], ct_files: dict[str, Path]
) -> None:
    base = serve(analysis_app)
    expected = expected_json(analysis_app, ct_files[".nrrd"])
    with httpx.Client(base_url=base, timeout=60) as client:
        nifti = client.post("/v1/analyze", content=ct_files[".nii.gz"].read_bytes())
        pair = client.post(
            "/v1/analyze",
            files=[
                ("file", ("scan.mhd", ct_files[".mhd"].read_bytes())),
                ("file", ("whatever.raw", ct_files[".raw"].read_bytes())),
            ],
        )
    for answer in (nifti, pair):
        assert answer.status_code == 200, answer.text
        body = without_run_fields(answer.json())
        assert body["nodules"] == expected["nodules"]
        assert body["shape_irc"] == expected["shape_irc"]
    assert pair.json()["series_uid"] == "scan"


def write_dicom_series(image: sitk.Image, folder: Path) -> list[Path]:
    """One CT DICOM file per axial slice, with the position tags GDCM sorts by."""
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125.1"
    paths = []
    for index in range(image.GetDepth()):
        slice_image = image[:, :, index]
        position = image.TransformIndexToPhysicalPoint((0, 0, index))
        tags = {
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.2",
            "0020|000e": series_uid,
            "0008|0018": f"{series_uid}.{index + 1}",
            "0020|0013": str(index + 1),
            "0020|0032": "\\".join(f"{v:.3f}" for v in position),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0018|0050": f"{image.GetSpacing()[2]:.3f}",
        }
        for tag, value in tags.items():
            slice_image.SetMetaData(tag, value)
        paths.append(folder / f"IM{index:04d}.dcm")
        writer.SetFileName(str(paths[-1]))
        writer.Execute(slice_image)
    return paths


def test_zipped_dicom_series_is_analysed(
    analysis_app: Any, serve: Callable[..., str], ct_files: dict[str, Path], tmp_path: Path
) -> None:
    slices = write_dicom_series(synthetic_ct_image(), tmp_path / "dicom")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in slices:
            zipped.write(path, f"study/series/{path.name}")
    answer = httpx.post(
        f"{serve(analysis_app)}/v1/analyze",
        content=archive.getvalue(),
        headers={"x-filename": "study.zip"},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["series_uid"] == "1.2.826.0.1.3680043.2.1125.1"
    assert body["nodules"] == expected_json(analysis_app, ct_files[".nrrd"])["nodules"]


def zip_bytes(entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zipped:
        for info, data in entries:
            zipped.writestr(info, data)
    return buffer.getvalue()


def symlink_entry() -> zipfile.ZipInfo:
    info = zipfile.ZipInfo("link")
    info.external_attr = 0o120777 << 16
    return info


HOSTILE_ZIPS = [
    ("parent traversal", zip_bytes([("ok/../../evil.txt", b"x")]), 400, "outside the archive"),
    ("absolute path", zip_bytes([("/tmp/evil.txt", b"x")]), 400, "outside the archive"),
    ("windows drive", zip_bytes([("C:\\evil.txt", b"x")]), 400, "outside the archive"),
    ("symbolic link", zip_bytes([(symlink_entry(), b"/etc/passwd")]), 400, "symbolic link"),
    ("too many entries", zip_bytes([(f"f{i}", b"") for i in range(30)]), 413, "30 entries"),
    ("zip bomb", zip_bytes([("zeros.dcm", b"\0" * 3_000_000)]), 413, "unpacks to 3000000"),
    ("not a zip", b"PK\x03\x04 truncated", 400, "not a readable zip"),
]


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [case[1:] for case in HOSTILE_ZIPS],
    ids=[case[0] for case in HOSTILE_ZIPS],
)
def test_hostile_zips_are_refused(
    body: bytes,
    status: int,
    reason: str,
    tmp_path: Path,
    make_app: Callable[..., Any],
    serve: Callable[..., str],
) -> None:
    app = make_app(
        analysis_models(tmp_path / "models"), zip_max_entries=20, zip_max_unpacked_bytes=1_000_000
    )
    answer = httpx.post(f"{serve(app)}/v1/analyze", content=body, headers={"x-filename": "a.zip"})
    assert answer.status_code == status
    assert reason in answer.json()["detail"]


@pytest.mark.parametrize(
    ("body", "name", "reason"),
    [
        (b"just some text", "notes.txt", "unrecognised CT format"),
        (b"NRRD0004\ngarbage", "scan.nrrd", "cannot read as a CT volume"),
    ],
)
def test_unreadable_ct_is_a_400(
    body: bytes, name: str, reason: str, analysis_app: Any, serve: Callable[..., str]
) -> None:
    answer = httpx.post(
        f"{serve(analysis_app)}/v1/analyze", content=body, headers={"x-filename": name}
    )
    assert answer.status_code == 400
    assert reason in answer.json()["detail"]


def test_upload_over_the_limit_is_413(
    tmp_path: Path, make_app: Callable[..., Any], serve: Callable[..., str]
) -> None:
    app = make_app(analysis_models(tmp_path / "models"), analyze_max_bytes=1000)
    answer = httpx.post(f"{serve(app)}/v1/analyze", content=b"\0" * 5000)
    assert answer.status_code == 413


def test_without_a_segmentation_model_analyze_is_503(
    make_app: Callable[..., Any], serve: Callable[..., str]
) -> None:
    answer = httpx.post(f"{serve(make_app(fake_models(FakeRunner())))}/v1/analyze", content=b"x")
    assert answer.status_code == 503
    assert "no segmentation.pt" in answer.json()["detail"]


def test_health_answers_while_an_analysis_runs(
    tmp_path: Path,
    make_app: Callable[..., Any],
    serve: Callable[..., str],
    ct_files: dict[str, Path],
) -> None:
    base = serve(make_app(analysis_models(tmp_path / "models", delay_s=1.5)))
    answers: list[httpx.Response] = []
    upload = threading.Thread(
        target=lambda: answers.append(
            httpx.post(f"{base}/v1/analyze", content=ct_files[".nrrd"].read_bytes(), timeout=60)
        )
    )
    upload.start()
    time.sleep(0.3)
    start = time.perf_counter()
    health = httpx.get(f"{base}/health", timeout=5)
    health_seconds = time.perf_counter() - start
    still_running = upload.is_alive()
    upload.join(timeout=60)
    assert health.status_code == 200 and health.json()["analyze_available"]
    assert still_running and health_seconds < 0.5
    assert answers[0].status_code == 200
