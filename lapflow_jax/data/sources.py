"""Random-access record sources for the Grain pipeline.

Every source here has ``__len__`` and ``__getitem__(index) -> dict`` with

    "image": uint8 [H, W, C] (C = 1 or 3) or encoded PNG/JPEG bytes
    "label": int (0 when the data are unlabelled)

so that ``grain.MapDataset.source(...)`` can read it, in this process or in Grain
worker processes (sources pickle cheaply: large arrays are loaded lazily per process).

Sources:
  - ``DemoPhotosSource``: crops of the CC0/public-domain photos that ship inside
    scikit-image; works offline, with no download.
  - ``DigitsSource``: the 1,797 handwritten 8x8 digits that ship inside scikit-learn
    (``sklearn.datasets.load_digits``); works offline. The default demo data.
  - ``FashionMnistSource``: the idx files of Debian's ``dataset-fashion-mnist``.
  - ``tfds_source``: any array_record dataset prepared by tensorflow-datasets
    (``celeb_a_hq/256``, ``imagenet2012``, or an image folder built by
    ``image_folder.py``), read with ``tfds.data_source`` without TensorFlow.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import os
from typing import Any, Sequence

import numpy as np
from etils.epath import Path  # pathlib's API, plus gs:// data_dirs (through gcsfs or TF's gfile)
from PIL import Image

# Photos in skimage.data that load from the installed package (no pooch download),
# checked with scikit-image 0.26. Colour photos first; the grayscale ones are
# replicated to RGB. Left out: drawings/synthetic images (logo, colorwheel,
# checkerboard, binary_blobs, shepp_logan_phantom), scanned text (page, text),
# near-duplicates (cat == chelsea) and those that need a download (eagle, lily,
# kidney, skin, brain, ...).
DEMO_PHOTOS: tuple[str, ...] = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "camera",
    "moon",
    "coins",
    "clock",
    "brick",
    "grass",
    "gravel",
)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


# ----------------------------------------------------------------------------------------
# Image conversion shared by the sources, the image-folder builder and the pipeline.


def pil_to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Returns ``img`` as an RGB PIL image.

    Grayscale (L, I;16, I, F, 1) is replicated to three channels, CMYK and YCbCr go
    through PIL's colour conversion, and anything with transparency (RGBA, LA, P with a
    transparent index) is composited onto ``background`` (white by default), since
    dropping alpha would expose whatever colour the encoder left under transparent
    pixels.
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale PNGs: PIL's convert("L") clips instead of scaling.
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")


def decode_image(image: Any) -> np.ndarray:
    """Decodes a record's image into uint8 [H, W, C] with C = 1 (grayscale) or 3 (RGB).

    Args:
      image: encoded PNG/JPEG ``bytes`` or a numpy array [H, W], [H, W, 1] or
        [H, W, 3] (uint8; other integer or float arrays in [0, 255] are rounded).
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        with Image.open(io.BytesIO(bytes(image))) as img:
            img.load()
            if img.mode == "L":
                return np.asarray(img, dtype=np.uint8)[:, :, None]
            return np.asarray(pil_to_rgb(img), dtype=np.uint8)
    arr = np.asarray(image)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8:
        if not np.isfinite(arr).all():  # casting would silently turn NaN into some pixel value
            raise ValueError(f"record 'image' ({arr.dtype} {arr.shape}) has NaN or Inf pixel values")
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"record 'image' must be encoded bytes or an array [H, W], [H, W, 1|3|4]; "
            f"got shape {arr.shape}"
        )
    if arr.shape[-1] == 4:
        arr = np.asarray(pil_to_rgb(Image.fromarray(arr, "RGBA")), dtype=np.uint8)
    return arr


def resize_square(img: Image.Image, size: int) -> Image.Image:
    """Antialiased resize of a PIL image to ``size`` x ``size`` (bicubic; PIL widens the
    filter support by the scale factor when downsampling, so this low-pass filters)."""
    if img.size == (size, size):
        return img
    return img.resize((size, size), resample=Image.Resampling.BICUBIC)


