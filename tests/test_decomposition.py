import numpy as np
import pytest

from hpcdd.decomposition import Decomposition, parse_grid
from hpcdd.errors import UserError
from tests.helpers import prepare


@pytest.mark.parametrize("shape,grid,overlap", [((28, 28), (4, 4), 2), ((32, 32), (2, 2), 0), ((28, 28), (3, 3), 1),
                                                ((30, 20), (2, 4), 3), ((16, 16, 16), (2, 2, 2), 2), ((9, 12, 7), (3, 2, 1), 1)])
def test_boxes_cover_image_and_overlap_is_exact(shape, grid, overlap):
    d = Decomposition(shape, grid, overlap)
    assert d.n == int(np.prod(grid))
    covered = np.zeros(shape, dtype=int)
    core = np.zeros(shape, dtype=int)
    for i in range(d.n):
        box = d.box(i)
        covered[tuple(slice(a, b) for a, b in box)] += 1
        coords = d.coords(i)
        for axis, (a, b) in enumerate(box):
            pa, pb = d.parts(axis)[coords[axis]]
            # overlap grows interior sides by exactly `overlap`, never the image border
            assert pa - a == (overlap if coords[axis] > 0 else 0)
            assert b - pb == (overlap if coords[axis] < grid[axis] - 1 else 0)
        core[tuple(slice(*d.parts(ax)[c]) for ax, c in enumerate(coords))] += 1
    assert covered.min() >= 1
    assert (core == 1).all(), "non-overlapping parts tile the image exactly once"
    if overlap == 0:
        assert (covered == 1).all()


def test_overlap_width_between_neighbours():
    d = Decomposition((28, 28), (2, 2), 2)
    (y0, y1), (x0, x1) = d.box(0)
    (v0, v1), (u0, u1) = d.box(1)
    assert (y0, y1) == (v0, v1) == (0, 16)
    assert x1 - u0 == 4  # 2 pixels on each side of the interface
    assert d.neighbours(0) == [1, 2]


def test_cut_matches_numpy_slicing():
    x = np.arange(2 * 3 * 10 * 12).reshape(2, 3, 10, 12)
    d = Decomposition((10, 12), (2, 3), 1)
    for i in range(d.n):
        (a, b), (c, e) = d.box(i)
        np.testing.assert_array_equal(d.cut(x, i), x[:, :, a:b, c:e])


def test_cut_with_margin():
    x = np.arange(10 * 10).reshape(1, 1, 10, 10)
    padded = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)))
    d = Decomposition((10, 10), (2, 2), 0)
    sub = d.cut(padded, 3, margin=2)
    assert sub.shape == (1, 1, 9, 9)
    np.testing.assert_array_equal(sub[..., 2:-2, 2:-2], x[..., 5:, 5:])


@pytest.mark.parametrize("shape,grid,overlap,needle", [
    ((28, 28), (29, 1), 0, "height 28 cannot be split into 29"),
    ((28, 10), (1, 11), 0, "width 10 cannot be split into 11"),
    ((28, 28), (4, 4), 7, "smaller than the smallest subdomain height (7 pixels"),
    ((28, 28), (2, 2), -1, "non-negative"),
    ((28, 28), (2, 2, 2), 0, "data are 2D images"),
    ((8, 28, 28), (2, 2), 0, "give 3 counts"),
    ((8, 28, 28), (9, 1, 1), 0, "depth 8 cannot be split"),
])
def test_validation_names_the_dimension(shape, grid, overlap, needle):
    with pytest.raises(UserError, match="^.*" + __import__("re").escape(needle)):
        Decomposition(shape, grid, overlap)


def test_parse_grid():
    assert parse_grid("4x4") == (4, 4)
    assert parse_grid("2X3x1") == (2, 3, 1)
    for bad in ("4", "0x2", "ax2", "1x2x3x4", ""):
        with pytest.raises(UserError):
            parse_grid(bad)


def test_shard_subimages_equal_boxes_of_real_fashion_mnist(tmp_path, fashion_dir):
    """A subimage read from a shard equals the same box cut from the original IDX image."""
    import h5py

    from data_prep.sources import read_idx

    m = prepare(fashion_dir, tmp_path / "d", grid="4x4", overlap=2, train=500, test=200)
    original = read_idx(f"{fashion_dir}/train-images-idx3-ubyte.gz")
    test_original = read_idx(f"{fashion_dir}/t10k-images-idx3-ubyte.gz")
    for i in (0, 5, 15):
        with h5py.File(tmp_path / "d" / f"sub_{i:03d}.h5", "r") as f:
            (a, b), (c, e) = m["boxes"][i]
            for split in ("train", "val"):
                ids = f[split]["sample_id"][:]
                np.testing.assert_array_equal(f[split]["x"][:, 0], original[ids, a:b, c:e])
            ids = f["test"]["sample_id"][:] - 60000
            np.testing.assert_array_equal(f["test"]["x"][:, 0], test_original[ids, a:b, c:e])
