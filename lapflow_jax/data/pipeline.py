"""The Grain input pipeline: config, per-record preprocessing, train and eval iterators.

``cfg`` below is the data section of the experiment config (``config.data``), built
from ``default_config()``.

Training batches (``make_train_iterator``), per host:

    {"image": float32 [B_local, H, W, C] in [-1, 1], "label": int32 [B_local]}

with B_local = global_batch_size // process_count. The walk of one record:
source -> decode -> crop (center / random square of the short side) -> antialiased
resize to image_size (PIL bicubic) -> channels (RGB <-> grayscale) -> random flip ->
batch (uint8, in workers) -> float in [-1, 1] (in the main process, so workers ship
uint8 through shared memory, a quarter of the bytes).

Determinism: the order is ``MapDataset.shuffle`` with a seed derived from ``seed``
(a new permutation each epoch); the crop offset and flip of a record are drawn from
``np.random.default_rng([seed, 2, epoch, record_index])`` where record_index is its
index in the source, so they depend on neither the host count nor worker count nor
thread timing. Epochs repeat forever.

Multi-host: host p of P reads records p, p + P, p + 2P, ... of the first
(N // P) * P records, so all hosts have exactly N // P records per epoch and step in
lock-step; the last N mod P records (< P) are never read (drop remainder).

Checkpointing: the iterator's ``get_state()`` / ``set_state()`` restore exactly, with
and without worker processes. With Orbax, register Grain's handler beside the model's:

    import grain, orbax.checkpoint as ocp
    mngr = ocp.CheckpointManager(
        directory,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()},
        options=ocp.CheckpointManagerOptions(max_to_keep=3),
    )
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(train_iter)))
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(train_iter)))  # restores train_iter in place

Each host writes ``process_<i>-of-<P>.json`` (index from ``jax.process_index()``).

Worker processes are spawned and read absl flags: outside an absl app call
``absl.flags.FLAGS.mark_as_parsed()`` first and keep an ``if __name__ == "__main__"``
guard in scripts.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import grain
import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from lapflow_jax.data import latents, sources

NAMES = ("digits", "demo_photos", "image_folder", "tfds", "fashion_mnist", "latents")
CROPS = ("center", "random")


def default_config() -> ml_collections.ConfigDict:
    """The data fields of an experiment config (``config.data``)."""
    c = ml_collections.ConfigDict()
    # Which source: "digits" (scikit-learn's bundled 8x8 digits, offline), "demo_photos"
    # (offline skimage photos), "image_folder" (your own
    # JPEG/PNG folder, built once into array_record), "tfds" (a prepared tfds dataset,
    # e.g. celeb_a_hq/256 or imagenet2012) or "fashion_mnist" (Debian idx files).
    c.name = "demo_photos"
    # For name="tfds": "celeb_a_hq/256", "celeb_a_hq/512", "celeb_a_hq/1024", "imagenet2012".
    c.tfds_name = ""
    # tfds data_dir ("" = $TFDS_DATA_DIR or ~/tensorflow_datasets); for fashion_mnist
    # the folder of the idx files ("" = /usr/share/datasets/fashion-mnist).
    c.data_dir = ""
    c.folder = ""  # for name="image_folder".
    # For name="latents" (latent mode): the folder `python -m lapflow_jax.latents` wrote;
    # records are latents drawn from the cached posteriors (data/latents.py).
    c.latents_dir = ""
    c.split = "train"  # training split; tfds slices such as "train[:90%]" work.
    c.image_size = 32  # square output side H = W.
    c.channels = 3  # 3 (RGB) or 1 (grayscale); sources are converted as needed.
    c.crop = "center"  # "center" or "random" square crop of the short side.
    c.random_flip = True  # horizontal flips in training (never in eval).
    c.use_labels = True  # False: every label is 0 and num_classes() is 0 (unconditional).
    # Loading: worker processes (0 = in the main process), batches each worker keeps
    # ready, threads reading in each process, batches prefetched per process.
    c.num_workers = 0
    c.worker_buffer_size = 2
    # Bad records (corrupt or truncated JPEG/PNG, NaN/Inf pixel arrays, or a short side below
    # min_side_ratio * image_size, i.e. upscaled more than 4x by default; 0 keeps every size)
    # are replaced by the next usable record, counted and logged with their ids; the run stops
    # once more than max_skipped_fraction of this host's records are bad (0: at the first one).
    c.max_skipped_fraction = 0.01
    c.min_side_ratio = 0.25
    c.read_threads = 4
    c.prefetch_buffer_size = 8
    # Demo photos: records per split, the seed that fixes their crops, the photos
    # (label = index in this tuple) and the smallest crop side as a fraction.
    c.num_records = 4096
    c.num_eval_records = 1024
    c.demo_seed = 0
    c.demo_photos = sources.DEMO_PHOTOS
    c.demo_min_crop = 0.3
    # Fashion-MNIST: zero-pad the 28x28 images to this side (0 = keep 28).
    c.fashion_mnist_pad_to = 32
    return c


def _check_config(cfg: ml_collections.ConfigDict) -> None:
    if cfg.name not in NAMES:
        raise ValueError(f"config data.name must be one of {NAMES}, got {cfg.name!r}")
    if cfg.crop not in CROPS:
        raise ValueError(f"config data.crop must be one of {CROPS}, got {cfg.crop!r}")
    if int(cfg.image_size) <= 0:
        raise ValueError(f"config data.image_size must be positive, got {cfg.image_size}")
    if int(cfg.channels) not in (1, 3):
        raise ValueError(f"config data.channels must be 1 or 3, got {cfg.channels}")
    if int(cfg.num_workers) < 0:
        raise ValueError(f"config data.num_workers must be >= 0, got {cfg.num_workers}")
    if not 0.0 <= float(cfg.get("max_skipped_fraction", 0.0)) <= 1.0:
        raise ValueError(f"config data.max_skipped_fraction must be in [0, 1], got {cfg.max_skipped_fraction}")
    if not 0.0 <= float(cfg.get("min_side_ratio", 0.0)) <= 1.0:
        raise ValueError(f"config data.min_side_ratio must be in [0, 1], got {cfg.min_side_ratio}")


def image_shape(cfg: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """(H, W, C) of the images the iterators yield, without reading any data.

    For name="latents", the latent shape from the cache's info file.
    """
    _check_config(cfg)
    if cfg.name == "latents":
        return latents.latent_shape(cfg.latents_dir)
    return (int(cfg.image_size), int(cfg.image_size), int(cfg.channels))


def num_classes(cfg: ml_collections.ConfigDict) -> int:
    """Number of classes (0 when unlabelled or cfg.use_labels is False).

    Reads no image: demo -> len(demo_photos); fashion_mnist -> 10; image_folder ->
    its class sub-folders (listing only); tfds -> the "label" feature in the dataset's
    metadata (imagenet2012 -> 1000, celeb_a_hq -> 0).
    """
    _check_config(cfg)
    if not cfg.use_labels:
        return 0
    if cfg.name == "demo_photos":
        return len(tuple(cfg.demo_photos))
    if cfg.name == "fashion_mnist":
        return len(sources.FASHION_MNIST_CLASSES)
    if cfg.name == "digits":
        return 10
    if cfg.name == "image_folder":
        from lapflow_jax.data import image_folder  # pylint: disable=import-outside-toplevel

        return len(image_folder.list_image_folder(cfg.folder).classes)
    if cfg.name == "latents":
        return latents.num_classes(cfg.latents_dir)
    return sources.tfds_num_classes(cfg.tfds_name, cfg.data_dir)


def make_source(cfg: ml_collections.ConfigDict, split: str, *, field: str = "config.data"):
    """The random-access source of ``split`` for ``cfg.name`` (see sources.py).

    Demo photos: "train" gives ``num_records`` crops from ``demo_seed``; any other split
    gives ``num_eval_records`` different crops of the same photos (another seed).
    Latents: the cached records of ``latents_dir`` (one split, the one cached; ``split``
    is not used).
    """
    _check_config(cfg)
    if cfg.name == "demo_photos":
        train = split == "train"
        return sources.DemoPhotosSource(
            int(cfg.num_records if train else cfg.num_eval_records),
            seed=int(cfg.demo_seed) if train else int(cfg.demo_seed) + 1_000_003,
            record_size=int(cfg.image_size),
            photos=tuple(cfg.demo_photos),
            min_crop=float(cfg.demo_min_crop),
        )
    if cfg.name == "digits":
        return sources.DigitsSource(split)
    if cfg.name == "fashion_mnist":
        return sources.FashionMnistSource(split, data_dir=cfg.data_dir,
                                          pad_to=int(cfg.fashion_mnist_pad_to))
    if cfg.name == "image_folder":
        from lapflow_jax.data import image_folder  # pylint: disable=import-outside-toplevel

        return image_folder.image_folder_source(cfg.folder, data_dir=cfg.data_dir, split=split)
    if cfg.name == "latents":
        return latents.LatentSource(cfg.latents_dir)
    # `field`: where cfg sits in the experiment config, for the errors ("config.latent.source").
    return sources.tfds_source(cfg.tfds_name, data_dir=cfg.data_dir, split=split, field=field)


class Preprocess(grain.transforms.MapWithIndex):
    """Per-record decode, crop, resize, channels and flip; output stays uint8.

    ``map_with_index(i, record)`` is applied right after the source, where Grain's
    index i = epoch * num_records + record_index (MapDataset indices past the end wrap
    around and slicing/shuffling keep the epoch), so the random draws are a function
    of (seed, epoch, record_index) only.

    Bad records (see ``decode``) are replaced by the next usable record of ``source``
    (index + 1, + 2, ...; a deterministic choice, so resume stays exact and hosts stay in
    lock-step), keeping the bad record's own random draws; without a source they raise.

    Output: {"image": uint8 [S, S, C], "label": int32 scalar, "bad_index": int64 scalar},
    bad_index being the index of the bad record this one replaces, or -1.
    """

    def __init__(self, *, num_records: int, image_size: int, channels: int, crop: str,
                 random_flip: bool, use_labels: bool, seed: int, source: Any = None,
                 min_side_ratio: float = 0.0):
        self.num_records = int(num_records)
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.crop = crop
        self.random_flip = bool(random_flip)
        self.use_labels = bool(use_labels)
        self.seed = int(seed)
        self.source = source
        self.min_side_ratio = float(min_side_ratio)

    def decode(self, record: dict[str, Any]) -> np.ndarray:
        """The record's image, uint8 [H, W, 1|3]; raises BadRecordError saying why it is unusable."""
        if "image" not in record:
            raise BadRecordError(f"no 'image' field (keys: {sorted(record)})")
        try:
            image = sources.decode_image(record["image"])
        except Exception as e:  # noqa: BLE001 - any decode failure makes this one record bad
            # One line per record; PIL names the in-memory file by its address, which says nothing.
            why = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "(the record's bytes)", f"{type(e).__name__}: {e}")
            raise BadRecordError(" ".join(why.split())) from e
        need = self.min_side_ratio * self.image_size
        if min(image.shape[:2]) < need:
            raise BadRecordError(
                f"image is {image.shape[0]}x{image.shape[1]}, its short side is below config "
                f"data.min_side_ratio={self.min_side_ratio:g} x data.image_size={self.image_size} = {need:g}")
        return image

    def describe(self, record_index: int) -> tuple[str, str]:
        """(id, reason) of a record: its index and file name when the record has one."""
        record = self.source[int(record_index)]
        name = next((record[k] for k in _NAME_FIELDS if k in record), None)
        if isinstance(name, (bytes, np.bytes_)):
            name = bytes(name).decode("utf-8", "replace")
        rid = f"record {record_index}" + (f" ({name})" if name is not None else "")
        try:
            self.decode(record)
        except BadRecordError as e:
            return rid, str(e)
        return rid, "unusable when read, usable when read again (flaky storage?)"

    def _replacement(self, record_index: int, why: BadRecordError) -> tuple[dict[str, Any], np.ndarray]:
        if self.source is None:
            raise BadRecordError(f"record {record_index}: {why}") from why
        tries = min(self.num_records - 1, _MAX_REPLACEMENT_TRIES)
        for j in range(1, tries + 1):
            record = self.source[(record_index + j) % self.num_records]
            try:
                return record, self.decode(record)
            except BadRecordError:
                continue
        raise BadRecordError(f"record {record_index} ({why}) and the {tries} records after it are all "
                             "unusable: the dataset looks broken, check config data.*") from why

    def map_with_index(self, index: int, record: dict[str, Any]) -> dict[str, Any]:
        epoch, record_index = divmod(int(index), self.num_records)
        bad_index = -1
        try:
            image = self.decode(record)
        except BadRecordError as e:
            bad_index = record_index
            record, image = self._replacement(record_index, e)
        # Both draws always happen so that one option does not shift the other's.
        rng = np.random.default_rng([self.seed, 2, epoch, record_index])
        u_crop, u_flip = rng.random(2)
        h, w = image.shape[:2]
        side = min(h, w)
        if self.crop == "random":
            top = int(u_crop * (h - side + 1)) if h > side else 0
            left = int(u_crop * (w - side + 1)) if w > side else 0
        else:
            top, left = (h - side) // 2, (w - side) // 2
        image = image[top:top + side, left:left + side]
        if side != self.image_size or image.shape[-1] != self.channels:
            img = Image.fromarray(image[:, :, 0] if image.shape[-1] == 1 else image)
            if self.channels == 1 and img.mode != "L":
                img = img.convert("L")
            img = sources.resize_square(img, self.image_size)
            image = np.asarray(img, dtype=np.uint8)
            if image.ndim == 2:
                image = image[:, :, None]
            if self.channels == 3 and image.shape[-1] == 1:
                image = np.repeat(image, 3, axis=2)
        if self.random_flip and u_flip < 0.5:
            image = image[:, ::-1]
        label = int(record.get("label", 0)) if self.use_labels else 0
        return {"image": np.ascontiguousarray(image), "label": np.int32(label),
                "bad_index": np.int64(bad_index)}


