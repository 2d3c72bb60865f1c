"""Tests of the input pipelines: sources, the image-folder build, Grain iterators."""

import gzip
import io
import json
import os

import grain
import numpy as np
import pytest
from PIL import Image

from lapflow_jax.data import image_folder, pipeline, sources


class IndexSource:
    """Record i: a constant (h, w, 3) image of value i % 256 and label i."""

    def __init__(self, n, h=4, w=4):
        self.n, self.h, self.w = n, h, w

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"image": np.full((self.h, self.w, 3), i % 256, np.uint8), "label": int(i)}


class PatternSource:
    """Record i: a fixed random uint8 (h, w, 3) image (different per record)."""

    def __init__(self, n, h, w):
        self.images = np.random.default_rng(0).integers(0, 256, (n, h, w, 3), dtype=np.uint8)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": 0}


def _cfg(**overrides):
    cfg = pipeline.default_config()
    cfg.read_threads = 1
    cfg.prefetch_buffer_size = 2
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


# ----------------------------------------------------------------------------------------
# Config, shapes, class counts.


def test_shapes_and_num_classes_without_reading_data():
    cfg = _cfg(image_size=64, channels=3)
    assert pipeline.image_shape(cfg) == (64, 64, 3)
    assert pipeline.num_classes(cfg) == len(sources.DEMO_PHOTOS)
    cfg.use_labels = False
    assert pipeline.num_classes(cfg) == 0
    assert pipeline.num_classes(_cfg(name="fashion_mnist", channels=1)) == 10
    with pytest.raises(ValueError, match="data.name"):
        pipeline.image_shape(_cfg(name="cifar"))
    with pytest.raises(ValueError, match="data.crop"):
        pipeline.image_shape(_cfg(crop="corner"))
    with pytest.raises(ValueError, match="data.channels"):
        pipeline.image_shape(_cfg(channels=4))


# ----------------------------------------------------------------------------------------
# Demo photos.


def test_demo_batches_are_real_photos_in_range():
    cfg = _cfg(num_records=64, image_size=32)
    it = pipeline.make_train_iterator(cfg, global_batch_size=16, seed=0, process_index=0,
                                      process_count=1)
    batch = next(it)
    x, y = batch["image"], batch["label"]
    assert x.shape == (16, 32, 32, 3) and x.dtype == np.float32
    assert y.shape == (16,) and y.dtype == np.int32
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert x.min() < -0.8 and x.max() > 0.8  # uses the whole range
    assert set(y.tolist()) <= set(range(len(sources.DEMO_PHOTOS)))
    per_image_std = x.std(axis=(1, 2, 3))
    assert per_image_std.min() > 0.02, per_image_std  # no constant image
    assert per_image_std.mean() > 0.15, per_image_std
    # Natural photos are smooth: neighbouring pixels correlate strongly (noise would not).
    a, b = x[:, :, :-1].ravel(), x[:, :, 1:].ravel()
    assert np.corrcoef(a, b)[0, 1] > 0.6
    assert len({im.tobytes() for im in x}) == 16


def test_every_demo_photo_loads_offline_as_rgb():
    for name in sources.DEMO_PHOTOS:
        photo = sources.load_demo_photo(name)
        assert photo.dtype == np.uint8 and photo.ndim == 3 and photo.shape[-1] == 3, name
        assert min(photo.shape[:2]) >= 100 and photo.std() > 10, name
    with pytest.raises(ValueError, match="not_a_photo"):
        sources.load_demo_photo("not_a_photo")


def test_demo_source_is_deterministic_per_index_and_seed():
    a = sources.DemoPhotosSource(50, seed=1, record_size=16)
    b = sources.DemoPhotosSource(50, seed=1, record_size=16)
    c = sources.DemoPhotosSource(50, seed=2, record_size=16)
    for i in (0, 7, 49):
        np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
        assert a[i]["label"] == i % len(sources.DEMO_PHOTOS)
    assert any(not np.array_equal(a[i]["image"], c[i]["image"]) for i in range(5))
    # Reading out of order gives the same records.
    np.testing.assert_array_equal(b[49]["image"], a[49]["image"])
    with pytest.raises(IndexError):
        a[50]


