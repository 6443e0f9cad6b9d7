import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from lungcad.data.cache import VolumeCache
from lungcad.data.ct import write_metaimage
from lungcad.data.geometry import Geometry, irc_to_xyz
from lungcad.data.luna import Annotation
from lungcad.data.masks import NoduleMasks, grow_box, grow_radius, nodule_mask
from lungcad.data.synth import generate_scan

# Flipped z so voxel -> mm goes through a real inverse, not the identity.
GEOMETRY = Geometry((-40.0, 30.0, 100.0), (0.7, 0.7, 1.5), (1, 0, 0, 0, 1, 0, 0, 0, -1))
SHAPE = (24, 40, 48)


def _ball(center_irc: tuple[int, int, int], radius: float, shape=SHAPE) -> np.ndarray:
    i, r, c = np.indices(shape)
    ci, cr, cc = center_irc
    return (i - ci) ** 2 + (r - cr) ** 2 + (c - cc) ** 2 <= radius**2


def _scan(*balls: np.ndarray) -> np.ndarray:
    hu = np.full(SHAPE, -850, dtype=np.int16)  # lung parenchyma
    for ball in balls:
        hu[ball] = 40  # soft tissue
    return hu


def _annotation(center_irc: tuple[int, int, int], diameter_mm: float = 6.0) -> Annotation:
    return Annotation("1.2.3", irc_to_xyz(center_irc, GEOMETRY), diameter_mm)


@pytest.mark.parametrize(
    ("profile", "center", "expected"),
    [
        ([-900] * 3 + [0] * 7 + [-900] * 3, 6, 4),  # dense 3..9: stops where index 10 is air
        ([-900] * 13, 6, 2),  # nothing dense: radius stays at its start
        ([0] * 5 + [-900] * 8, 1, 4),  # below is the volume edge: it never limits growth
        ([0] * 6, 2, 4),  # dense everywhere: stops once both sides leave the volume
    ],
)
def test_grow_radius(profile: list[int], center: int, expected: int) -> None:
    assert grow_radius(np.asarray(profile), center) == expected


def test_growth_stops_at_the_radius_limit() -> None:
    assert grow_radius(np.zeros(40), 20, max_radius=5) == 5


def test_growth_along_the_chest_wall_is_capped_by_the_diameter() -> None:
    ball = _ball((12, 20, 24), 3.0)
    wall = np.zeros(SHAPE, bool)
    wall[:, 20:24, :] = True  # a dense sheet through the nodule, along every column
    mask, extents = nodule_mask(_scan(ball, wall), [_annotation((12, 20, 24), 6.0)], GEOMETRY)
    columns = extents[0].box[2]
    assert columns[1] - columns[0] <= 2 * 9 + 1, "one diameter (6 mm = 9 voxels) each way"
    assert mask[:, :, 24].any() and not mask[:, :, :10].any()


def test_mask_of_a_solid_ball_is_the_ball() -> None:
    ball = _ball((12, 20, 24), 4.0)
    mask, extents = nodule_mask(_scan(ball), [_annotation((12, 20, 24))], GEOMETRY)
    np.testing.assert_array_equal(mask, ball)
    assert extents[0].center_irc == (12, 20, 24)
    assert extents[0].slices == tuple(range(8, 17))


def test_box_limits_the_mask_to_the_nodule_not_touching_tissue() -> None:
    ball = _ball((12, 20, 24), 3.0)
    wall = np.zeros(SHAPE, bool)
    wall[:, :, 40:] = True  # chest wall far from the nodule
    mask, _ = nodule_mask(_scan(ball, wall), [_annotation((12, 20, 24))], GEOMETRY)
    np.testing.assert_array_equal(mask, ball)


def test_nodule_at_the_volume_edge_does_not_wrap_around() -> None:
    edge = _ball((1, 20, 24), 3.0)  # cut by the first slice
    far_side = np.zeros(SHAPE, bool)
    far_side[-4:, 16:25, 20:29] = True  # dense tissue at the other end of the index axis
    hu = _scan(edge, far_side)
    box = grow_box(hu, (1, 20, 24))
    assert box[0] == (0, 6)  # clipped at 0; grew past the edge, stopped at index 5 (air)
    mask, extents = nodule_mask(hu, [_annotation((1, 20, 24))], GEOMETRY)
    np.testing.assert_array_equal(mask, edge)
    assert not mask[-4:].any(), "the book's negative index wrapped into the last slices"
    assert extents[0].slices == (0, 1, 2, 3, 4)


def test_nodule_at_the_last_column() -> None:
    ball = _ball((12, 20, SHAPE[2] - 1), 3.0)
    mask, _ = nodule_mask(_scan(ball), [_annotation((12, 20, SHAPE[2] - 1))], GEOMETRY)
    np.testing.assert_array_equal(mask, ball)


