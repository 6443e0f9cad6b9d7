"""Upload handling on its own: names, format sniffing, zip checks before extraction."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from starlette.exceptions import HTTPException

from lungcad.serving.uploads import prepare_ct, safe_extract_zip, safe_name, sniff_suffix


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("scan.nrrd", "scan.nrrd"),
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\x\\ct.nii.gz", "ct.nii.gz"),
        ("..", "upload"),
        ("a b;c.mhd", "a_b_c.mhd"),
        (None, "upload"),
    ],
)
def test_safe_name_keeps_only_a_harmless_last_component(given: str | None, expected: str) -> None:
    assert safe_name(given) == expected


@pytest.mark.parametrize(
    ("head", "suffix"),
    [
        (b"PK\x03\x04rest", ".zip"),
        (b"\x1f\x8b\x08rest", ".nii.gz"),
        (b"NRRD0004\n", ".nrrd"),
        (b"\0" * 344 + b"n+1\0", ".nii"),
        (b"ObjectType = Image\nNDims = 3\n", ".mha"),
        (b"hello", None),
    ],
)
def test_sniff_suffix_from_first_bytes(tmp_path: Path, head: bytes, suffix: str | None) -> None:
    path = tmp_path / "body"
    path.write_bytes(head)
    assert sniff_suffix(path) == suffix


def make_zip(path: Path, names: list[str], size: int = 1) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zipped:
        for name in names:
            zipped.writestr(name, b"\0" * size)
    return path


@pytest.mark.parametrize(
    ("names", "size", "status"),
    [
        (["fine.dcm", "../escape.dcm"], 1, 400),
        (["fine.dcm", "/abs.dcm"], 1, 400),
        ([f"{i}.dcm" for i in range(11)], 1, 413),
        (["big.dcm"], 2_000_000, 413),
    ],
)
def test_refused_zip_writes_nothing(
    tmp_path: Path, names: list[str], size: int, status: int
) -> None:
    archive = make_zip(tmp_path / "upload.zip", names, size)
    dest = tmp_path / "out"
    with pytest.raises(HTTPException) as refused:
        safe_extract_zip(archive, dest, max_entries=10, max_unpacked_bytes=1_000_000)
    assert refused.value.status_code == status
    assert not dest.exists()
    assert not (tmp_path / "escape.dcm").exists()


def test_zip_extracts_and_the_series_folder_is_chosen(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "upload", ["study/s1/a.dcm", "study/s1/b.dcm", "readme"])
    path = prepare_ct([("study.zip", archive)], tmp_path / "work", 10, 1000)
    assert path == tmp_path / "work" / "unzipped" / "study" / "s1"


def test_mhd_pair_data_file_is_renamed_to_what_the_header_names(tmp_path: Path) -> None:
    header = tmp_path / "h"
    header.write_text("NDims = 3\nElementDataFile = scan.raw\n")
    data = tmp_path / "d"
    data.write_bytes(b"\0")
    path = prepare_ct([("x/scan.mhd", header), ("other.raw", data)], tmp_path / "work", 10, 1000)
    assert path == tmp_path / "work" / "ct" / "scan.mhd"
    assert (path.parent / "scan.raw").read_bytes() == b"\0"


def test_header_naming_a_path_is_refused(tmp_path: Path) -> None:
    header = tmp_path / "h"
    header.write_text("ElementDataFile = ../../etc/passwd\n")
    (tmp_path / "d").write_bytes(b"\0")
    with pytest.raises(HTTPException, match="not a plain name"):
        prepare_ct([("a.mhd", header), ("a.raw", tmp_path / "d")], tmp_path / "work", 10, 1000)