# ----------------------------------------------------------------------------------------
# Demo photos.


def load_demo_photo(name: str) -> np.ndarray:
    """Loads ``skimage.data.<name>()`` as uint8 RGB [H, W, 3], offline.

    Raises a ValueError naming the photo if it is not in this scikit-image install or
    would need a download.
    """
    import skimage.data  # pylint: disable=import-outside-toplevel

    loader = getattr(skimage.data, name, None)
    if loader is None or not callable(loader):
        raise ValueError(f"demo photo {name!r} is not in skimage.data; known: {DEMO_PHOTOS}")
    try:
        arr = np.asarray(loader())
    except Exception as e:  # pooch-only images raise ModuleNotFoundError / URLError
        raise ValueError(
            f"demo photo skimage.data.{name}() did not load offline ({type(e).__name__}: {e}); "
            f"drop it from config data.demo_photos"
        ) from e
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        lo, hi = float(arr.min()), float(arr.max())
        arr = ((arr - lo) / max(hi - lo, 1e-12) * 255.0 + 0.5).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[-1] == 4:
        arr = np.asarray(pil_to_rgb(Image.fromarray(arr, "RGBA")))
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"demo photo {name!r} has unsupported shape {arr.shape}")
    return np.ascontiguousarray(arr)


@functools.lru_cache(maxsize=64)
def _demo_photo_at(name: str, short_side: int) -> Image.Image:
    """The photo downscaled (antialiased) to ``short_side`` when larger; cached per process."""
    img = Image.fromarray(load_demo_photo(name))
    short = min(img.size)
    if short > short_side:
        w, h = img.size
        size = (max(1, round(w * short_side / short)), max(1, round(h * short_side / short)))
        img = img.resize(size, resample=Image.Resampling.LANCZOS)
    return img


class DemoPhotosSource:
    """Offline demo dataset: square random crops of real photos from scikit-image.

    Record i is a crop of photo ``i % len(photos)`` (so classes are balanced), with
    side ``s * min(H, W)``, ``s ~ U[min_crop, 1]`` and a uniform position, resized with
    antialiasing to ``record_size``; the crop depends only on (seed, i). Photos are first
    downscaled (antialiased) to a short side of ceil(2 * record_size / min_crop) when
    larger. Label = photo index (so the demo can also train class-conditionally: "a crop
    of the astronaut photo").

    Records: {"image": uint8 [record_size, record_size, 3], "label": int}.
    """

    def __init__(
        self,
        num_records: int,
        *,
        seed: int = 0,
        record_size: int = 32,
        photos: Sequence[str] = DEMO_PHOTOS,
        min_crop: float = 0.3,
    ):
        if num_records <= 0:
            raise ValueError(f"num_records must be positive, got {num_records}")
        if record_size <= 0:
            raise ValueError(f"record_size must be positive, got {record_size}")
        if not 0.0 < min_crop <= 1.0:
            raise ValueError(f"min_crop must be in (0, 1], got {min_crop}")
        photos = tuple(photos)
        if not photos:
            raise ValueError("demo photos list is empty")
        self.num_records = int(num_records)
        self.seed = int(seed)
        self.record_size = int(record_size)
        self.photos = photos
        self.min_crop = float(min_crop)
        self._images: list[Image.Image] | None = None

    def __getstate__(self):
        # Worker processes reload the photos (milliseconds) instead of unpickling them.
        state = dict(self.__dict__)
        state["_images"] = None
        return state

    def _load(self) -> list[Image.Image]:
        if self._images is None:
            # Downscale each photo once so that its smallest crop still holds twice
            # record_size pixels: crops then cost ~0.1 ms instead of ~6 ms (resizing
            # big crops of the 1411 px retina photo), at no visible loss.
            need = int(np.ceil(2 * self.record_size / self.min_crop))
            self._images = [_demo_photo_at(name, need) for name in self.photos]
        return self._images

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < self.num_records:
            raise IndexError(f"record index {index} out of range [0, {self.num_records})")
        images = self._load()
        label = index % len(images)
        img = images[label]
        w, h = img.size
        rng = np.random.default_rng([self.seed, index])
        side = max(1, int(round(min(h, w) * rng.uniform(self.min_crop, 1.0))))
        top = int(rng.integers(0, h - side + 1))
        left = int(rng.integers(0, w - side + 1))
        crop = resize_square(img.crop((left, top, left + side, top + side)), self.record_size)
        return {"image": np.asarray(crop, dtype=np.uint8), "label": label}

    def __repr__(self) -> str:
        return (f"DemoPhotosSource(num_records={self.num_records}, seed={self.seed}, "
                f"record_size={self.record_size}, photos={len(self.photos)})")


