import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from lungcad.cli import app
from lungcad.data.ct import read_ct, write_metaimage
from lungcad.data.geometry import Geometry, xyz_to_irc
from lungcad.errors import LungcadError
from tests.conftest import shared_file

FLIPPED = Geometry((-100.0, 50.0, 200.0), (0.7, 0.7, 1.25), (1, 0, 0, 0, 1, 0, 0, 0, -1))


def _volume(shape: tuple[int, int, int] = (6, 10, 12)) -> np.ndarray:
    return (np.arange(np.prod(shape)) % 3000 - 1000).astype(np.int16).reshape(shape)


def test_metaimage_round_trip_keeps_hu_order_and_geometry(tmp_path: Path) -> None:
    hu = _volume()
    write_metaimage(tmp_path / "1.2.3.mhd", hu, FLIPPED)
    volume = read_ct(tmp_path / "1.2.3.mhd")
    assert volume.series_uid == "1.2.3"
    assert volume.hu.dtype == np.int16
    np.testing.assert_array_equal(volume.hu, hu)
    assert volume.geometry == FLIPPED


def test_real_dicom_series_reads_as_chest_ct() -> None:
    volume = read_ct(shared_file("data/ct/chest-ct-141-dicom"))
    assert volume.shape_irc == (141, 512, 512)
    np.testing.assert_allclose(volume.geometry.spacing_xyz, (0.977, 0.977, 2.0), atol=1e-3)
    assert volume.series_uid.startswith("1.2.")
    # Lung parenchyma: the densest mode of the air-filled region inside the body.
    lung = volume.hu[40:100, 150:350, 100:220]
    lung_voxels = lung[(lung > -950) & (lung < -600)]
    assert -900 < np.median(lung_voxels) < -800
    # Slices are ordered by position: z increases by the spacing from one index to the next.
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in volume.source.iterdir()]
    z_positions = sorted(float(h.ImagePositionPatient[2]) for h in headers)
    assert volume.geometry.origin_xyz[2] == pytest.approx(z_positions[0], abs=1e-3)
    assert volume.geometry.direction[8] == 1.0
    # Rescale applied: stored values are unsigned-offset, HU air sits near -1000.
    assert volume.hu.min() == int(headers[0].RescaleIntercept) == -1024


def test_ct64_reads_identically_from_nrrd_and_dicom() -> None:
    nrrd = read_ct(shared_file("data/ct/ct-64/ct-64.nrrd"))
    dicom = read_ct(shared_file("data/ct/ct-64/dicom"))
    assert nrrd.shape_irc == dicom.shape_irc == (79, 64, 64)
    np.testing.assert_array_equal(nrrd.hu, dicom.hu)
    np.testing.assert_allclose(nrrd.geometry.origin_xyz, dicom.geometry.origin_xyz, atol=1e-3)
    np.testing.assert_allclose(nrrd.geometry.spacing_xyz, dicom.geometry.spacing_xyz, atol=1e-4)


def test_lung2_image_and_tumour_mask_align() -> None:
    image = read_ct(shared_file("data/ct/lung2/lung2_image.nrrd"))
    mask = read_ct(shared_file("data/ct/lung2/lung2_label.nrrd"))
    assert image.shape_irc == mask.shape_irc == (61, 512, 512)
    assert image.geometry == mask.geometry
    tumour = image.hu[mask.hu > 0]
    assert tumour.size > 1000
    assert np.median(tumour) > -300, "the tumour is soft tissue, not lung air"
    slices = np.flatnonzero(mask.hu.any(axis=(1, 2)))
    assert 9 <= len(slices) <= 13


def test_nifti_reads(tmp_path: Path) -> None:
    import SimpleITK as sitk

    hu = _volume()
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((0.8, 0.8, 2.0))
    sitk.WriteImage(image, str(tmp_path / "scan.nii.gz"))
    volume = read_ct(tmp_path / "scan.nii.gz")
    assert volume.series_uid == "scan"
    np.testing.assert_array_equal(volume.hu, hu)


