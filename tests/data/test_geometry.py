import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from lungcad.data.geometry import (
    Geometry,
    Irc,
    Xyz,
    irc_to_xyz,
    irc_to_xyz_array,
    xyz_to_irc,
    xyz_to_irc_array,
    xyz_to_irc_continuous,
)

coordinate = st.floats(-400, 400, allow_nan=False)
spacing = st.floats(0.3, 5.0, allow_nan=False)


@st.composite
def geometries(draw: st.DrawFn) -> Geometry:
    """Random origin, spacing and orthonormal direction: axis permutations, flips, oblique."""
    kind = draw(st.sampled_from(["permutation", "oblique"]))
    if kind == "permutation":
        perm = draw(st.permutations([0, 1, 2]))
        signs = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=3, max_size=3))
        matrix = np.zeros((3, 3))
        for row, col in enumerate(perm):
            matrix[row, col] = signs[row]
    else:
        seed = draw(st.integers(0, 2**32 - 1))
        matrix = Rotation.random(random_state=seed).as_matrix()
        if draw(st.booleans()):
            matrix[:, 2] *= -1  # improper rotation: a flipped axis
    return Geometry(
        origin_xyz=(draw(coordinate), draw(coordinate), draw(coordinate)),
        spacing_xyz=(draw(spacing), draw(spacing), draw(spacing)),
        direction=tuple(float(v) for v in matrix.ravel()),
    )


@settings(max_examples=200, deadline=None)
@given(geometries(), coordinate, coordinate, coordinate)
def test_xyz_irc_round_trip_is_exact(geometry: Geometry, x: float, y: float, z: float) -> None:
    irc = xyz_to_irc_continuous(Xyz(x, y, z), geometry)
    back = irc_to_xyz(irc, geometry)
    np.testing.assert_allclose(back, (x, y, z), atol=1e-6)


@settings(max_examples=200, deadline=None)
@given(geometries(), st.tuples(*[st.integers(-50, 600)] * 3))
def test_integer_voxels_survive_round_trip(geometry: Geometry, irc: tuple[int, int, int]) -> None:
    assert xyz_to_irc(irc_to_xyz(Irc(*irc), geometry), geometry) == Irc(*irc)


def test_book_inverse_bug_is_not_reproduced() -> None:
    """The book multiplies by the direction again instead of inverting it; with a
    non-symmetric direction that lands on the wrong voxel. Ours must not."""
    rotation = Rotation.from_euler("z", 30, degrees=True).as_matrix()
    geometry = Geometry((10.0, -20.0, 30.0), (0.7, 0.8, 2.5), tuple(rotation.ravel()))
    irc = Irc(12, 40, 57)
    xyz = irc_to_xyz(irc, geometry)
    assert xyz_to_irc(xyz, geometry) == irc
    offset = np.array(xyz) - geometry.origin_xyz
    book_cri = (offset @ np.linalg.inv(rotation)) / geometry.spacing_xyz  # the book's formula
    assert tuple(int(v) for v in np.rint(book_cri[::-1])) != irc


def test_axis_order_is_index_row_col() -> None:
    geometry = Geometry((0.0, 0.0, 0.0), (1.0, 2.0, 3.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert irc_to_xyz(Irc(1, 0, 0), geometry) == Xyz(0.0, 0.0, 3.0)
    assert irc_to_xyz(Irc(0, 1, 0), geometry) == Xyz(0.0, 2.0, 0.0)
    assert irc_to_xyz(Irc(0, 0, 1), geometry) == Xyz(1.0, 0.0, 0.0)


def test_vectorised_matches_scalar() -> None:
    rng = np.random.default_rng(0)
    geometry = Geometry((5.0, 6.0, 7.0), (0.6, 0.6, 1.25), (1, 0, 0, 0, -1, 0, 0, 0, -1))
    points = rng.uniform(-100, 100, size=(50, 3))
    irc = xyz_to_irc_array(points, geometry)
    for point, row in zip(points, irc, strict=True):
        np.testing.assert_allclose(row, xyz_to_irc_continuous(Xyz(*point), geometry), atol=1e-9)
    np.testing.assert_allclose(irc_to_xyz_array(irc, geometry), points, atol=1e-9)


@pytest.mark.parametrize(
    ("origin", "spacing", "direction"),
    [((0, 0), (1, 1, 1), (1, 0, 0, 0, 1, 0, 0, 0, 1)), ((0, 0, 0), (1, 0, 1), (1,) * 9)],
)
def test_bad_geometry_is_rejected(origin: tuple, spacing: tuple, direction: tuple) -> None:
    with pytest.raises(ValueError):
        Geometry(origin, spacing, direction)


def test_geometry_json_round_trip() -> None:
    geometry = Geometry((1.5, -2.0, 3.25), (0.7, 0.7, 2.5), (1, 0, 0, 0, 1, 0, 0, 0, -1))
    assert Geometry.from_json(geometry.to_json()) == geometry