# ----------------------------------------------------------------------------------------
# scikit-learn's bundled digits.

# Every DIGITS_TEST_EVERY-th image (by index in load_digits) is the "test" split, the rest
# "train": a fixed, class-balanced hold-out (1,497 / 300 images) without a second download.
DIGITS_TEST_EVERY = 6


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [1797, 8, 8] in 0..255, labels int64 [1797]), once per process."""
    try:
        from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise ImportError("config data.name='digits' needs scikit-learn (`pip install scikit-learn`, "
                          "a dependency of lapflow-jax)") from e
    digits = load_digits()
    # The files store 4x4-block ink counts 0..16 per pixel; 16 is full ink.
    images = np.round(np.asarray(digits.images) * (255.0 / 16.0)).astype(np.uint8)
    return images, np.asarray(digits.target, np.int64)


class DigitsSource:
    """scikit-learn's handwritten digits (the UCI optdigits test set): 10 classes, 8x8 grey.

    White ink on black, like MNIST. The pipeline upsamples the 8x8 images (bicubic) to
    ``data.image_size``; ``data.min_side_ratio`` must allow it (8 >= ratio * size).

    Records: {"image": uint8 [8, 8, 1], "label": int in [0, 10)}.
    """

    def __init__(self, split: str = "train"):
        split = split.strip()
        if split not in ("train", "test"):
            raise ValueError(f"digits split (config data.split) must be 'train' or 'test', got {split!r}")
        self.split = split
        images, _ = _load_digits()
        is_test = np.arange(len(images)) % DIGITS_TEST_EVERY == 0
        self._indices = np.flatnonzero(is_test if split == "test" else ~is_test)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        images, labels = _load_digits()
        i = self._indices[int(index)]
        return {"image": images[i][:, :, None], "label": int(labels[i])}

    def __repr__(self) -> str:
        return f"DigitsSource(split={self.split!r}, {len(self)} images)"


# ----------------------------------------------------------------------------------------
# Fashion-MNIST (idx files).

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an idx file (the MNIST format), gzipped or not, into a numpy array."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file (bad magic {raw[:4]!r})")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise ValueError(
            f"{path}: header says shape {dims} ({expected} bytes) but the file holds "
            f"{len(raw) - offset} bytes of data (truncated download?)"
        )
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {directory}. Install Debian's "
        f"package (`apt-get install dataset-fashion-mnist`, files in {FASHION_MNIST_DIR}) "
        f"or point config data.data_dir at a folder holding the four idx files."
    )


class FashionMnistSource:
    """Fashion-MNIST from idx files: 60k train / 10k test, 10 classes.

    Records: {"image": uint8 [S, S, 1], "label": int in [0, 10)} where S = 28, or
    ``pad_to`` (>= 28) with the 28x28 image centred on a zero (black) border, the
    background colour of Fashion-MNIST.
    """

    def __init__(self, split: str = "train", *, data_dir: str = "", pad_to: int = 32):
        split = split.strip()
        if split not in ("train", "test"):
            raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
        if pad_to and pad_to < 28:
            raise ValueError(f"fashion_mnist_pad_to must be 0 or >= 28, got {pad_to}")
        directory = Path(data_dir or FASHION_MNIST_DIR)
        if not directory.is_dir():
            raise FileNotFoundError(
                f"Fashion-MNIST directory {directory} does not exist. Install it with "
                f"`apt-get install dataset-fashion-mnist` (puts the idx files in "
                f"{FASHION_MNIST_DIR}) or set config data.data_dir."
            )
        prefix = "train" if split == "train" else "t10k"
        self.split = split
        self.pad_to = int(pad_to)
        self.images_path = _find_idx(directory, f"{prefix}-images-idx3-ubyte")
        self.labels_path = _find_idx(directory, f"{prefix}-labels-idx1-ubyte")
        self._images: np.ndarray | None = None
        self._labels: np.ndarray | None = None
        self._load()
        self._len = len(self._labels)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_images"] = state["_labels"] = None
        return state

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        if self._images is None:
            images = read_idx(self.images_path)
            labels = read_idx(self.labels_path)
            if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
                raise ValueError(f"{self.images_path}: expected uint8 [N, 28, 28], got "
                                 f"{images.dtype} {images.shape}")
            if labels.shape != (images.shape[0],):
                raise ValueError(f"{self.labels_path}: {labels.shape[0]} labels for "
                                 f"{images.shape[0]} images")
            self._images, self._labels = images, labels
        return self._images, self._labels

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        images, labels = self._load()
        img = images[int(index)]
        if self.pad_to:
            p0 = (self.pad_to - 28) // 2
            p1 = self.pad_to - 28 - p0
            img = np.pad(img, ((p0, p1), (p0, p1)))
        return {"image": img[:, :, None], "label": int(labels[int(index)])}


# ----------------------------------------------------------------------------------------
# tensorflow-datasets array_record datasets.


def default_tfds_data_dir() -> str:
    """tfds's default data directory ($TFDS_DATA_DIR or ~/tensorflow_datasets)."""
    default = os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
    return os.environ.get("TFDS_DATA_DIR", default)