class BadRecordError(ValueError):
    """One record cannot be used (corrupt, truncated, non-finite or too small)."""


class TooManyBadRecordsError(ValueError):
    """More records were bad than config data.max_skipped_fraction allows."""


# Record fields that name the file a record came from (image folders, celeb_a_hq, imagenet2012).
_NAME_FIELDS = ("path", "image/filename", "file_name", "filename", "id")
_MAX_REPLACEMENT_TRIES = 100


class SkipMonitor(grain.transforms.Map):
    """Counts and logs bad records in the main process; stops when there are too many.

    Runs after the batches come back from the worker processes, so every replacement made in
    a worker is seen here: each bad record is logged once, with its id and the reason, and
    the iterator raises TooManyBadRecordsError as soon as more than ``max_fraction`` of the
    ``num_records`` records this host reads are bad. Drops "bad_index" from the batch.
    """

    def __init__(self, preprocess: Preprocess, num_records: int, max_fraction: float):
        self.preprocess = preprocess
        self.num_records = int(num_records)
        self.max_fraction = float(max_fraction)
        self.bad: dict[int, str] = {}

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = dict(batch)
        marks = np.asarray(out.pop("bad_index"))
        for i in sorted({int(x) for x in marks[marks >= 0]} - set(self.bad)):
            rid, why = self.preprocess.describe(i)
            self.bad[i] = f"{rid}: {why}"
            logging.warning("Skipped bad %s: %s; the next usable record took its place. %d of the %d records "
                            "of this host are bad so far (limit: config data.max_skipped_fraction=%g).",
                            rid, why, len(self.bad), self.num_records, self.max_fraction)
        if len(self.bad) > self.max_fraction * self.num_records:
            listing = "\n  ".join(self.bad[i] for i in sorted(self.bad)[:10])
            more = f"\n  ... and {len(self.bad) - 10} more" if len(self.bad) > 10 else ""
            raise TooManyBadRecordsError(
                f"{len(self.bad)} of the {self.num_records} records this host reads are unusable "
                f"({len(self.bad) / self.num_records:.2%}), more than config data.max_skipped_fraction="
                f"{self.max_fraction:g} allows:\n  {listing}{more}\nFix or remove them (for an image folder, "
                "a rebuild skips undecodable files), or raise config data.max_skipped_fraction.")
        return out