def test_float_volumes_are_rounded_to_int16_hu(tmp_path: Path) -> None:
    import SimpleITK as sitk

    sitk.WriteImage(
        sitk.GetImageFromArray(np.full((3, 4, 5), -850.6, np.float32)), str(tmp_path / "f.nrrd")
    )
    assert read_ct(tmp_path / "f.nrrd").hu.dtype == np.int16
    assert int(read_ct(tmp_path / "f.nrrd").hu[0, 0, 0]) == -851


def test_missing_raw_is_named(tmp_path: Path) -> None:
    write_metaimage(tmp_path / "a.mhd", _volume(), FLIPPED)
    (tmp_path / "a.raw").unlink()
    with pytest.raises(LungcadError, match=r"a\.mhd: data file a\.raw is missing"):
        read_ct(tmp_path / "a.mhd")


def test_truncated_raw_reports_sizes(tmp_path: Path) -> None:
    write_metaimage(tmp_path / "a.mhd", _volume(), FLIPPED)
    raw = tmp_path / "a.raw"
    raw.write_bytes(raw.read_bytes()[:100])
    with pytest.raises(LungcadError, match=r"a\.raw: header says 12x10x6 MET_SHORT .*truncated"):
        read_ct(tmp_path / "a.mhd")


def test_header_without_required_fields(tmp_path: Path) -> None:
    (tmp_path / "bad.mhd").write_text("ObjectType = Image\nNDims = 3\n")
    with pytest.raises(LungcadError, match="not a MetaImage header"):
        read_ct(tmp_path / "bad.mhd")


def test_dicom_folder_without_ct(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not dicom")
    with pytest.raises(LungcadError, match="no CT series found"):
        read_ct(tmp_path)


def test_dicom_folder_with_only_non_ct_series(tmp_path: Path) -> None:
    source = shared_file("data/ct/ct-64/dicom")
    for path in sorted(source.iterdir())[:3]:
        dataset = pydicom.dcmread(path)
        dataset.Modality = "MR"
        dataset.save_as(tmp_path / path.name)
    with pytest.raises(LungcadError, match="1 non-CT series"):
        read_ct(tmp_path)


def test_dicom_picks_series_with_most_slices(tmp_path: Path) -> None:
    source = shared_file("data/ct/ct-64/dicom")
    files = sorted(source.iterdir())
    for path in files:
        shutil.copy(path, tmp_path / path.name)
    for path in files[:5]:
        dataset = pydicom.dcmread(path)
        dataset.SeriesInstanceUID = "1.2.3.4.5"
        dataset.save_as(tmp_path / f"other-{path.name}")
    assert read_ct(tmp_path).shape_irc == (79, 64, 64)


def test_cli_info_json_keys(tmp_path: Path) -> None:
    write_metaimage(tmp_path / "1.2.840.9.mhd", _volume(), FLIPPED)
    result = CliRunner().invoke(app, ["info", str(tmp_path / "1.2.840.9.mhd"), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert list(info) == [
        "series_uid",
        "shape_irc",
        "spacing_xyz",
        "origin_xyz",
        "direction",
        "hu_min",
        "hu_max",
    ]
    assert info["series_uid"] == "1.2.840.9"
    assert info["shape_irc"] == [6, 10, 12]
    assert info["direction"] == [1, 0, 0, 0, 1, 0, 0, 0, -1]
    assert info["hu_min"] == -1000


def test_cli_bad_file_is_one_line_exit_2(tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "x.mhd").write_text("garbage")
    result = subprocess.run(
        [sys.executable, "-m", "lungcad", "info", str(tmp_path / "x.mhd")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "x.mhd" in result.stderr and "Traceback" not in result.stderr


def test_flipped_direction_world_position_lands_on_voxel(tmp_path: Path) -> None:
    hu = np.full((20, 30, 40), -1000, np.int16)
    hu[15, 7, 30] = 500
    write_metaimage(tmp_path / "s.mhd", hu, FLIPPED)
    volume = read_ct(tmp_path / "s.mhd")
    # Index 15 along a flipped z axis sits 15 * 1.25 mm *below* the origin.
    xyz = (-100.0 + 30 * 0.7, 50.0 + 7 * 0.7, 200.0 - 15 * 1.25)
    assert tuple(xyz_to_irc(xyz, volume.geometry)) == (15, 7, 30)