def _prepare_hint(name: str, data_dir: str) -> str:
    base = name.split("/")[0].split(":")[0]
    manual = ""
    if base in ("celeb_a_hq", "imagenet2012"):
        manual = (f" --manual_dir=<folder with the archives>\n({base} must be downloaded "
                  f"by hand first, see its page in the tfds catalog)")
    return (
        f"Prepare it once, on a machine with TensorFlow (`pip install lapflow-jax[prepare]`):\n"
        f"  tfds build {name} --data_dir={data_dir} --file_format=array_record{manual}\n"
        f"then copy {data_dir}/{base} to every training host (or a shared disk). Training "
        f"itself reads the array_record files without TensorFlow."
    )


def find_tfds_dataset_dir(name: str, data_dir: str, *, field: str = "config.data") -> Path:
    """Returns the prepared version folder ``<data_dir>/<name>[/<config>]/<version>``.

    ``name`` is "dataset[/config][:version]". The newest version holding a
    dataset_info.json is chosen when no version is given. Raises FileNotFoundError
    naming the path and how to prepare the dataset when it is missing, and ValueError
    when it was prepared in a format that cannot be read randomly (TFRecord). ``field`` is the
    data config the values come from, as errors name it ("config.latent.source" when caching
    latents).
    """
    if not name:
        raise ValueError(f"{field}.tfds_name is empty (expected e.g. 'celeb_a_hq/256')")
    data_dir = data_dir or default_tfds_data_dir()
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"tfds data_dir {root} does not exist ({field}.data_dir). "
            + _prepare_hint(name, str(root))
        )
    base, _, version = name.partition(":")
    parts = base.split("/")
    if len(parts) > 2 or not all(parts):
        raise ValueError(f"tfds name must be 'dataset[/config][:version]', got {name!r}")
    parent = root.joinpath(*parts)
    if version:
        candidates = [parent / version]
    else:
        candidates = sorted(
            (p for p in parent.glob("*") if p.is_dir() and p.name[:1].isdigit()),
            key=lambda p: tuple(int(x) if x.isdigit() else 0 for x in p.name.split(".")),
            reverse=True,
        ) if parent.is_dir() else []
    candidates = [c for c in candidates if (c / "dataset_info.json").is_file()]
    if not candidates:
        raise FileNotFoundError(
            f"tfds dataset {name!r} is not prepared under {parent} (no "
            f"<version>/dataset_info.json). " + _prepare_hint(name, str(root))
        )
    found = candidates[0]
    info = json.loads((found / "dataset_info.json").read_text())
    file_format = info.get("fileFormat", "tfrecord")
    if file_format.lower() not in ("array_record", "parquet"):
        raise ValueError(
            f"tfds dataset at {found} was prepared as {file_format}, which has no random "
            f"access; rebuild it with --file_format=array_record. " + _prepare_hint(name, str(root))
        )
    return found


