"""Cached autoencoder latents as a Grain source (``config.data.name = "latents"``).

``python -m lapflow_jax.latents`` (lapflow_jax/latents.py) encodes a pixel dataset once into
``<latents_dir>``:

    latents_info.json                          what was encoded, how, and the record layout
    latents-00000-of-00042.array_record ...    records in source order, ``images_per_shard`` each

One record per source image, msgpack-encoded (no pickle):

    {"index": int (the image's index in the source), "label": int,
     "mean": bytes, "std": bytes}

where ``mean`` and ``std`` are the raw bytes of ``store_dtype`` arrays [V, h, w, c]: the
posterior moments of the autoencoder (unscaled, as the encoder gives them) for V variants of
the image, variant 0 the center crop and variant 1 (when ``variants`` lists it) its horizontal
mirror, encoded separately as LFM's flip augmentation asks.

Training draws a fresh latent per epoch (``SampleLatent``):

    z = (mean[v] + std[v] * eps - shift_factor) * scaling_factor,   eps ~ N(0, I)

with v = 1 with probability 1/2 when ``data.random_flip`` (else 0), and eps, v drawn from
``np.random.default_rng([seed, 3, epoch, record_index])``: like the pixel pipeline, the draws
depend on neither host nor worker count. The scaling factor is the autoencoder checkpoint's
(0.18215 for SD-VAE), recorded in the info file.

The folder may be local or on an object store (``gs://bucket/latents``): listing and the info
file go through etils.epath (lapflow_jax/storage.py), the shards through array_record's reader,
which opens gs:// itself.

This module imports neither jax nor the autoencoder, so Grain worker processes stay light.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import msgpack
import numpy as np
from etils import epath

from lapflow_jax import storage

INFO_NAME = "latents_info.json"
FORMAT = "lapflow_jax.latents.v1"
VARIANTS = ("center", "center_flipped")
STORE_DTYPES = ("float32", "float16")


def shard_name(index: int, num_shards: int) -> str:
    return f"latents-{index:05d}-of-{num_shards:05d}.array_record"


def info_path(latents_dir: str | os.PathLike) -> str:
    return storage.join(latents_dir, INFO_NAME)


def _how_to_make(latents_dir: str) -> str:
    return (f"make them with `python -m lapflow_jax.latents --config=<your config> "
            f"--config.data.latents_dir={latents_dir}` (docs/latent.md)")


def read_info(latents_dir: str | os.PathLike) -> dict[str, Any]:
    """The info dict of a latents folder; FileNotFoundError / ValueError name the path."""
    latents_dir = os.fspath(latents_dir)
    if not latents_dir:
        raise ValueError("config.data.latents_dir is empty: set it to the folder written by "
                         "`python -m lapflow_jax.latents` (docs/latent.md)")
    path = info_path(latents_dir)
    if not epath.Path(path).is_file():
        raise FileNotFoundError(f"no cached latents in {latents_dir} (config.data.latents_dir): "
                                f"{INFO_NAME} is missing; " + _how_to_make(latents_dir))
    try:
        info = json.loads(epath.Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"{path}: not written by lapflow_jax.latents (format "
                         f"{info.get('format') if isinstance(info, dict) else None!r}, expected "
                         f"{FORMAT!r})")
    return info


def missing_shards(latents_dir: str | os.PathLike, info: dict[str, Any]) -> list[str]:
    """Shard files listed in ``info`` that are not (yet) in ``latents_dir``."""
    present = storage.names(latents_dir)
    return [name for name in info["shards"] if name not in present]


def latent_shape(latents_dir: str | os.PathLike) -> tuple[int, int, int]:
    """(h, w, c) of one latent, from the info file (reads no record)."""
    return tuple(int(v) for v in read_info(latents_dir)["latent_shape"])


def num_classes(latents_dir: str | os.PathLike) -> int:
    """Classes of the encoded dataset (0 when it was unlabelled)."""
    return int(read_info(latents_dir)["num_classes"])


def encode_record(index: int, label: int, mean: np.ndarray, std: np.ndarray) -> bytes:
    """One record's bytes: mean, std [V, h, w, c] of the store dtype, stored raw."""
    return msgpack.packb({"index": int(index), "label": int(label),
                          "mean": np.ascontiguousarray(mean).tobytes(),
                          "std": np.ascontiguousarray(std).tobytes()})