def test_two_annotations_of_one_nodule_merge() -> None:
    ball = _ball((12, 20, 24), 4.0)
    once, _ = nodule_mask(_scan(ball), [_annotation((12, 20, 24), 8.0)], GEOMETRY)
    twice, extents_twice = nodule_mask(
        _scan(ball), [_annotation((12, 20, 24), 8.0), _annotation((13, 21, 23), 7.0)], GEOMETRY
    )
    np.testing.assert_array_equal(once, twice)
    assert len(extents_twice) == 1
    assert extents_twice[0].diameter_mm == 8.0


def test_two_nodules_give_the_union_and_two_extents() -> None:
    a, b = _ball((6, 10, 10), 3.0), _ball((17, 30, 36), 3.0)
    mask, extents = nodule_mask(
        _scan(a, b), [_annotation((6, 10, 10)), _annotation((17, 30, 36))], GEOMETRY
    )
    np.testing.assert_array_equal(mask, a | b)
    assert len(extents) == 2


def test_annotation_outside_the_volume_is_skipped() -> None:
    outside = Annotation("1.2.3", irc_to_xyz((40, 20, 24), GEOMETRY), 6.0)
    mask, extents = nodule_mask(_scan(), [outside], GEOMETRY)
    assert not mask.any() and extents == []


def _cache_with_scan(tmp_path: Path, hu: np.ndarray) -> tuple[VolumeCache, Path]:
    source = tmp_path / "subset0" / "1.2.3.mhd"
    source.parent.mkdir(parents=True, exist_ok=True)
    write_metaimage(source, hu, GEOMETRY)
    cache = VolumeCache(tmp_path / "cache")
    cache.put(source)
    return cache, source


def test_cached_masks_map_slices_and_rebuild_when_stale(tmp_path: Path) -> None:
    ball = _ball((12, 20, 24), 4.0)
    cache, source = _cache_with_scan(tmp_path, _scan(ball))
    masks = NoduleMasks(cache, [_annotation((12, 20, 24))])
    assert masks.ensure(["1.2.3"]) == 1
    assert NoduleMasks(cache, [_annotation((12, 20, 24))]).ensure(["1.2.3"]) == 0
    np.testing.assert_array_equal(masks.volume("1.2.3"), ball)
    np.testing.assert_array_equal(masks.slice("1.2.3", 12), ball[12])
    assert masks.positive_slices("1.2.3") == list(range(8, 17))
    assert cache.series_uids() == ["1.2.3"], "mask files must not look like volume entries"
    on_disk = cache.array_path("1.2.3", "mask").stat().st_size
    assert on_disk < ball.size / 4, "stored bit-packed"

    clone = pickle.loads(pickle.dumps(masks))
    assert clone._packed == {} and clone.slice("1.2.3", 12).sum() == ball[12].sum()

    moved = NoduleMasks(cache, [_annotation((6, 20, 24))])
    assert moved.ensure(["1.2.3"]) == 1, "changed annotations rebuild the mask"

    write_metaimage(source, _scan(_ball((12, 20, 24), 2.0)), GEOMETRY)
    os.utime(source.with_suffix(".raw"), ns=(1, 1))
    cache.put(source)
    fresh = NoduleMasks(cache, [_annotation((12, 20, 24))])
    assert fresh.ensure(["1.2.3"]) == 1, "a rebuilt volume entry rebuilds the mask"
    assert fresh.volume("1.2.3").sum() == _ball((12, 20, 24), 2.0).sum()


def test_masks_match_the_generators_nodules() -> None:
    """Against the phantom's own labels: nearly every nodule voxel is in the mask, and for
    isolated solid nodules of 4 mm or more the mask is the nodule plus its partial-volume
    rim at most (below 4 mm that one-voxel rim alone is as large as the nodule)."""
    isolated_solid = 0
    for index in range(6):
        scan = generate_scan(3, index, 96)
        annotations = [
            Annotation(scan.series_uid, n.center_xyz, n.diameter_mm) for n in scan.nodules
        ]
        mask, extents = nodule_mask(scan.hu, annotations, scan.geometry)
        for nodule in scan.nodules:
            truth = scan.nodule_labels == nodule.label
            assert (mask & truth).sum() >= 0.9 * truth.sum(), nodule
            if nodule.kind != "solid" or nodule.location != "isolated" or nodule.diameter_mm < 4:
                continue
            extent = next(e for e in extents if truth[e.center_irc])
            box = extent.box_slices()
            dice = 2 * (mask[box] & truth[box]).sum() / (mask[box].sum() + truth[box].sum())
            assert dice >= 0.6, (nodule, dice)
            isolated_solid += 1
    assert isolated_solid >= 2, "the phantoms drawn should hold isolated solid nodules"