# ----------------------------------------------------------------------------------------
# Determinism, augmentation, state.


def test_train_iterator_is_deterministic_from_seed():
    cfg = _cfg(num_records=40, image_size=16, crop="random")
    kw = dict(global_batch_size=8, process_index=0, process_count=1)
    first = _take(pipeline.make_train_iterator(cfg, seed=5, **kw), 6)  # crosses an epoch
    again = _take(pipeline.make_train_iterator(cfg, seed=5, **kw), 6)
    other = _take(pipeline.make_train_iterator(cfg, seed=6, **kw), 6)
    _assert_batches_equal(first, again)
    assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(first, other))
    with pytest.raises(ValueError, match="seed"):
        pipeline.make_train_iterator(cfg, seed=-1, **kw)


def test_random_crop_and_flip_are_crops_of_the_record_and_vary_by_epoch():
    src = PatternSource(5, h=6, w=10)
    cfg = _cfg(image_size=6, crop="random", random_flip=True, use_labels=False)
    prep = pipeline.Preprocess(num_records=5, image_size=6, channels=3, crop="random",
                               random_flip=True, use_labels=False, seed=3)
    seen = set()
    for index in range(5 * 8):  # 8 epochs of 5 records
        rec = src[index % 5]["image"]
        out = prep.map_with_index(index, {"image": rec})["image"]
        matches = [(left, flip) for left in range(5) for flip in (0, 1)
                   if np.array_equal(out, rec[:, left:left + 6][:, ::-1] if flip else rec[:, left:left + 6])]
        assert matches, index
        seen.update(matches)
        again = prep.map_with_index(index, {"image": rec})["image"]
        np.testing.assert_array_equal(out, again)
    assert {f for _, f in seen} == {0, 1} and len({left for left, _ in seen}) >= 3
    # One record gets fresh draws each epoch (index = epoch * num_records + record).
    rec = src[2]["image"]
    per_epoch = {prep.map_with_index(2 + 5 * e, {"image": rec})["image"].tobytes() for e in range(8)}
    assert len(per_epoch) >= 3
    # Through the iterator: images in [-1, 1] match (u8 / 127.5 - 1) of some crop.
    it = pipeline.make_train_iterator(cfg, global_batch_size=5, seed=0, process_index=0,
                                      process_count=1, source=src)
    batch = next(it)["image"]
    u8 = np.rint((batch + 1.0) * 127.5)
    np.testing.assert_allclose(u8 / 127.5 - 1.0, batch, atol=1e-6)


def test_center_crop_resize_is_antialiased_and_channels_convert():
    checker = (np.indices((64, 96)).sum(0) % 2 * 255).astype(np.uint8)
    prep = pipeline.Preprocess(num_records=1, image_size=8, channels=3, crop="center",
                               random_flip=False, use_labels=True, seed=0)
    out = prep.map_with_index(0, {"image": checker, "label": 3})
    assert out["image"].shape == (8, 8, 3) and out["label"] == 3
    # A 1-pixel checkerboard averages to mid grey; point sampling would give 0 or 255.
    assert np.abs(out["image"].astype(float) - 127.5).max() < 10
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 1] = 200
    gray = pipeline.Preprocess(num_records=1, image_size=8, channels=1, crop="center",
                               random_flip=False, use_labels=False, seed=0)
    g = gray.map_with_index(0, {"image": rgb, "label": 5})
    assert g["image"].shape == (8, 8, 1) and g["label"] == 0
    assert abs(int(g["image"][0, 0, 0]) - round(0.587 * 200)) <= 1  # ITU-R 601 luma


def test_iterator_state_restores_exactly_without_workers():
    cfg = _cfg(num_records=24, image_size=16, crop="random")
    kw = dict(global_batch_size=8, seed=11, process_index=0, process_count=1)
    it = pipeline.make_train_iterator(cfg, **kw)
    _take(it, 4)  # past the first epoch (3 batches)
    state = it.get_state()
    want = _take(it, 5)
    restored = pipeline.make_train_iterator(cfg, **kw)
    restored.set_state(json.loads(json.dumps(state)))  # survives a JSON round trip
    _assert_batches_equal(want, _take(restored, 5))


