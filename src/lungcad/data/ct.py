"""Read a CT from any format our users hold into one shape: int16 HU in (I, R, C) order
plus its LPS geometry.

SimpleITK reads every format; we add the checks that turn its C++ exceptions into
messages that name the file and say what is wrong.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from lungcad.data.geometry import Geometry
from lungcad.errors import LungcadError

log = logging.getLogger(__name__)

HU_AIR = -1000
_METAIO_BYTES = {
    "MET_CHAR": 1,
    "MET_UCHAR": 1,
    "MET_SHORT": 2,
    "MET_USHORT": 2,
    "MET_INT": 4,
    "MET_UINT": 4,
    "MET_LONG": 8,
    "MET_ULONG": 8,
    "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
}
VOLUME_SUFFIXES = (".mhd", ".mha", ".nrrd", ".nhdr", ".nii", ".nii.gz")


@dataclass(frozen=True)
class CtVolume:
    """A CT scan in memory. ``hu`` is int16 Hounsfield units, shape (I, R, C)."""

    series_uid: str
    hu: np.ndarray
    geometry: Geometry
    source: Path

    @property
    def shape_irc(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.hu.shape)  # type: ignore[return-value]


def series_uid_for(path: Path) -> str:
    """Identity of a scan file when no DICOM UID is present: its name without suffixes."""
    name = path.name
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def read_ct(path: str | Path) -> CtVolume:
    """Open a LUNA16 ``.mhd``, a DICOM series folder, NRRD or NIfTI as HU int16 (I, R, C)."""
    path = Path(path)
    if not path.exists():
        raise LungcadError(f"{path}: no such file or directory")
    if path.is_dir():
        image, series_uid = _read_dicom_dir(path)
    else:
        if path.suffix.lower() == ".mhd":
            _check_metaimage(path)
        image = _read_image_file(path)
        series_uid = series_uid_for(path)
    return _to_volume(image, series_uid, path)


def _read_image_file(path: Path) -> sitk.Image:
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        raise LungcadError(f"{path}: cannot read as a CT volume ({first_line})") from None


def _check_metaimage(path: Path) -> None:
    """Catch a missing or truncated ``.raw`` before SimpleITK fails obscurely on it."""
    header: dict[str, str] = {}
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise LungcadError(f"{path}: cannot read header ({exc.strerror})") from None
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            header[key.strip()] = value.strip()
    missing = [k for k in ("DimSize", "ElementType", "ElementDataFile") if k not in header]
    if missing:
        raise LungcadError(f"{path}: not a MetaImage header (missing {', '.join(missing)})")
    data_name = header["ElementDataFile"]
    if data_name == "LOCAL" or header.get("CompressedData", "False").lower() == "true":
        return
    data_path = path.parent / data_name
    if not data_path.exists():
        raise LungcadError(f"{path}: data file {data_name} is missing")
    try:
        dims = [int(v) for v in header["DimSize"].split()]
    except ValueError:
        raise LungcadError(f"{path}: bad DimSize {header['DimSize']!r}") from None
    element_bytes = _METAIO_BYTES.get(header["ElementType"])
    if element_bytes is None:
        raise LungcadError(f"{path}: unsupported ElementType {header['ElementType']}")
    channels = int(header.get("ElementNumberOfChannels", "1"))
    expected = int(np.prod(dims)) * element_bytes * channels
    actual = data_path.stat().st_size
    if actual < expected:
        size = "x".join(str(d) for d in dims)
        raise LungcadError(
            f"{data_path}: header says {size} {header['ElementType']} = {expected / 1e6:.1f} MB, "
            f"file has {actual / 1e6:.1f} MB (truncated?)"
        )


def _read_dicom_dir(directory: Path) -> tuple[sitk.Image, str]:
    """Pick the CT series with the most slices; GDCM orders slices by position."""
    reader = sitk.ImageSeriesReader()
    series_ids = reader.GetGDCMSeriesIDs(str(directory)) or []
    candidates: list[tuple[int, str, list[str]]] = []
    for series_id in series_ids:
        files = list(reader.GetGDCMSeriesFileNames(str(directory), series_id))
        if _modality(files[0]) in ("CT", ""):
            candidates.append((len(files), series_id, files))
    if not candidates:
        found = f"{len(series_ids)} non-CT series" if series_ids else "no DICOM files"
        raise LungcadError(f"{directory}: no CT series found ({found})")
    candidates.sort(key=lambda c: (-c[0], c[1]))
    count, series_id, files = candidates[0]
    if len(candidates) > 1:
        log.info(
            "%s: %d CT series, using %s (%d slices)", directory, len(candidates), series_id, count
        )
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise LungcadError(f"{directory}: cannot read DICOM series {series_id} ({exc})") from None
    return image, series_id


def _modality(dicom_file: str) -> str:
    file_reader = sitk.ImageFileReader()
    file_reader.SetFileName(dicom_file)
    try:
        file_reader.ReadImageInformation()
    except RuntimeError:
        return "unreadable"
    return (
        file_reader.GetMetaData("0008|0060").strip()
        if file_reader.HasMetaDataKey("0008|0060")
        else ""
    )


def _to_volume(image: sitk.Image, series_uid: str, source: Path) -> CtVolume:
    if image.GetDimension() != 3:
        raise LungcadError(f"{source}: expected a 3D volume, got {image.GetDimension()}D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise LungcadError(f"{source}: expected one value per voxel (grey CT), got colour data")
    # SimpleITK already applied rescale slope/intercept for DICOM; array is (z, y, x) = (I, R, C).
    array = sitk.GetArrayFromImage(image)
    if array.dtype != np.int16:
        array = np.clip(np.rint(array), -32768, 32767).astype(np.int16)
    geometry = Geometry(
        origin_xyz=tuple(float(v) for v in image.GetOrigin()),  # type: ignore[arg-type]
        spacing_xyz=tuple(float(v) for v in image.GetSpacing()),  # type: ignore[arg-type]
        direction=tuple(float(v) for v in image.GetDirection()),
    )
    return CtVolume(
        series_uid=series_uid, hu=np.ascontiguousarray(array), geometry=geometry, source=source
    )


def write_metaimage(path: Path, hu: np.ndarray, geometry: Geometry) -> None:
    """Write int16 HU (I, R, C) as LUNA16-style ``.mhd`` + ``.raw`` (MET_SHORT, uncompressed)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(hu.astype(np.int16)))
    image.SetOrigin(geometry.origin_xyz)
    image.SetSpacing(geometry.spacing_xyz)
    image.SetDirection(geometry.direction)
    sitk.WriteImage(image, str(path), useCompression=False)
