"""The shard reader: validation against the manifest, in-memory and streamed reads agree."""

import json
import os
import shutil

import h5py
import numpy as np
import pytest

from hpcdd.augmentation import Augmentation
from hpcdd.data import ShardReader, SplitData, StreamPlan, crop, stream_plan
from hpcdd.errors import UserError
from hpcdd.manifest import load_manifest
from tests.helpers import flip_pixel_bytes, prepare


@pytest.fixture()
def data(tmp_path, fashion_dir):
    out = tmp_path / "d"
    prepare(fashion_dir, out, grid="2x2", overlap=1, train=400, test=100, extra=("--margin", "2"))
    return out


def test_reader_validates_and_reads(data):
    m = load_manifest(str(data))
    for i in range(4):
        with ShardReader(m, i) as r:
            r.validate(deep=True)
            x, y, ids = r.read("train")
            assert x.shape == (m.count("train"),) + r.expected_shape()
    with ShardReader(m, None) as r:
        r.validate()


def test_streaming_equals_in_memory(data):
    m = load_manifest(str(data))
    r = ShardReader(m, 2)
    mem = SplitData.load(r, "train")
    stream = SplitData.load(ShardReader(m, 2), "train", memory_limit=1)
    assert mem.in_memory and not stream.in_memory
    rows = np.array([7, 3, 3, 100, 0, 55])
    shifts = np.array([[0, 0], [1, -2], [2, 2], [-1, 0], [0, 1], [-2, -2]])
    xa, ya = mem.batch(rows, Augmentation(shifts))
    xb, yb = stream.batch(rows, Augmentation(shifts))
    assert xa.shape == (6, 1, 15, 15)
    np.testing.assert_array_equal(xa.numpy(), xb.numpy())
    np.testing.assert_array_equal(ya.numpy(), yb.numpy())