def test_orbax_checkpoint_manager_saves_and_restores_the_iterator(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    cfg = _cfg(num_records=32, image_size=8)
    kw = dict(global_batch_size=4, seed=2, process_index=0, process_count=1)
    it = pipeline.make_train_iterator(cfg, **kw)
    _take(it, 3)
    mngr = ocp.CheckpointManager(tmp_path, item_handlers={
        "state": ocp.StandardCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler()})
    mngr.save(3, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"w": np.arange(3.0)}),
        data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    want = _take(it, 3)
    fresh = pipeline.make_train_iterator(cfg, **kw)
    out = mngr.restore(3, args=ocp.args.Composite(
        state=ocp.args.StandardRestore({"w": np.zeros(3)}),
        data=grain.checkpoint.CheckpointRestore(fresh)))
    np.testing.assert_array_equal(out["state"]["w"], np.arange(3.0))
    _assert_batches_equal(want, _take(fresh, 3))
    mngr.close()


@pytest.mark.slow  # spawning 2 Grain workers takes ~20 s per iterator on 2 busy cores
def test_iterator_state_restores_exactly_with_workers():
    cfg = _cfg(num_records=48, image_size=16, crop="random", num_workers=2)
    kw = dict(global_batch_size=8, seed=4, process_index=0, process_count=1)
    it = pipeline.make_train_iterator(cfg, **kw)
    before = _take(it, 3)
    state = it.get_state()
    want = _take(it, 6)
    it.close()
    restored = pipeline.make_train_iterator(cfg, **kw)
    restored.set_state(state)
    got = _take(restored, 6)
    restored.close()
    _assert_batches_equal(want, got)
    # Workers do not change the data either.
    cfg.num_workers = 0
    _assert_batches_equal(before + want, _take(pipeline.make_train_iterator(cfg, **kw), 9))


# ----------------------------------------------------------------------------------------
# Per-host sharding.


@pytest.mark.parametrize("process_count", [1, 2, 3, 4])
def test_host_shards_are_disjoint_equal_and_cover_the_data(process_count):
    n = 22  # not a multiple of 3 or 4: the remainder (< process_count) is dropped
    cfg = _cfg(image_size=4, random_flip=False)
    per_host = n // process_count
    shards = []
    for p in range(process_count):
        it = pipeline.make_train_iterator(cfg, global_batch_size=process_count, seed=9,
                                          process_index=p, process_count=process_count,
                                          source=IndexSource(n))
        labels = np.concatenate([next(it)["label"] for _ in range(per_host)])  # one epoch
        assert len(set(labels.tolist())) == per_host  # each record once per epoch
        np.testing.assert_array_equal(np.sort(labels), pipeline.shard_indices(n, p, process_count))
        shards.append(set(labels.tolist()))
    assert all(len(s) == per_host for s in shards)
    union = set().union(*shards)
    assert sum(len(s) for s in shards) == len(union)  # disjoint
    assert union == set(range(per_host * process_count))
    assert n - len(union) == n % process_count < process_count
    # The image follows its record through the pipeline.
    it = pipeline.make_train_iterator(cfg, global_batch_size=process_count, seed=9,
                                      process_index=0, process_count=process_count,
                                      source=IndexSource(n))
    batch = next(it)
    np.testing.assert_allclose(batch["image"][:, 0, 0, 0], batch["label"] / 127.5 - 1, atol=1e-6)


def test_batch_size_must_divide_by_process_count():
    with pytest.raises(ValueError, match="multiple of the process count 3"):
        pipeline.make_train_iterator(_cfg(), global_batch_size=8, seed=0, process_index=0,
                                     process_count=3, source=IndexSource(30))
    with pytest.raises(ValueError, match="process_index and process_count"):
        pipeline.make_train_iterator(_cfg(), global_batch_size=8, seed=0, process_index=0,
                                     source=IndexSource(30))