class ToFloat(grain.transforms.Map):
    """uint8 batch -> float32 in [-1, 1] (0 -> -1, 255 -> 1); labels int32."""

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = dict(batch)
        out["image"] = batch["image"].astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)
        out["label"] = batch["label"].astype(np.int32)
        return out


def _process_index_and_count(process_index: int | None,
                             process_count: int | None) -> tuple[int, int]:
    if (process_index is None) != (process_count is None):
        raise ValueError("pass both process_index and process_count, or neither "
                         f"(got {process_index=}, {process_count=})")
    if process_index is None:
        opts = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    else:
        opts = grain.sharding.ShardOptions(int(process_index), int(process_count),
                                           drop_remainder=True)
    return opts.shard_index, opts.shard_count


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    """global_batch_size // process_count; raises if it does not divide or is < 1."""
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple "
                         f"of the process count {process_count}")
    return global_batch_size // process_count


def shard_indices(num_records: int, process_index: int, process_count: int) -> np.ndarray:
    """Record indices host ``process_index`` reads per epoch: p, p + P, ... < (N // P) * P."""
    per_host = num_records // process_count
    if per_host == 0:
        raise ValueError(f"{num_records} records cannot be split over {process_count} hosts")
    return np.arange(process_index, per_host * process_count, process_count)


