import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from lungcad.data.cache import VolumeCache, default_cache_dir, prepare_cache
from lungcad.data.ct import write_metaimage
from lungcad.data.geometry import Geometry, irc_to_xyz
from lungcad.errors import LungcadError

GEOMETRY = Geometry((-50.0, 20.0, -300.0), (0.8, 0.8, 2.0), (1, 0, 0, 0, 1, 0, 0, 0, -1))


def _dataset(root: Path, count: int = 3) -> dict[str, Path]:
    (root / "subset0").mkdir(parents=True)
    rng = np.random.default_rng(0)
    scans = {}
    for index in range(count):
        uid = f"1.2.3.{index}"
        hu = rng.integers(-1000, 1000, size=(20, 40, 50), dtype=np.int16)
        write_metaimage(root / "subset0" / f"{uid}.mhd", hu, GEOMETRY)
        scans[uid] = root / "subset0" / f"{uid}.mhd"
    return scans


def test_prepare_then_crop_matches_source(tmp_path: Path) -> None:
    scans = _dataset(tmp_path / "data")
    cache = VolumeCache(tmp_path / "cache")
    summary = prepare_cache(scans, cache, workers=1)
    assert (summary.converted, summary.skipped) == (3, 0)
    assert cache.series_uids() == sorted(scans)
    from lungcad.data.ct import read_ct

    source = read_ct(scans["1.2.3.1"]).hu
    center_xyz = irc_to_xyz((10, 20, 25), GEOMETRY)
    crop, center_irc = cache.crop("1.2.3.1", center_xyz, (4, 6, 8))
    assert tuple(center_irc) == (10, 20, 25)
    np.testing.assert_array_equal(crop, source[8:12, 17:23, 21:29])
    np.testing.assert_array_equal(cache.slice_stack("1.2.3.1", 0)[3], source[0])
    hu = cache.volume("1.2.3.1").hu
    assert not hu.flags.owndata and not hu.flags.writeable, "a read-only map, not a copy in memory"


def test_rerun_skips_fresh_and_rebuilds_changed(tmp_path: Path) -> None:
    scans = _dataset(tmp_path / "data")
    cache = VolumeCache(tmp_path / "cache")
    prepare_cache(scans, cache)
    assert prepare_cache(scans, cache).skipped == 3
    hu = np.zeros((20, 40, 50), np.int16)
    write_metaimage(scans["1.2.3.0"], hu, GEOMETRY)
    os.utime(scans["1.2.3.0"].with_suffix(".raw"), ns=(1, 1))
    summary = prepare_cache(scans, cache)
    assert (summary.converted, summary.skipped) == (1, 2)
    assert (
        not VolumeCache(cache.root)
        .crop("1.2.3.0", irc_to_xyz((5, 5, 5), GEOMETRY), (2, 2, 2))[0]
        .any()
    )


def test_incomplete_entry_is_rebuilt(tmp_path: Path) -> None:
    scans = _dataset(tmp_path / "data", count=1)
    cache = VolumeCache(tmp_path / "cache")
    prepare_cache(scans, cache)
    npy = cache.entries_dir / "1.2.3.0.npy"
    npy.write_bytes(npy.read_bytes()[:500])  # a crash mid-write of an older tool
    assert not cache.is_fresh("1.2.3.0", scans["1.2.3.0"])
    (cache.entries_dir / "1.2.3.0.npy.tmp-999").write_bytes(b"half")
    assert prepare_cache(scans, cache).converted == 1
    assert not list(cache.entries_dir.glob("*.tmp-*"))


def test_other_format_version_is_not_served(tmp_path: Path) -> None:
    scans = _dataset(tmp_path / "data", count=1)
    cache = VolumeCache(tmp_path / "cache")
    prepare_cache(scans, cache)
    meta_path = cache.entries_dir / "1.2.3.0.json"
    meta = json.loads(meta_path.read_text())
    meta["format"] = 0
    meta_path.write_text(json.dumps(meta))
    assert not cache.is_fresh("1.2.3.0", scans["1.2.3.0"])
    with pytest.raises(LungcadError, match="stale"):
        VolumeCache(cache.root).volume("1.2.3.0")


def test_unknown_series_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(LungcadError, match=r"1\.9\.9 is not in the cache"):
        VolumeCache(tmp_path).volume("1.9.9")


def test_parallel_prepare_and_pickling_shares_no_maps(tmp_path: Path) -> None:
    scans = _dataset(tmp_path / "data", count=4)
    cache = VolumeCache(tmp_path / "cache")
    assert prepare_cache(scans, cache, workers=2).converted == 4
    cache.volume("1.2.3.2")
    clone = pickle.loads(pickle.dumps(cache))
    assert clone._open == {} and clone.root == cache.root
    np.testing.assert_array_equal(clone.volume("1.2.3.2").hu, cache.volume("1.2.3.2").hu)


def test_default_cache_dir_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LUNGCAD_CACHE", raising=False)
    assert default_cache_dir(tmp_path) == tmp_path / ".lungcad-cache"
    monkeypatch.setenv("LUNGCAD_CACHE", str(tmp_path / "elsewhere"))
    assert default_cache_dir(tmp_path) == tmp_path / "elsewhere"


def test_center_irc_matches_geometry_for_oblique_direction(tmp_path: Path) -> None:
    from scipy.spatial.transform import Rotation

    from lungcad.data.cache import CachedVolume
    from lungcad.data.geometry import xyz_to_irc

    rotation = Rotation.from_euler("xyz", [10, -20, 35], degrees=True).as_matrix()
    geometry = Geometry((3.0, -7.0, 11.0), (0.7, 0.9, 1.5), tuple(rotation.ravel()))
    volume = CachedVolume("1.2", np.zeros((2, 2, 2), np.int16), geometry)
    rng = np.random.default_rng(1)
    for xyz in rng.uniform(-200, 200, size=(200, 3)):
        assert volume.center_irc(xyz) == xyz_to_irc(tuple(xyz), geometry)


def test_synth_prepare_crop_round_trip_lands_on_the_nodule(tmp_path: Path) -> None:
    from lungcad.data.luna import discover_scans, read_annotations
    from lungcad.data.synth import write_dataset

    write_dataset(tmp_path / "data", scans=4, seed=3, size=64)
    annotations = read_annotations(tmp_path / "data" / "annotations.csv")
    assert annotations, "the phantoms of this seed carry nodules"
    cache = VolumeCache(tmp_path / "cache")
    prepare_cache(discover_scans(tmp_path / "data"), cache)
    for nodule in annotations:
        crop, _ = cache.crop(nodule.series_uid, nodule.center_xyz)
        assert crop.shape == (32, 48, 48)
        assert crop[16, 24, 24] > -700, f"{nodule} centre is not on nodule voxels"