@pytest.mark.parametrize("process_count", [1, 3])
def test_eval_iterator_reads_every_record_once_with_padding(process_count):
    n, batch_size = 23, 3 * 2
    cfg = _cfg(image_size=4, crop="random", random_flip=True)
    counts = []
    labels = []
    for p in range(process_count):
        it = pipeline.make_eval_iterator(
            cfg, batch_size=batch_size, split="test", process_index=p,
            process_count=process_count, source=IndexSource(n))
        batches = list(it)
        counts.append(len(batches))
        for b in batches:
            assert b["image"].shape == (batch_size // process_count, 4, 4, 3)
            assert b["mask"].dtype == bool
            labels += b["label"][b["mask"]].tolist()
            assert (b["image"][~b["mask"]] == -1).all()
    assert len(set(counts)) == 1  # hosts stay in lock-step
    assert counts[0] == pipeline.eval_num_batches(n, batch_size, process_count)
    assert sorted(labels) == list(range(n))
    # Deterministic: no shuffle, center crop, no flip (same as a second pass).
    first = list(pipeline.make_eval_iterator(cfg, batch_size=4, split="test", source=PatternSource(8, 4, 6)))
    second = list(pipeline.make_eval_iterator(cfg, batch_size=4, split="test", source=PatternSource(8, 4, 6)))
    _assert_batches_equal(first, second)
    np.testing.assert_allclose(first[0]["image"][0], PatternSource(8, 4, 6)[0]["image"][:, 1:5] / 127.5 - 1,
                               atol=1e-6)


# ----------------------------------------------------------------------------------------
# Image folder and tfds.


def _jpeg_bytes(array, **kw):
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="JPEG", **kw)
    return out.getvalue()