def _finish(ds: grain.MapDataset, cfg: ml_collections.ConfigDict,
            monitor: SkipMonitor | None = None) -> grain.DatasetIterator:
    it_ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=int(cfg.read_threads),
        prefetch_buffer_size=max(int(cfg.prefetch_buffer_size), int(cfg.read_threads))))
    if int(cfg.num_workers) > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=int(cfg.num_workers),
            per_worker_buffer_size=int(cfg.worker_buffer_size)))
    if cfg.name == "latents":  # already float32 latents
        return iter(it_ds)
    it_ds = it_ds.map(ToFloat())
    return iter(it_ds.map(monitor) if monitor is not None else it_ds)


def make_train_iterator(
    cfg: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    source: Any = None,
) -> grain.DatasetIterator:
    """Infinite, shuffled, augmented training batches for this host.

    Args:
      cfg: data config (``default_config()`` fields).
      global_batch_size: batch over all hosts; must divide by process_count.
      seed: non-negative int; fixes order and augmentation.
      process_index, process_count: this host and the host count (default
        ``jax.process_index()`` / ``jax.process_count()``); pass both to simulate hosts.
      source: optional random-access source overriding ``make_source(cfg, cfg.split)``.

    Returns:
      A grain DatasetIterator; ``next(it)`` -> {"image": float32 [B_local, H, W, C] in
      [-1, 1], "label": int32 [B_local]}; ``get_state()`` / ``set_state()`` restore it.
    """
    _check_config(cfg)
    if int(seed) < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed}")
    pi, pc = _process_index_and_count(process_index, process_count)
    b_local = local_batch_size(int(global_batch_size), pc)
    source = make_source(cfg, cfg.split) if source is None else source
    n = len(source)
    per_host = len(shard_indices(n, pi, pc))
    shuffle_seed = int(np.random.SeedSequence([int(seed), 1]).generate_state(1)[0])
    monitor = None  # latents are sampled from cached posteriors: nothing to decode or skip
    if cfg.name == "latents":
        ds = grain.MapDataset.source(source).map_with_index(latents.SampleLatent(
            num_records=n, info=source.info, random_flip=cfg.random_flip,
            use_labels=cfg.use_labels, seed=int(seed)))
    else:
        preprocess = Preprocess(
            num_records=n, image_size=cfg.image_size, channels=cfg.channels, crop=cfg.crop,
            random_flip=cfg.random_flip, use_labels=cfg.use_labels, seed=int(seed),
            source=source, min_side_ratio=cfg.get("min_side_ratio", 0.0))
        monitor = SkipMonitor(preprocess, per_host, cfg.get("max_skipped_fraction", 0.0))
        ds = grain.MapDataset.source(source).map_with_index(preprocess)
    ds = ds[pi:per_host * pc:pc]
    ds = ds.shuffle(seed=shuffle_seed).repeat(None)
    ds = ds.batch(b_local, drop_remainder=True)
    return _finish(ds, cfg, monitor)