def decode_record(data: bytes, shape: tuple[int, ...], dtype: str) -> dict[str, Any]:
    """Inverse of ``encode_record``: {"index", "label", "mean", "std" [V, h, w, c]}."""
    rec = msgpack.unpackb(data)
    out = {"index": int(rec["index"]), "label": int(rec["label"])}
    for key in ("mean", "std"):
        out[key] = np.frombuffer(rec[key], dtype=np.dtype(dtype)).reshape(shape)
    return out


class LatentSource:
    """Random access to the cached latents: ``source[i]`` is the record of source image i.

    Records: {"index": int, "label": int, "mean": [V, h, w, c], "std": [V, h, w, c]} in the
    store dtype. Raises FileNotFoundError listing the shards still missing when caching has not
    finished (on every host), ValueError when the shards do not hold the recorded count.
    """

    def __init__(self, latents_dir: str | os.PathLike):
        self.latents_dir = storage.resolve(latents_dir)
        self.info = read_info(self.latents_dir)
        missing = missing_shards(self.latents_dir, self.info)
        if missing:
            raise FileNotFoundError(
                f"latent caching into {self.latents_dir} has not finished: {len(missing)} of "
                f"{len(self.info['shards'])} shards missing (e.g. {missing[0]}); rerun the "
                "caching command on every host, it resumes where it stopped")
        self.paths = [storage.join(self.latents_dir, n) for n in self.info["shards"]]
        self.shape = (len(self.info["variants"]), *self.info["latent_shape"])
        self.dtype = self.info["store_dtype"]
        self.num_images = int(self.info["num_images"])
        self._source = None
        if len(self._open()) != self.num_images:
            raise ValueError(f"{self.latents_dir}: the shards hold {len(self._open())} records, "
                             f"{INFO_NAME} says {self.num_images}")

    def _open(self) -> grain.sources.ArrayRecordDataSource:
        if self._source is None:
            self._source = grain.sources.ArrayRecordDataSource(self.paths)
        return self._source

    def __getstate__(self):
        # Worker processes open their own readers.
        state = dict(self.__dict__)
        state["_source"] = None
        return state

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> dict[str, Any]:
        return decode_record(self._open()[int(index)], self.shape, self.dtype)

    def __repr__(self) -> str:
        return f"LatentSource({self.latents_dir!r}, {self.num_images} images, shape {self.shape})"


class SampleLatent(grain.transforms.MapWithIndex):
    """A record's latent for this epoch: {"image": float32 [h, w, c], "label": int32}.

    Applied right after the source, so Grain's index = epoch * num_records + record_index (see
    pipeline.Preprocess); the variant and the noise depend only on (seed, epoch, record_index).
    """

    def __init__(self, *, num_records: int, info: dict[str, Any], random_flip: bool,
                 use_labels: bool, seed: int):
        variants = tuple(info["variants"])
        if random_flip and len(variants) < 2:
            raise ValueError(
                "config.data.random_flip=True, but the cached latents hold no flipped variant "
                f"(variants {variants}; cached with config.latent.flip=False): set "
                "config.data.random_flip=False or cache again with config.latent.flip=True")
        self.num_records = int(num_records)
        self.random_flip = bool(random_flip)
        self.use_labels = bool(use_labels)
        self.seed = int(seed)
        self.scale = np.float32(info["scaling_factor"])
        self.shift = np.float32(info["shift_factor"] or 0.0)

    def map_with_index(self, index: int, record: dict[str, Any]) -> dict[str, Any]:
        epoch, record_index = divmod(int(index), self.num_records)
        rng = np.random.default_rng([self.seed, 3, epoch, record_index])
        u_flip = rng.random()  # always drawn, so the flip option does not shift the noise
        v = 1 if self.random_flip and u_flip < 0.5 else 0
        mean = record["mean"][v].astype(np.float32)
        eps = rng.standard_normal(mean.shape, dtype=np.float32)
        z = (mean + record["std"][v].astype(np.float32) * eps - self.shift) * self.scale
        label = record["label"] if self.use_labels else 0
        return {"image": z, "label": np.int32(label)}