def test_chunked_order_reads_whole_blocks_window_by_window():
    from hpcdd.training.rng import chunked_permutation

    n, block, window = 5000, 256, 1024
    order = chunked_permutation(7, n, block, window)
    assert sorted(order.tolist()) == list(range(n))
    np.testing.assert_array_equal(order, chunked_permutation(7, n, block, window))
    assert not np.array_equal(order, chunked_permutation(8, n, block, window))
    blocks = order // block
    # every stretch of the order holds whole blocks, at most window // block of them
    seen, start = set(), 0
    for pos in range(n + 1):
        if pos == n or (blocks[pos] not in seen and len(seen) == window // block):
            stretch = blocks[start:pos]
            assert len(set(stretch.tolist())) <= window // block
            assert all((stretch == b).sum() == min(block, n - b * block) for b in set(stretch.tolist()))
            if pos < n:
                seen, start = set(), pos
        if pos < n:
            seen.add(int(blocks[pos]))
    assert np.abs(np.diff(order)).mean() > 50  # shuffled within windows, not read in order


def test_streamed_epoch_read_ahead_gives_the_in_memory_rows(data):
    """A streamed split serves an epoch (also from a step in the middle, as after a resume) with
    exactly the rows of the in-memory split."""
    from hpcdd.training.rng import stream_of

    m = load_manifest(str(data))
    assert stream_plan(m, range(m.n), "train", 1) == StreamPlan(1024, 1024)
    plan = StreamPlan(32, 96)  # many windows in this small split
    mem = SplitData.load(ShardReader(m, 3), "train", plan=plan)
    streamed = SplitData.load(ShardReader(m, 3), "train", memory_limit=1, plan=plan)
    assert mem.in_memory and not streamed.in_memory
    batches = stream_of(0, "local", 3).batches(2, len(mem), 64, plan)
    for start in (0, len(batches) // 2):
        streamed.schedule(np.concatenate(batches))
        for rows in batches[start:]:
            shifts = np.random.default_rng(len(rows)).integers(-1, 2, size=(len(rows), 2))
            xa, ya = mem.batch(rows, Augmentation(shifts))
            xb, yb = streamed.batch(rows, Augmentation(shifts))
            np.testing.assert_array_equal(xa.numpy(), xb.numpy())
            np.testing.assert_array_equal(ya.numpy(), yb.numpy())
    streamed.close()


def test_shift_is_a_global_translation(data):
    """Shifted subimages are boxes of the translated full image: every subdomain moves alike."""
    m = load_manifest(str(data))
    full = SplitData.load(ShardReader(m, None), "val")
    rows = np.arange(5)
    shifts = np.array([[1, -2], [0, 0], [-2, 2], [2, 1], [-1, -1]])
    moved, _ = full.batch(rows, Augmentation(shifts))
    for i in range(4):
        sub = SplitData.load(ShardReader(m, i), "val")
        xs, _ = sub.batch(rows, Augmentation(shifts))
        (a, b), (c, e) = m.boxes[i]
        np.testing.assert_allclose(xs.numpy(), moved[..., a:b, c:e].numpy())


@pytest.mark.parametrize("limit", [1 << 30, 1])
def test_flip_is_the_whole_image_flipped(data, limit):
    """A flipped sample of subdomain (r, c) is box (r, c) of the flipped (and then shifted) full image:
    the mirror (r, 1-c)'s subimage flipped; in memory and streamed alike."""
    from hpcdd.factory import DataCache

    m = load_manifest(str(data))
    cache = DataCache(m, limit / (1 << 30))
    rows = np.array([4, 0, 9, 2, 7, 1])
    aug = Augmentation(np.array([[1, -2], [0, 0], [-2, 2], [2, 1], [-1, -1], [0, 2]]),
                       np.array([True, True, False, True, False, True]))
    full = cache(None, "train", mirrored=True)
    assert full.mirror is full and full.in_memory == (limit > 1)
    whole = SplitData.load(ShardReader(m, None), "train")  # no flip, reference
    flipped = whole._rows(rows)[0]
    flipped[aug.flips] = flipped[aug.flips].flip(-1)
    moved = crop(flipped, m.margin, aug.shifts)
    np.testing.assert_array_equal(full.batch(rows, aug)[0].numpy(), moved.numpy())
    for i in range(4):
        sub = cache(i, "train", mirrored=True)
        assert sub.mirror is cache(m.decomposition().mirror(i), "train")
        xs, ys = sub.batch(rows, aug)
        (a, b), (c, e) = m.boxes[i]
        np.testing.assert_array_equal(xs.numpy(), moved[..., a:b, c:e].numpy())
        np.testing.assert_array_equal(ys.numpy(), whole.y[rows].numpy())
    with pytest.raises(RuntimeError, match="mirror"):
        SplitData.load(ShardReader(m, 0), "train").batch(rows, aug)


def test_crop_without_shift_is_centre():
    import torch

    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    assert torch.equal(crop(x, 2), x[..., 2:6, 2:6])


def _corrupt(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 3)


def test_truncated_shard_is_a_user_error(data):
    m = load_manifest(str(data))
    _corrupt(data / "sub_001.h5")
    with pytest.raises(UserError, match="sub_001.h5"):
        ShardReader(m, 1).validate()


def test_shards_from_another_preparation_are_refused(tmp_path, data, fashion_dir):
    other = tmp_path / "other"
    prepare(fashion_dir, other, grid="2x2", overlap=1, train=400, test=100, extra=("--seed", "5", "--margin", "2"))
    shutil.copy(other / "sub_003.h5", data / "sub_003.h5")
    m = load_manifest(str(data))
    new = json.load(open(other / "manifest.json"))["prep_id"]
    # found when the file is opened (at validation, or when a run reopens a shard replaced under it)
    with pytest.raises(UserError, match=f"sub_003.h5: holds prep id {new} but the manifest says {m.prep_id}: "):
        ShardReader(m, 3).validate()


def test_manifest_problems(tmp_path, data):
    with pytest.raises(UserError, match="no such directory"):
        load_manifest(str(tmp_path / "missing"))
    (data / "manifest.json").write_text("{ not json")
    with pytest.raises(UserError, match="corrupt JSON"):
        load_manifest(str(data))
    (data / "manifest.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(UserError, match="missing keys"):
        load_manifest(str(data))


def test_missing_shard(data):
    m = load_manifest(str(data))
    os.unlink(data / "sub_000.h5")
    with pytest.raises(UserError, match="missing shard"):
        ShardReader(m, 0).validate()


def test_nan_pixels_found_by_deep_validation(tmp_path):
    from data_prep.sources import Source, Split
    from data_prep.writer import write_dataset

    x = np.random.default_rng(0).normal(size=(60, 1, 8, 8)).astype(np.float32)
    y = np.arange(60) % 3
    src = Source("t", "npz", ["a", "b", "c"], Split(x, y, np.arange(60)), Split(x[:9], y[:9], 60 + np.arange(9)))
    npz = tmp_path / "src.npz"
    np.savez(npz, x=x, y=y)
    src.files = [str(npz)]
    write_dataset(src, str(tmp_path / "o"), (2, 2), 0, 0, 0.2, 0, progress=False)
    with h5py.File(tmp_path / "o" / "sub_002.h5", "r+") as f:
        f["train"]["x"][3, 0, 1, 1] = np.nan
    m = load_manifest(str(tmp_path / "o"))
    ShardReader(m, 2).validate(deep=False)
    with pytest.raises(UserError, match="NaN or Inf"):
        ShardReader(m, 2).validate(deep=True)


@pytest.mark.slow
def test_training_on_streamed_shards_equals_in_memory(data):
    """A shard too large for memory is streamed; training on it gives the same weights."""
    import torch

    from hpcdd.config import ModelConfig, TrainConfig
    from hpcdd.models import build_model
    from hpcdd.training.fit import Fit, fit
    from hpcdd.training.rng import stream_of

    m = load_manifest(str(data))
    states = []
    plan = stream_plan(m, [1], "train", 1)
    assert plan is not None and plan.window >= plan.block
    for limit in (1 << 30, 1):
        train = SplitData.load(ShardReader(m, 1), "train", memory_limit=limit, plan=plan)
        val = SplitData.load(ShardReader(m, 1), "val", memory_limit=limit)
        assert train.in_memory == (limit > 1)
        torch.manual_seed(0)
        model = build_model(ModelConfig(widths=[8, 16]), 1, (15, 15), 10, 1.0)
        res, = fit(model, Fit(name="local subdomain 1", train=train, val=val,
                             t=TrainConfig(epochs=1, batch_size=32, augment_shift=2), stream=stream_of(0, "local", 1),
                             device=torch.device("cpu")))
        states.append(res.best["model"])
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


@pytest.mark.parametrize("streamed", [False, True])
def test_damaged_pixels_are_named_by_shard_split_and_chunk(data, streamed):
    """Bytes flipped inside one chunk of a shard's images: HDF5's checksum (fletcher32) fails the read,
    in memory or streamed, in one line naming the shard, the split and the chunk."""
    flip_pixel_bytes(data / "sub_001.h5", "train", 1)
    m = load_manifest(str(data))
    with h5py.File(data / "sub_001.h5") as f:
        rows, n = f["train/x"].chunks[0], f["train/x"].shape[0]
    with pytest.raises(UserError, match=rf"sub_001.h5: damaged data in train/x chunk 1 \(images {rows}..{min(2 * rows, n) - 1}\): "
                                        r"checksum mismatch"):
        split = SplitData.load(ShardReader(m, 1), "train", memory_limit=1 if streamed else 1 << 30)
        if streamed:
            split.batch(np.arange(len(split)))
    ShardReader(m, 1).validate()  # labels and ids intact: only pixel reads find it


def test_labels_changed_in_one_shard_are_refused(data):
    """One shard's labels shifted by one class, written through HDF5 (checksums recomputed): its labels no
    longer match the manifest's digest, which every rank checks for its shards at start."""
    with h5py.File(data / "sub_002.h5", "r+") as f:
        f["train/y"][...] = (f["train/y"][:] + 1) % 10
    with pytest.raises(UserError, match="sub_002.h5: train labels differ from the manifest's"):
        ShardReader(load_manifest(str(data)), 2).validate()


def test_an_edited_manifest_is_refused_and_can_be_resealed(data):
    """A digit changed inside manifest.json (still a valid manifest) is refused as edited; `hpcdd-prep reseal`
    makes a deliberate edit the preparation's own."""
    from data_prep.cli import main

    text = (data / "manifest.json").read_text()
    m = json.loads(text)
    edited = text.replace(json.dumps(m["std"][0]), json.dumps(m["std"][0] * 2), 1)
    assert edited != text
    (data / "manifest.json").write_text(edited)
    with pytest.raises(UserError, match=f"manifest.json: edited after data_prep .*hpcdd-prep reseal {data}"):
        load_manifest(str(data))
    assert main(["reseal", str(data)]) == 0
    assert load_manifest(str(data)).std[0] == pytest.approx(m["std"][0] * 2)


def test_each_epoch_logs_the_learning_rate_it_trained_at(data):
    """The epoch record's lr is the rate of that epoch (read before the schedule steps): cosine over 3
    epochs trains at lr, lr (1 + cos(pi/3)) / 2, lr (1 + cos(2 pi/3)) / 2."""
    import math

    import torch

    from hpcdd.config import ModelConfig, TrainConfig
    from hpcdd.models import build_model
    from hpcdd.training.fit import Fit, fit
    from hpcdd.training.rng import stream_of

    m = load_manifest(str(data))
    torch.manual_seed(0)
    model = build_model(ModelConfig(widths=[4, 8]), 1, (15, 15), 10, 1.0)
    res, = fit(model, Fit(name="local subdomain 1", train=SplitData.load(ShardReader(m, 1), "train"),
                         val=SplitData.load(ShardReader(m, 1), "val"), t=TrainConfig(epochs=3, batch_size=64, lr=0.01),
                         stream=stream_of(0, "local", 1), device=torch.device("cpu")))
    assert [e["lr"] for e in res.history] == pytest.approx([0.01 * (1 + math.cos(math.pi * e / 3)) / 2 for e in range(3)])
