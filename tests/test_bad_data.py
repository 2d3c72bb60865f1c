"""Bad input data: what the pipeline converts, what it skips (counted, logged with ids), and when
it stops with a clear error. docs/troubleshooting.md is the table these tests back.

Decisions per case:
  - grayscale, RGBA/LA (composited onto white), CMYK, 16-bit: converted to RGB (or to gray when
    config.data.channels = 1);
  - truncated or corrupt JPEG/PNG, NaN/Inf pixel arrays, images whose short side is below
    data.min_side_ratio x data.image_size: skipped (replaced by the next usable record, counted,
    logged once with the record's id and reason, in the main process even with worker processes);
  - more than data.max_skipped_fraction of a host's records bad: the run stops, listing them;
  - empty or missing folder, missing tfds data_dir, blank images (no signal to normalise):
    the run stops before anything compiles, naming the config field and the path.
"""

import io
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lapflow_jax import train
from lapflow_jax.data import pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import tiny_config  # noqa: E402


def _encode(array_or_image, fmt, **kw):
    img = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    out = io.BytesIO()
    img.save(out, format=fmt, **kw)
    return out.getvalue()


def _good_jpeg(value):
    return _encode(np.full((20, 24, 3), value, np.uint8), "JPEG", quality=95)


def _records():
    """Eight records as a tfds dataset of encoded images would hold them; four are unusable."""
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:8, :, 3] = 255  # top half opaque red, bottom half transparent (-> white)
    truncated = _encode(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8), "JPEG")
    nan_pixels = np.full((16, 16, 3), 100.0, np.float32)
    nan_pixels[3, 4, 1] = np.nan
    images = [
        _good_jpeg(60),                                                       # 0 RGB
        _encode(np.full((16, 16), 90, np.uint8), "PNG"),                      # 1 grayscale
        _encode(rgba, "PNG"),                                                 # 2 RGBA
        truncated[: len(truncated) // 2],                                     # 3 truncated JPEG
        _encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"),       # 4 CMYK (red)
        b"\x89PNG\r\n\x1a\n not really a png",                                # 5 corrupt PNG
        _encode(np.full((2, 3, 3), 7, np.uint8), "PNG"),                      # 6 2x3: too small
        nan_pixels,                                                           # 7 NaN pixels
    ]
    return [{"image": im, "label": i, "path": f"img{i}.png".encode()} for i, im in enumerate(images)]


BAD = {3: "truncated", 5: "cannot identify image", 6: "short side is below", 7: "NaN or Inf"}


class RecordSource:
    """A random-access source over a list of records (picklable, for Grain workers)."""

    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.records[int(i)]


class FlakyStorageSource(RecordSource):
    """Reading record 5 fails in the storage layer (not a decode problem): must stop the run."""

    def __getitem__(self, i):
        if int(i) == 5:
            raise OSError("read error on shard 00003 (injected)")
        return super().__getitem__(i)


def _cfg(**overrides):
    cfg = pipeline.default_config()
    cfg.image_size = 8
    cfg.read_threads = 1
    cfg.prefetch_buffer_size = 2
    cfg.random_flip = False
    cfg.min_side_ratio = 0.5   # 8 * 0.5 = 4 pixels at least
    cfg.max_skipped_fraction = 0.5
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def _u8(batch_images):
    return np.rint((batch_images + 1.0) * 127.5).astype(int)


def test_converted_and_skipped_records_one_pass(caplog):
    """One eval pass over the eight records: conversions are right, each bad record is replaced by
    the next usable one, counted and logged once with its id and reason; the batch format is the
    usual one."""
    caplog.set_level(logging.WARNING)
    src = RecordSource(_records())
    batches = list(pipeline.make_eval_iterator(_cfg(), batch_size=8, split="train", source=src))
    assert len(batches) == 1
    batch = batches[0]
    assert set(batch) == {"image", "label", "mask"}  # the skip marker never leaves the pipeline
    images, labels = _u8(batch["image"]), batch["label"].tolist()
    assert np.isfinite(batch["image"]).all() and batch["mask"].all()
    # Converted: grayscale -> equal channels, RGBA -> composited on white, CMYK -> RGB red.
    assert (images[1] == 90).all()
    assert np.abs(images[2][:2] - [200, 0, 0]).max() <= 2       # (bicubic resize: +-2 near the edge)
    assert np.abs(images[2][-2:] - [255, 255, 255]).max() <= 2
    assert np.abs(images[4] - [255, 0, 0]).max() <= 2
    # Skipped: each bad record holds the next usable record (3 -> 4, 5, 6, 7 -> 0, wrapping around).
    assert labels == [0, 1, 2, 4, 4, 0, 0, 0]
    np.testing.assert_array_equal(images[3], images[4])
    for i in (5, 6, 7):
        np.testing.assert_array_equal(images[i], images[0])
    # Logged once each, with the record's file name and the reason.
    skipped = [r.getMessage() for r in caplog.records if "Skipped bad record" in r.getMessage()]
    assert len(skipped) == 4, skipped
    for i, why in BAD.items():
        assert any(f"record {i} (img{i}.png)" in m and why in m for m in skipped), (i, skipped)
    assert "4 of the 8 records of this host are bad so far" in skipped[-1]


def test_too_many_bad_records_stop_the_run_with_their_ids():
    src = RecordSource(_records())
    it = pipeline.make_train_iterator(_cfg(max_skipped_fraction=0.25), global_batch_size=8, seed=0,
                                      process_index=0, process_count=1, source=src)
    with pytest.raises(pipeline.TooManyBadRecordsError) as e:
        next(it)
    msg = str(e.value)
    assert "4 of the 8 records this host reads are unusable (50.00%)" in msg
    assert "config data.max_skipped_fraction=0.25" in msg
    for i, why in BAD.items():
        assert f"record {i} (img{i}.png): " in msg and why in msg
    # Strict mode: max_skipped_fraction = 0 stops at the first bad record.
    strict = pipeline.make_eval_iterator(_cfg(max_skipped_fraction=0.0), batch_size=4, split="train", source=src)
    with pytest.raises(pipeline.TooManyBadRecordsError, match=r"(?s)1 of the 8 records .*record 3 \(img3.png\)"):
        next(strict)
    # Under the limit, training batches just flow (and are finite).
    ok = pipeline.make_train_iterator(_cfg(), global_batch_size=8, seed=0, process_index=0, process_count=1,
                                      source=src)
    for _ in range(3):  # three epochs: the same four records are not counted again
        b = next(ok)
        assert b["image"].shape == (8, 8, 8, 3) and np.isfinite(b["image"]).all()


def test_small_images_are_skipped_or_upscaled_by_config():
    src = RecordSource(_records()[5:7] + _records()[:1])  # corrupt, 2x3, good 20x24
    keep_all = list(pipeline.make_eval_iterator(_cfg(min_side_ratio=0.0), batch_size=3, split="x", source=src))
    images = _u8(keep_all[0]["image"])
    assert (images[1] == 7).all()  # the 2x3 image, upscaled to 8x8, kept
    with pytest.raises(pipeline.TooManyBadRecordsError, match=r"record 1 \(img6.png\): image is 2x3, its short "
                                                              r"side is below config data.min_side_ratio=0.5"):
        next(pipeline.make_eval_iterator(_cfg(max_skipped_fraction=0.4), batch_size=3, split="x", source=src))


def test_every_record_bad_stops_with_a_clear_error():
    src = RecordSource([_records()[5]] * 6)
    with pytest.raises(pipeline.BadRecordError, match=r"record \d \(UnidentifiedImageError: .*\) and the 5 "
                                                     r"records after it are all unusable: the dataset looks broken"):
        next(pipeline.make_train_iterator(_cfg(max_skipped_fraction=1.0), global_batch_size=2, seed=0,
                                          process_index=0, process_count=1, source=src))


def test_bad_records_in_worker_processes_are_counted_in_the_main_process(caplog):
    """Nothing fails silently in a worker: replacements made there are logged and counted by the
    main process, the limit stops the run there, and a storage error in a worker is re-raised."""
    caplog.set_level(logging.WARNING)
    src = RecordSource(_records())
    it = pipeline.make_train_iterator(_cfg(num_workers=1, max_skipped_fraction=0.25), global_batch_size=4, seed=0,
                                      process_index=0, process_count=1, source=src)
    with pytest.raises(pipeline.TooManyBadRecordsError, match=r"config data.max_skipped_fraction=0.25"):
        for _ in range(4):
            next(it)
    logged = [r for r in caplog.records if "Skipped bad record" in r.getMessage()]
    assert len(logged) >= 3 and all("(img" in r.getMessage() for r in logged)
    assert {r.process for r in logged} == {os.getpid()}  # counted by the main process
    flaky = pipeline.make_train_iterator(_cfg(num_workers=1), global_batch_size=8, seed=0, process_index=0,
                                         process_count=1, source=FlakyStorageSource(_records()))
    with pytest.raises(Exception, match="read error on shard 00003"):
        next(flaky)


def _folder_config(folder, data_dir, **overrides):
    return tiny_config(**{"data.name": "image_folder", "data.folder": str(folder), "data.data_dir": str(data_dir),
                          "mesh_shape": (-1, 1), "train.global_batch_size": 16, **overrides})


def test_empty_or_missing_folder_and_missing_tfds_dir_stop_before_compiling(tmp_path):
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    (empty / "cls" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"image folder .*empty contains no JPEG/PNG files"):
        train.make_setup(_folder_config(empty, tmp_path / "tfds"))
    with pytest.raises(FileNotFoundError, match=r"image folder .*nowhere \(config data.folder\) does not exist"):
        train.make_setup(_folder_config(tmp_path / "nowhere", tmp_path / "tfds"))
    # A tfds dataset whose data_dir is missing: train() stops while building its input, before the
    # train step is compiled, with the path and how to prepare the data.
    missing = tmp_path / "no_tfds_here"
    config = tiny_config(**{"data.name": "tfds", "data.tfds_name": "celeb_a_hq/256", "data.data_dir": str(missing),
                            "model.conditional": False, "mesh_shape": (-1, 1), "train.global_batch_size": 16,
                            "pyramid.sigmas": (0.1, 0.4)})
    with pytest.raises(FileNotFoundError) as e:
        train.train(config, str(tmp_path / "work"))
    assert f"tfds data_dir {missing} does not exist (config.data.data_dir)" in str(e.value)
    assert "tfds build celeb_a_hq/256" in str(e.value)
    assert not list((tmp_path / "work").glob("checkpoints/*"))


def test_blank_images_stop_before_compiling(tmp_path):
    """A folder of constant images has no detail at any scale: the per-scale std used to
    normalise the residuals is 0 and every step would be NaN. The run says so up front."""
    folder = tmp_path / "blank"
    folder.mkdir()
    for i in range(8):
        Image.new("RGB", (16, 16), (128, 128, 128)).save(folder / f"{i}.png")
    config = _folder_config(folder, tmp_path / "tfds", **{"model.conditional": False})
    with pytest.raises(ValueError, match=r"scale\(s\) \[0, 1\] have no signal .*config.pyramid.sigmas"):
        train.measure_sigmas(config)