@pytest.fixture(scope="module")
def built_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    (root / "birds" / "nested").mkdir(parents=True)
    (root / "cats").mkdir()
    (root / ".hidden").mkdir()
    smooth = np.linspace(0, 255, 40 * 60 * 3).reshape(40, 60, 3).astype(np.uint8)
    (root / "birds" / "a.jpg").write_bytes(_jpeg_bytes(smooth, quality=95))
    Image.fromarray(np.full((20, 24), 90, np.uint8), "L").save(root / "birds" / "nested" / "gray.png")
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:8, :, 3] = 255  # top half opaque red, bottom half transparent
    Image.fromarray(rgba, "RGBA").save(root / "cats" / "rgba.PNG")
    Image.new("CMYK", (12, 12), (0, 255, 255, 0)).save(root / "cats" / "cmyk.jpg")
    broken = _jpeg_bytes(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    (root / "cats" / "truncated.jpg").write_bytes(broken[: len(broken) // 3])
    (root / "cats" / "garbage.png").write_bytes(b"not a png at all")
    (root / "cats" / "notes.txt").write_text("ignored")
    (root / ".hidden" / "x.png").write_bytes(b"ignored too")
    data_dir = tmp_path_factory.mktemp("tfds")
    return root, str(data_dir), image_folder.build_image_folder(root, str(data_dir))


def test_image_folder_build_skips_corrupt_files_and_converts_to_rgb(built_folder):
    root, data_dir, built = built_folder
    assert built.classes == ("birds", "cats")
    assert built.num_examples == 4
    assert sorted(p for p, _ in built.skipped) == ["cats/garbage.png", "cats/truncated.jpg"]
    assert os.path.isfile(os.path.join(built.path, image_folder.SKIPPED_FILENAME))
    source = sources.tfds_source(built.tfds_name, data_dir=data_dir, split="train")
    records = {bytes(r["path"]).decode(): r for r in (source[i] for i in range(len(source)))}
    assert set(records) == {"birds/a.jpg", "birds/nested/gray.png", "cats/rgba.PNG", "cats/cmyk.jpg"}
    assert {k: r["label"] for k, r in records.items()} == {
        "birds/a.jpg": 0, "birds/nested/gray.png": 0, "cats/rgba.PNG": 1, "cats/cmyk.jpg": 1}
    images = {k: sources.decode_image(r["image"]) for k, r in records.items()}
    assert all(im.shape[-1] == 3 and im.dtype == np.uint8 for im in images.values())
    assert records["birds/a.jpg"]["image"] == (root / "birds" / "a.jpg").read_bytes()  # kept as is
    assert (images["birds/nested/gray.png"] == 90).all()
    np.testing.assert_array_equal(images["cats/rgba.PNG"][:8].reshape(-1, 3), [[200, 0, 0]] * 128)
    np.testing.assert_array_equal(images["cats/rgba.PNG"][8:].reshape(-1, 3), [[255, 255, 255]] * 128)
    assert np.abs(images["cats/cmyk.jpg"].astype(int) - [255, 0, 0]).max() <= 2
    # A second build reuses the dataset and its record of skipped files.
    again = image_folder.build_image_folder(root, data_dir)
    assert again.path == built.path and again.skipped == built.skipped


def test_image_folder_and_tfds_configs_feed_the_pipeline(built_folder):
    root, data_dir, built = built_folder
    cfg = _cfg(name="image_folder", folder=str(root), data_dir=data_dir, image_size=8)
    assert pipeline.num_classes(cfg) == 2
    batch = next(pipeline.make_train_iterator(cfg, global_batch_size=4, seed=0,
                                              process_index=0, process_count=1))
    assert batch["image"].shape == (4, 8, 8, 3) and sorted(batch["label"].tolist()) == [0, 0, 1, 1]
    # The same files through the generic tfds path, name without a version.
    name = built.tfds_name.split(":")[0]
    tcfg = _cfg(name="tfds", tfds_name=name, data_dir=data_dir, image_size=8, channels=1)
    assert pipeline.num_classes(tcfg) == 2
    ev = list(pipeline.make_eval_iterator(tcfg, batch_size=3, split="train[:3]"))
    assert [b["mask"].sum() for b in ev] == [3]
    assert ev[0]["image"].shape == (3, 8, 8, 1)
    with pytest.raises(ValueError, match="no split 'validation'"):
        sources.tfds_source(name, data_dir=data_dir, split="validation")


def test_flat_folder_is_unlabelled(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(tmp_path / "imgs" / "one.png")
    listing = image_folder.list_image_folder(tmp_path / "imgs")
    assert listing.classes == () and listing.labels == (0,)
    assert pipeline.num_classes(_cfg(name="image_folder", folder=str(tmp_path / "imgs"))) == 0


def test_image_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    (empty / "cls" / "readme.txt").write_text("no images")
    with pytest.raises(ValueError, match="contains no JPEG/PNG files"):
        image_folder.build_image_folder(empty, str(tmp_path / "tfds"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        image_folder.build_image_folder(tmp_path / "nope", str(tmp_path / "tfds"))
    with pytest.raises(ValueError, match="data.folder is empty"):
        image_folder.list_image_folder("")
    mixed = tmp_path / "mixed"
    (mixed / "a").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(mixed / "top.png")
    Image.new("RGB", (4, 4)).save(mixed / "a" / "in.png")
    with pytest.raises(ValueError, match="mixes images at its top level"):
        image_folder.list_image_folder(mixed)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(ValueError, match="none of its 1 JPEG/PNG files could be decoded"):
        image_folder.build_image_folder(bad, str(tmp_path / "tfds"))


def test_missing_tfds_data_gives_a_clear_error(tmp_path):
    missing = tmp_path / "no_such_dir"
    cfg = _cfg(name="tfds", tfds_name="celeb_a_hq/256", data_dir=str(missing))
    with pytest.raises(FileNotFoundError) as e:
        pipeline.make_train_iterator(cfg, global_batch_size=2, seed=0, process_index=0, process_count=1)
    msg = str(e.value)
    assert str(missing) in msg and "does not exist" in msg
    assert "tfds build celeb_a_hq/256" in msg and "--file_format=array_record" in msg
    assert "lapflow-jax[prepare]" in msg and "--manual_dir" in msg
    with pytest.raises(FileNotFoundError, match=r"imagenet2012.*not prepared under .*imagenet2012"):
        sources.tfds_source("imagenet2012", data_dir=str(tmp_path))
    # A TFRecord build (tfds's default) cannot be read randomly: say so.
    version = tmp_path / "celeb_a_hq" / "1024" / "2.0.0"
    version.mkdir(parents=True)
    (version / "dataset_info.json").write_text(json.dumps({"fileFormat": "tfrecord"}))
    with pytest.raises(ValueError, match="rebuild it with --file_format=array_record"):
        sources.tfds_source("celeb_a_hq/1024", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="tfds_name is empty"):
        sources.find_tfds_dataset_dir("", str(tmp_path))


# ----------------------------------------------------------------------------------------
# Fashion-MNIST.


def test_read_idx_plain_gzipped_and_truncated(tmp_path):
    data = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 0x08, 3]) + b"".join(d.to_bytes(4, "big") for d in data.shape) + data.tobytes()
    (tmp_path / "a").write_bytes(raw)
    (tmp_path / "a.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "short").write_bytes(raw[:-1])
    np.testing.assert_array_equal(sources.read_idx(tmp_path / "a"), data)
    np.testing.assert_array_equal(sources.read_idx(tmp_path / "a.gz"), data)
    with pytest.raises(ValueError, match="truncated"):
        sources.read_idx(tmp_path / "short")
    (tmp_path / "zip").write_bytes(b"PK\x03\x04....")
    with pytest.raises(ValueError, match="not an idx file"):
        sources.read_idx(tmp_path / "zip")


@pytest.mark.skipif(not os.path.isdir(sources.FASHION_MNIST_DIR),
                    reason=f"Debian dataset-fashion-mnist not installed ({sources.FASHION_MNIST_DIR})")
def test_fashion_mnist_reads_both_splits_padded():
    test = sources.FashionMnistSource("test", pad_to=32)
    assert len(test) == 10000
    rec = test[0]
    assert rec["image"].shape == (32, 32, 1) and rec["image"].dtype == np.uint8
    assert rec["label"] == 9  # the first test image is an ankle boot
    raw = sources.read_idx(test.images_path)[0]
    np.testing.assert_array_equal(rec["image"][2:30, 2:30, 0], raw)
    assert rec["image"][:2].max() == 0 and rec["image"][:, 30:].max() == 0
    labels = sources.read_idx(test.labels_path)
    assert np.bincount(labels, minlength=10).tolist() == [1000] * 10
    assert len(sources.FashionMnistSource("train", pad_to=0)) == 60000
    with pytest.raises(ValueError, match="'train' or 'test'"):
        sources.FashionMnistSource("validation")
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        sources.FashionMnistSource("test", data_dir="/nonexistent/fashion")
    cfg = _cfg(name="fashion_mnist", channels=1, image_size=32)
    batch = next(pipeline.make_eval_iterator(cfg, batch_size=8, split="test", max_records=8))
    assert batch["image"].shape == (8, 32, 32, 1)
    np.testing.assert_array_equal(batch["label"], labels[:8])
    np.testing.assert_allclose(batch["image"][0, 2:30, 2:30, 0], raw / 127.5 - 1, atol=1e-6)


# ----------------------------------------------------------------------------------------
# scikit-learn's digits (the demo's data).


def test_digits_splits_are_disjoint_balanced_and_reach_the_pipeline():
    train, test = sources.DigitsSource("train"), sources.DigitsSource("test")
    assert (len(train), len(test)) == (1497, 300)
    record = test[0]
    assert record["image"].shape == (8, 8, 1) and record["image"].dtype == np.uint8
    assert max(int(test[i]["image"].max()) for i in range(len(test))) == 255  # full ink (16 in the file) is white
    train_images = {train[i]["image"].tobytes() for i in range(len(train))}
    test_labels = []
    for i in range(len(test)):
        assert test[i]["image"].tobytes() not in train_images
        test_labels.append(test[i]["label"])
    assert np.bincount(test_labels, minlength=10).min() >= 25  # every class held out
    with pytest.raises(ValueError, match="data.split"):
        sources.DigitsSource("validation")
    cfg = _cfg(name="digits", channels=1, image_size=32, random_flip=False)
    assert pipeline.num_classes(cfg) == 10
    batch = next(pipeline.make_eval_iterator(cfg, batch_size=10, split="test", process_index=0, process_count=1))
    assert batch["image"].shape == (10, 32, 32, 1)
    assert batch["label"].tolist() == test_labels[:10]
    assert -1.0 <= batch["image"].min() < -0.9 and batch["image"].max() > 0.9  # black ground, white ink

