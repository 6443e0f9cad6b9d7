"""Ground-truth nodule masks for segmentation, grown from the annotated centres.

LUNA16 gives a centre and a diameter per nodule, not its voxels. As the book does, we grow
a box from each centre along each axis while the voxels on both sides stay denser than
-700 HU (radius starting at 2), then keep the voxels above -700 HU inside the box. Unlike
the book, growth never wraps around the volume edge (a negative index there read the far
side of the scan): outside the volume a side no longer limits growth, and the box is
clipped to the volume. Nor does it run on along the chest wall or a vessel: the radius is
capped at one annotated diameter. Annotations whose centre already lies in a grown nodule
are the same nodule seen twice and are merged into it.

Masks are cached beside the volume (``VolumeCache.array_path(uid, "mask")``), bit-packed
along the column axis so one slice unpacks on its own from a memory map; a small JSON
sidecar records the nodules and what the mask was built from, so a rebuilt volume entry or
changed annotations rebuild the mask.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lungcad.atomic import atomic_write, atomic_write_text
from lungcad.data.cache import VolumeCache
from lungcad.data.geometry import Geometry, xyz_to_irc_array
from lungcad.data.luna import Annotation, group_by_series
from lungcad.progress import make_progress

log = logging.getLogger(__name__)

MASK_THRESHOLD_HU = -700.0
MASK_START_RADIUS = 2
MASK_FORMAT_VERSION = 1
MASK_ARRAY = "mask"
# Not ".json": VolumeCache lists series by the "*.json" files in its folder.
_SIDECAR_SUFFIX = ".meta"

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


@dataclass(frozen=True)
class NoduleExtent:
    """One annotated nodule in voxels: centre (I, R, C), box [low, high) per axis, and the
    slices (index axis) that hold its mask voxels. ``diameter_mm`` is the annotation's
    (the largest, when duplicates were merged)."""

    center_irc: tuple[int, int, int]
    box: Box
    slices: tuple[int, ...]
    diameter_mm: float

    def box_slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(low, high) for low, high in self.box)  # type: ignore[return-value]

    def to_json(self) -> dict[str, Any]:
        return {
            "center_irc": list(self.center_irc),
            "box": [list(b) for b in self.box],
            "slices": list(self.slices),
            "diameter_mm": self.diameter_mm,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NoduleExtent:
        return cls(
            center_irc=tuple(int(v) for v in data["center_irc"]),  # type: ignore[arg-type]
            box=tuple((int(low), int(high)) for low, high in data["box"]),  # type: ignore[arg-type]
            slices=tuple(int(v) for v in data["slices"]),
            diameter_mm=float(data["diameter_mm"]),
        )


def grow_radius(
    profile: np.ndarray,
    center: int,
    threshold_hu: float = MASK_THRESHOLD_HU,
    start_radius: int = MASK_START_RADIUS,
    max_radius: int | None = None,
) -> int:
    """The book's radius along one axis: the first radius at which a side is not dense.

    ``profile`` is the HU line through the centre. A side past the volume edge counts as
    dense (it cannot stop growth); growth ends at the latest when both sides are outside,
    or at ``max_radius``.
    """
    radius = start_radius
    size = len(profile)
    limit = size if max_radius is None else max(max_radius, start_radius)
    while radius < limit and (center - radius >= 0 or center + radius < size):
        below, above = center - radius, center + radius
        below_dense = below < 0 or profile[below] > threshold_hu
        above_dense = above >= size or profile[above] > threshold_hu
        if not (below_dense and above_dense):
            break
        radius += 1
    return radius


def grow_box(
    hu: np.ndarray,
    center_irc: Sequence[int],
    threshold_hu: float = MASK_THRESHOLD_HU,
    radius_limit_irc: Sequence[int] | None = None,
) -> Box:
    """Box [low, high) per axis (I, R, C) around a nodule centre, clipped to the volume."""
    i, r, c = (int(v) for v in center_irc)
    profiles = (hu[:, r, c], hu[i, :, c], hu[i, r, :])
    limits = tuple(radius_limit_irc) if radius_limit_irc is not None else (None, None, None)
    box = []
    for axis, (center, profile) in enumerate(zip((i, r, c), profiles, strict=True)):
        radius = grow_radius(
            np.asarray(profile), center, threshold_hu, MASK_START_RADIUS, limits[axis]
        )
        box.append((max(center - radius, 0), min(center + radius + 1, hu.shape[axis])))
    return tuple(box)  # type: ignore[return-value]


def radius_limit_irc(diameter_mm: float, geometry: Geometry) -> tuple[int, int, int]:
    """Growth limit per axis (I, R, C): one annotated diameter from the centre, in voxels.

    The book grew without a limit, so a nodule touching the chest wall or a vessel could
    take a long stretch of wall or vessel into its mask; twice the nodule's size is room
    enough for lobulation and spicules.
    """
    spacing_irc = geometry.spacing_xyz[::-1]
    return tuple(  # type: ignore[return-value]
        max(MASK_START_RADIUS, math.ceil(max(diameter_mm, 0.0) / s)) for s in spacing_irc
    )


def nodule_mask(
    hu: np.ndarray,
    annotations: Iterable[Annotation],
    geometry: Geometry,
    threshold_hu: float = MASK_THRESHOLD_HU,
) -> tuple[np.ndarray, list[NoduleExtent]]:
    """Boolean mask (I, R, C) of all annotated nodules of one scan, and each nodule's extent.

    Annotations are patient mm (LPS); centres outside the volume are skipped with a
    warning. Larger nodules go first, so a duplicate annotation merges into the larger.
    """
    mask = np.zeros(hu.shape, dtype=bool)
    extents: list[NoduleExtent] = []
    for annotation in sorted(annotations, key=lambda a: (-a.diameter_mm, tuple(a.center_xyz))):
        center = tuple(
            int(v) for v in np.rint(xyz_to_irc_array(np.asarray(annotation.center_xyz), geometry))
        )
        if not all(0 <= v < n for v, n in zip(center, hu.shape, strict=True)):
            log.warning(
                "series %s: annotation at %s mm lies outside the volume; no mask for it",
                annotation.series_uid,
                tuple(round(v, 1) for v in annotation.center_xyz),
            )
            continue
        box = grow_box(hu, center, threshold_hu, radius_limit_irc(annotation.diameter_mm, geometry))
        region = tuple(slice(low, high) for low, high in box)
        dense = np.asarray(hu[region]) > threshold_hu
        duplicate_of = next(
            (k for k, extent in enumerate(extents) if _inside(center, extent.box) and mask[center]),
            None,
        )
        mask[region] |= dense
        if duplicate_of is None:
            extents.append(_extent(mask, center, box, annotation.diameter_mm))
            continue
        first = extents[duplicate_of]
        merged_box = tuple(
            (min(a[0], b[0]), max(a[1], b[1])) for a, b in zip(first.box, box, strict=True)
        )
        diameter = max(first.diameter_mm, annotation.diameter_mm)
        extents[duplicate_of] = _extent(mask, first.center_irc, merged_box, diameter)  # type: ignore[arg-type]
    return mask, extents


def _inside(point: Sequence[int], box: Box) -> bool:
    return all(low <= v < high for v, (low, high) in zip(point, box, strict=True))


def _extent(
    mask: np.ndarray, center: tuple[int, ...], box: Box, diameter_mm: float
) -> NoduleExtent:
    region = tuple(slice(low, high) for low, high in box)
    rows_with_mask = mask[region].any(axis=(1, 2))
    slices = tuple(int(box[0][0] + k) for k in np.flatnonzero(rows_with_mask))
    return NoduleExtent(center, box, slices, float(diameter_mm))  # type: ignore[arg-type]


class NoduleMasks:
    """The masks of one dataset, built into the volume cache once and then memory-mapped.

    Pickles as paths and annotations only, so DataLoader workers map the files themselves.
    """

    def __init__(
        self,
        cache: VolumeCache,
        annotations: Sequence[Annotation],
        threshold_hu: float = MASK_THRESHOLD_HU,
    ) -> None:
        self.cache = cache
        self.threshold_hu = threshold_hu
        self._annotations = group_by_series(annotations)
        self._packed: dict[str, np.ndarray] = {}
        self._nodules: dict[str, tuple[NoduleExtent, ...]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_packed": {}, "_nodules": {}}

    def annotations(self, series_uid: str) -> list[Annotation]:
        return list(self._annotations.get(series_uid, []))

    def ensure(self, series_uids: Sequence[str]) -> int:
        """Build every missing or stale mask (progress bar); returns how many were built."""
        stale = [uid for uid in series_uids if self._read_sidecar(uid) is None]
        if stale:
            with make_progress() as progress:
                bar = progress.add_task("nodule masks", total=len(stale))
                for uid in stale:
                    self._build(uid)
                    progress.advance(bar)
        return len(stale)

    def nodules(self, series_uid: str) -> tuple[NoduleExtent, ...]:
        """The merged nodules of a series, built on first use."""
        if series_uid not in self._nodules:
            sidecar = self._read_sidecar(series_uid) or self._build(series_uid)
            self._nodules[series_uid] = tuple(NoduleExtent.from_json(n) for n in sidecar["nodules"])
        return self._nodules[series_uid]

    def positive_slices(self, series_uid: str) -> list[int]:
        """Sorted slice indices holding any nodule voxel."""
        return sorted({s for nodule in self.nodules(series_uid) for s in nodule.slices})

    def slice(self, series_uid: str, index: int) -> np.ndarray:
        """Boolean (R, C) mask of slice ``index``."""
        packed = self._packed_array(series_uid)
        columns = self.cache.volume(series_uid).hu.shape[2]
        return np.unpackbits(packed[index], axis=-1, count=columns).astype(bool)

    def volume(self, series_uid: str) -> np.ndarray:
        """Boolean (I, R, C) mask of the whole series."""
        packed = self._packed_array(series_uid)
        columns = self.cache.volume(series_uid).hu.shape[2]
        return np.unpackbits(packed, axis=-1, count=columns).astype(bool)

    def _packed_array(self, series_uid: str) -> np.ndarray:
        if series_uid not in self._packed:
            self.nodules(series_uid)  # builds the mask if it is missing or stale
            path = self.cache.array_path(series_uid, MASK_ARRAY)
            self._packed[series_uid] = np.asarray(np.load(path, mmap_mode="r"))
        return self._packed[series_uid]

    def _sidecar_path(self, series_uid: str) -> Path:
        return self.cache.array_path(series_uid, MASK_ARRAY).with_suffix(_SIDECAR_SUFFIX)

    def _identity(self, series_uid: str) -> dict[str, Any]:
        """What the mask depends on: the volume entry's files, the annotations, the rule."""
        files = []
        for path in self.cache.entry_files(series_uid):
            stat = path.stat()
            files.append([path.suffix, stat.st_size, stat.st_mtime_ns])
        annotations = sorted(
            [*a.center_xyz, a.diameter_mm] for a in self._annotations.get(series_uid, [])
        )
        digest = hashlib.sha256(json.dumps(annotations).encode()).hexdigest()
        return {
            "format": MASK_FORMAT_VERSION,
            "threshold_hu": self.threshold_hu,
            "start_radius": MASK_START_RADIUS,
            "volume_files": files,
            "annotations_sha256": digest,
        }

    def _read_sidecar(self, series_uid: str) -> dict[str, Any] | None:
        path = self._sidecar_path(series_uid)
        try:
            sidecar = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        fresh = sidecar.get("identity") == self._identity(series_uid)
        if not fresh or not self.cache.array_path(series_uid, MASK_ARRAY).exists():
            return None
        return dict(sidecar)

    def _build(self, series_uid: str) -> dict[str, Any]:
        volume = self.cache.volume(series_uid)
        mask, extents = nodule_mask(
            volume.hu, self._annotations.get(series_uid, []), volume.geometry, self.threshold_hu
        )
        packed = np.packbits(mask, axis=-1)
        atomic_write(
            self.cache.array_path(series_uid, MASK_ARRAY), lambda handle: np.save(handle, packed)
        )
        sidecar = {
            "identity": self._identity(series_uid),
            "voxels": int(mask.sum()),
            "nodules": [extent.to_json() for extent in extents],
        }
        # The sidecar goes last: a mask without a matching one is rebuilt.
        atomic_write_text(self._sidecar_path(series_uid), json.dumps(sidecar))
        self._packed.pop(series_uid, None)
        self._nodules.pop(series_uid, None)
        log.debug("mask %s: %d nodules, %d voxels", series_uid, len(extents), sidecar["voxels"])
        return sidecar