def _feature_specs(version_dir: Path) -> dict[str, Any]:
    path = version_dir / "features.json"
    if not path.is_file():
        return {}
    spec = json.loads(path.read_text())
    return spec.get("featuresDict", {}).get("features", {})


def tfds_source(name: str, *, data_dir: str = "", split: str = "train", field: str = "config.data"):
    """Returns ``tfds.data_source(name, split=split, data_dir=data_dir)`` with images
    left encoded (bytes; the pipeline decodes them with PIL).

    Records: the dataset's features, e.g. {"image": bytes, "label": int} for
    imagenet2012 or {"image": bytes, "image/filename": bytes} for celeb_a_hq.
    Raises FileNotFoundError / ValueError naming the path when it is not prepared.
    """
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    data_dir = data_dir or default_tfds_data_dir()
    found = find_tfds_dataset_dir(name, data_dir, field=field)
    features = _feature_specs(found)
    if features and "image" not in features:
        raise ValueError(f"tfds dataset {name!r} at {found} has no 'image' feature "
                         f"(features: {sorted(features)})")
    # Skipping tfds's decoder keeps the JPEG/PNG bytes: PIL decodes them in the
    # pipeline, where the colour conversion and crop are under our control.
    decoders = {"image": tfds.decode.SkipDecoding()}
    versioned = name if ":" in name else f"{name}:{found.name}"
    try:
        return tfds.data_source(versioned, split=split, data_dir=data_dir, download=False,
                                decoders=decoders)
    except (KeyError, ValueError) as e:
        if "split" in str(e).lower():
            raise ValueError(f"tfds dataset {name!r} at {found} has no split {split!r} "
                             f"({e})") from e
        raise


def tfds_num_classes(name: str, data_dir: str = "") -> int:
    """Number of classes of the tfds dataset's "label" feature (0 if it has none).

    Reads only metadata: the prepared dataset's features.json or, when the dataset is
    not prepared here, the registered builder's feature spec (imagenet2012 -> 1000).
    """
    data_dir = data_dir or default_tfds_data_dir()
    try:
        found = find_tfds_dataset_dir(name, data_dir)
    except (FileNotFoundError, ValueError):
        found = None
    if found is not None and (found / "features.json").is_file():
        label = _feature_specs(found).get("label")
        if not label:
            return 0
        return int(label.get("classLabel", {}).get("numClasses", 0))
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    try:
        features = tfds.builder(name, data_dir=data_dir).info.features
    except Exception as e:  # noqa: BLE001 - any failure here means "unknown dataset"
        raise FileNotFoundError(
            f"tfds dataset {name!r} is neither prepared under {data_dir} nor a registered "
            f"tfds builder ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            + _prepare_hint(name, data_dir)
        ) from e
    if "label" not in features:
        return 0
    return int(features["label"].num_classes)
