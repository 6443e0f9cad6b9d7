"""Turning an uploaded CT into a path ``read_ct`` opens, without trusting the upload.

An upload is one file (NRRD, NIfTI, MetaImage ``.mha``, or a zip of a DICOM series or of
any of those) or an ``.mhd`` + ``.raw`` pair. File names are reduced to their last
component; zips are checked for path traversal, links, entry count and unpacked size
before anything is extracted, and the size bound is enforced again while extracting
(declared sizes can lie). Problems are ``HTTPException``s: 400 bad input, 413 too large.
"""

from __future__ import annotations

import re
import shutil
import stat
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from starlette.exceptions import HTTPException

from lungcad.data.ct import VOLUME_SUFFIXES

ZIP_SUFFIX = ".zip"
_CHUNK = 1 << 20
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
_MAGIC = ((b"PK\x03\x04", ".zip"), (b"\x1f\x8b", ".nii.gz"), (b"NRRD", ".nrrd"))
FORMATS_HELP = (
    "send .nrrd, .nii, .nii.gz or .mha, an .mhd + .raw pair as multipart, "
    "or a .zip of a DICOM series"
)


def safe_name(name: str | None, default: str = "upload") -> str:
    """The last path component of a client-given name, in a safe alphabet (never ``..``)."""
    last = re.split(r"[\\/]", name or "")[-1]
    cleaned = _SAFE_NAME.sub("_", last).lstrip(".")
    return cleaned or default


def volume_suffix(name: str) -> str | None:
    """The CT or zip suffix a file name ends with (longest match), if any."""
    lower = name.lower()
    return next(
        (
            s
            for s in sorted((*VOLUME_SUFFIXES, ZIP_SUFFIX), key=len, reverse=True)
            if lower.endswith(s)
        ),
        None,
    )


def sniff_suffix(path: Path) -> str | None:
    """The suffix a file's first bytes imply: zip, gzip (NIfTI), NRRD, NIfTI-1, MetaImage."""
    with path.open("rb") as handle:
        head = handle.read(352)
    for magic, suffix in _MAGIC:
        if head.startswith(magic):
            return suffix
    if head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return ".nii"
    if head.lstrip().startswith((b"ObjectType", b"NDims")):
        return ".mha"
    return None


def prepare_ct(
    files: Sequence[tuple[str, Path]], workdir: Path, max_entries: int, max_unpacked_bytes: int
) -> Path:
    """The path to hand ``read_ct`` for uploaded ``(client name, saved path)`` files.

    Moves each file to its safe client name (with a sniffed suffix if it has none) in
    ``workdir/ct``; a zip is extracted into ``workdir/unzipped``.
    """
    if not 1 <= len(files) <= 2:
        raise HTTPException(
            400, f"expected one CT file or an .mhd + .raw pair, got {len(files)} files"
        )
    ct_dir = workdir / "ct"
    ct_dir.mkdir(parents=True, exist_ok=True)
    named = []
    for client_name, saved in files:
        name = safe_name(client_name)
        if volume_suffix(name) is None and len(files) == 1:
            name += sniff_suffix(saved) or ""
        target = ct_dir / name
        if target.exists():
            raise HTTPException(400, f"two uploaded files are both named {name}")
        named.append(Path(shutil.move(saved, target)))
    if len(named) == 2:
        return _metaimage_pair(named)
    path = named[0]
    suffix = volume_suffix(path.name)
    if suffix == ZIP_SUFFIX:
        return _volume_in(
            safe_extract_zip(path, workdir / "unzipped", max_entries, max_unpacked_bytes)
        )
    if suffix is None:
        raise HTTPException(400, f"{path.name}: unrecognised CT format; {FORMATS_HELP}")
    return path


def safe_extract_zip(archive: Path, dest: Path, max_entries: int, max_unpacked_bytes: int) -> Path:
    """Extract ``archive`` into ``dest`` after checking every entry; returns ``dest``."""
    try:
        with zipfile.ZipFile(archive) as zipped:
            entries = zipped.infolist()
            if len(entries) > max_entries:
                raise HTTPException(
                    413, f"{archive.name}: {len(entries)} entries, limit {max_entries}"
                )
            declared = sum(entry.file_size for entry in entries)
            if declared > max_unpacked_bytes:
                raise HTTPException(
                    413, f"{archive.name}: unpacks to {declared} bytes, limit {max_unpacked_bytes}"
                )
            targets = [(entry, dest / _checked_member(entry, archive.name)) for entry in entries]
            dest.mkdir(parents=True, exist_ok=True)
            written = 0
            for entry, target in targets:
                if entry.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                written = _copy_bounded(zipped, entry, target, written, max_unpacked_bytes)
    except zipfile.BadZipFile as exc:
        raise HTTPException(400, f"{archive.name}: not a readable zip ({exc})") from None
    return dest


def _checked_member(entry: zipfile.ZipInfo, archive: str) -> PurePosixPath:
    """The entry's relative path, refusing absolute paths, ``..``, links and encryption."""
    name = entry.filename.replace("\\", "/")
    path = PurePosixPath(name)
    if path.is_absolute() or re.match(r"^[A-Za-z]:", name) or ".." in path.parts:
        raise HTTPException(400, f"{archive}: entry {entry.filename!r} points outside the archive")
    if stat.S_ISLNK(entry.external_attr >> 16):
        raise HTTPException(400, f"{archive}: entry {entry.filename!r} is a symbolic link")
    if entry.flag_bits & 0x1:
        raise HTTPException(400, f"{archive}: entry {entry.filename!r} is encrypted")
    return path


def _copy_bounded(
    zipped: zipfile.ZipFile, entry: zipfile.ZipInfo, target: Path, written: int, limit: int
) -> int:
    with zipped.open(entry) as source, target.open("wb") as sink:
        while chunk := source.read(_CHUNK):
            written += len(chunk)
            if written > limit:
                raise HTTPException(413, f"zip unpacks to more than {limit} bytes")
            sink.write(chunk)
    return written


def _volume_in(directory: Path) -> Path:
    """A CT volume file inside ``directory`` if there is one, else the folder holding the
    most files (a DICOM series; ``read_ct`` picks the CT series in it)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    volumes = [p for p in files if volume_suffix(p.name) not in (None, ZIP_SUFFIX)]
    if volumes:
        return volumes[0]
    if not files:
        raise HTTPException(400, "the zip holds no files")
    counts: dict[Path, int] = {}
    for path in files:
        counts[path.parent] = counts.get(path.parent, 0) + 1
    return max(counts, key=lambda folder: (counts[folder], str(folder)))


def _metaimage_pair(paths: list[Path]) -> Path:
    """The ``.mhd`` of a header + data pair, its data file renamed to what the header says."""
    headers = [p for p in paths if p.suffix.lower() == ".mhd"]
    if len(headers) != 1:
        raise HTTPException(400, f"two files must be one .mhd header and its data; {FORMATS_HELP}")
    header = headers[0]
    data = next(p for p in paths if p != header)
    text = header.read_text(errors="replace")
    match = re.search(r"^\s*ElementDataFile\s*=\s*(.+?)\s*$", text, re.MULTILINE)
    if match is None or match.group(1) == "LOCAL":
        raise HTTPException(400, f"{header.name}: header names no separate data file")
    wanted = safe_name(match.group(1))
    if wanted != match.group(1):
        raise HTTPException(
            400, f"{header.name}: data file name {match.group(1)!r} is not a plain name"
        )
    if data.name != wanted:
        shutil.move(data, header.parent / wanted)
    return header