class _PaddedShard:
    """A host's eval records padded with blank ones to a length shared by all hosts.

    Records: the preprocessed record plus "mask": True, or a zero image with label 0
    and "mask": False past the host's last record.
    """

    def __init__(self, records: grain.MapDataset, indices: np.ndarray, length: int,
                 shape: tuple[int, int, int]):
        self.records = records
        self.indices = indices
        self.length = int(length)
        self.shape = tuple(shape)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, j: int) -> dict[str, Any]:
        j = int(j)
        if j < len(self.indices):
            rec = dict(self.records[int(self.indices[j])])
            rec["mask"] = np.bool_(True)
            return rec
        return {"image": np.zeros(self.shape, np.uint8), "label": np.int32(0),
                "bad_index": np.int64(-1), "mask": np.bool_(False)}


def make_eval_iterator(
    cfg: ml_collections.ConfigDict,
    *,
    batch_size: int,
    split: str,
    process_index: int | None = None,
    process_count: int | None = None,
    max_records: int | None = None,
    source: Any = None,
) -> grain.DatasetIterator:
    """One deterministic pass over ``split``: no shuffle, center crop, no flip.

    Every record is read exactly once over all hosts: host p reads records p, p + P,
    ...; the last batch of each host is padded so that all hosts yield the same number
    of full batches (ceil(ceil(N / P) / B_local)), and "mask" marks the real records.

    Args:
      cfg: data config.
      batch_size: global batch size over all hosts; must divide by process_count.
      split: e.g. "test", "validation", "train" or a tfds slice "train[:10000]".
      process_index, process_count: as in make_train_iterator.
      max_records: read only the first max_records records of the split.
      source: optional source overriding ``make_source(cfg, split)``.

    Returns:
      A finite grain DatasetIterator of {"image": float32 [B_local, H, W, C] in [-1, 1],
      "label": int32 [B_local], "mask": bool [B_local]}.
    """
    _check_config(cfg)
    if cfg.name == "latents":
        raise ValueError("config.data.name='latents' has no eval split: held-out images come from the "
                         "pixel dataset config.latent.source (set the eval data from it)")
    pi, pc = _process_index_and_count(process_index, process_count)
    b_local = local_batch_size(int(batch_size), pc)
    source = make_source(cfg, split) if source is None else source
    n = len(source) if max_records is None else min(len(source), int(max_records))
    if n <= 0:
        raise ValueError(f"eval split {split!r} has no records")
    preprocess = Preprocess(
        num_records=len(source), image_size=cfg.image_size, channels=cfg.channels,
        crop="center", random_flip=False, use_labels=cfg.use_labels, seed=0,
        source=source, min_side_ratio=cfg.get("min_side_ratio", 0.0))
    records = grain.MapDataset.source(source).map_with_index(preprocess)
    per_host_max = -(-n // pc)
    num_batches = -(-per_host_max // b_local)
    padded = _PaddedShard(records, np.arange(pi, n, pc), num_batches * b_local, image_shape(cfg))
    ds = grain.MapDataset.source(padded).batch(b_local, drop_remainder=True)
    monitor = SkipMonitor(preprocess, len(padded.indices), cfg.get("max_skipped_fraction", 0.0))
    return _finish(ds, cfg, monitor)


class _Subset:
    """Records at the given indices of a preprocessed MapDataset (random access, in that order)."""

    def __init__(self, records: grain.MapDataset, indices: np.ndarray):
        self.records = records
        self.indices = np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> dict[str, Any]:
        return self.records[int(self.indices[int(j)])]


def read_records(cfg: ml_collections.ConfigDict, split: str, indices: Sequence[int], *,
                 source: Any = None) -> dict[str, np.ndarray]:
    """Records `indices` of ``split`` as the eval pass reads them (center crop, no flip), decoded
    by cfg.read_threads threads: {"image": uint8 [n, H, W, C], "label": int32 [n]}.

    Bad records are replaced and counted as in training (``data.max_skipped_fraction`` of the
    records of this call). The eval mode reads its reference this way: each host only the rows
    its devices evaluate.
    """
    _check_config(cfg)
    if cfg.name == "latents":
        raise ValueError("config.data.name='latents' has no images: held-out images come from the pixel "
                         "dataset config.latent.source")
    indices = np.asarray(indices, np.int64)
    source = make_source(cfg, split) if source is None else source
    if len(indices) == 0:
        return {"image": np.zeros((0, *image_shape(cfg)), np.uint8), "label": np.zeros((0,), np.int32)}
    if indices.min() < 0 or indices.max() >= len(source):
        raise ValueError(f"record indices must lie in [0, {len(source)}) for split {split!r}")
    preprocess = Preprocess(
        num_records=len(source), image_size=cfg.image_size, channels=cfg.channels, crop="center",
        random_flip=False, use_labels=cfg.use_labels, seed=0, source=source,
        min_side_ratio=cfg.get("min_side_ratio", 0.0))
    records = grain.MapDataset.source(source).map_with_index(preprocess)
    ds = grain.MapDataset.source(_Subset(records, indices)).batch(len(indices))
    monitor = SkipMonitor(preprocess, len(indices), cfg.get("max_skipped_fraction", 0.0))
    threads = max(1, int(cfg.read_threads))
    batch = next(iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads))))
    batch = monitor.map(batch)
    return {"image": batch["image"], "label": batch["label"].astype(np.int32)}


def read_split(cfg: ml_collections.ConfigDict, split: str, num: int | None = None,
               batch_size: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """The first `num` images (default: all) of a split (center crop, no flip) as float32 in
    [-1, 1], [N, H, W, C], with their int32 labels [N] (one process reads them all)."""
    source = make_source(cfg, split)
    num = len(source) if num is None else min(int(num), len(source))
    batch_size = max(1, min(int(batch_size), num))  # no padded batch of blanks for a few images
    it = make_eval_iterator(cfg, batch_size=batch_size, split=split, max_records=num, process_index=0,
                            process_count=1, source=source)
    images, labels = [], []
    for b in it:
        images.append(b["image"][b["mask"]])
        labels.append(b["label"][b["mask"]])
    return np.concatenate(images)[:num], np.concatenate(labels)[:num].astype(np.int32)


def eval_num_batches(num_records: int, batch_size: int, process_count: int = 1) -> int:
    """Batches each host's eval iterator yields for ``num_records`` records."""
    b_local = local_batch_size(batch_size, process_count)
    return -(-(-(-num_records // process_count)) // b_local)


__all__: Sequence[str] = (
    "NAMES", "CROPS", "default_config", "image_shape", "num_classes", "make_source",
    "Preprocess", "ToFloat", "local_batch_size", "shard_indices", "make_train_iterator",
    "make_eval_iterator", "eval_num_batches", "read_records", "read_split",
)
