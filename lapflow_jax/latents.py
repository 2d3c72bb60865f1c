"""Latent mode: cache a dataset's autoencoder latents once, decode generated latents to images.

Caching (once per dataset and autoencoder; see docs/latent.md):

    python -m lapflow_jax.latents --config=configs/celebahq256_lapflow.py

reads the pixel dataset ``config.latent.source`` (a data config: tfds or image folder, as in
lapflow_jax/data), center-crops each image to a square, resizes it to
``config.latent.source.image_size``, encodes it and (``config.latent.flip``) its mirror image
with the autoencoder at ``config.latent.autoencoder``, and writes the posterior mean and std of
every image into ``config.data.latents_dir`` (record format: lapflow_jax/data/latents.py).
Training with the same config then reads those latents (``config.data.name = "latents"``) and
draws a new latent per epoch; it never runs the encoder.

Shards, hosts, resume:
  - The images are split into shards of ``config.latent.images_per_shard`` consecutive source
    records; shard j is written by host j mod P (P = process count). Hosts do not talk to each
    other: on a pod, run the same command on every host (``--distributed`` lets
    jax.distributed find the hosts; ``--process_index`` / ``--process_count`` name them
    without any coordination). The output folder must be shared by the hosts: on a pod, a
    bucket (``config.data.latents_dir=gs://bucket/latents``), which training then reads
    directly (launch/cache_latents.sh runs this on every worker).
  - A shard is written to a temporary file and renamed when complete (on gs://: written to a
    local temporary file and uploaded as one object, which appears whole or not at all), so a
    killed run leaves either a whole shard or none; rerunning the command skips finished shards
    and redoes the rest. ``--max_shards=N`` stops after N shards (time-boxed jobs).
  - Each shard is encoded in batches of ``config.latent.encode_batch_size`` that start at the
    shard's first record (the last one padded), so an interrupted and resumed run writes the
    same bytes as an uninterrupted one on the same kind of machine. A resumed run with a
    different autoencoder, source, crop size or layout is refused, listing the differences.

Weights: ``config.latent.autoencoder`` is a folder converted once with

    python -m lapflow_jax.latents --convert_from=/path/sd-vae-ft-ema --convert_to=autoencoders/sd-vae-ft-ema

or a diffusers folder itself (``config.json`` + ``diffusion_pytorch_model.safetensors``, read
without pickle; converting first only makes later loads faster).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lapflow_jax import autoencoder as ae_lib
from lapflow_jax import cli
from lapflow_jax import metrics as metrics_lib
from lapflow_jax import parallel
from lapflow_jax import storage
from lapflow_jax.data import latents as latents_data
from lapflow_jax.data import pipeline

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Data-config fields that only say how to load, not what the images are.
_LOADING_FIELDS = ("data_dir", "num_workers", "worker_buffer_size", "read_threads",
                   "prefetch_buffer_size", "random_flip", "latents_dir")
# Info fields a resumed run must agree on (the others say how, not what, was encoded).
_IDENTITY_FIELDS = ("num_images", "images_per_shard", "shards", "variants", "latent_shape",
                    "store_dtype", "num_classes", "scaling_factor", "shift_factor", "image_size",
                    "source", "autoencoder.config", "autoencoder.params_sha256",
                    "autoencoder.dtype")


# --------------------------------------------------------------------------------------------
# The autoencoder
# --------------------------------------------------------------------------------------------


def load_autoencoder(path: str, dtype: str = "float32", *, field: str = "config.latent.autoencoder"
                     ) -> tuple[ae_lib.AutoencoderKL, ae_lib.AutoencoderKLConfig]:
    """Loads a converted folder (``save_converted``) or a diffusers AutoencoderKL folder.

    dtype: compute dtype name ("float32" or "bfloat16"); parameters stay float32.
    A gs:// folder is copied once to a local cache (storage.local_copy) and loaded from there.
    """
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"config.latent.dtype={dtype!r} is not one of {tuple(COMPUTE_DTYPES)}")
    if not path:
        raise ValueError(f"{field} is empty: set it to an autoencoder folder (docs/latent.md)")
    path = os.fspath(path)
    if storage.is_remote(path):
        try:
            path = storage.local_copy(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{field}={path}: no such folder") from None
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(os.path.join(path, ae_lib.CONVERTED_CONFIG_NAME)):
        return ae_lib.load_converted(path, dtype=COMPUTE_DTYPES[dtype])
    if os.path.isfile(os.path.join(path, ae_lib.CONFIG_NAME)):
        return ae_lib.load_diffusers_vae(path, dtype=COMPUTE_DTYPES[dtype])
    if os.path.isdir(os.path.join(path, "vae")):
        hint = f"; it has a vae/ subfolder: set {field}={os.path.join(path, 'vae')}"
    else:
        hint = ""
    raise FileNotFoundError(
        f"{field}={path} is not an autoencoder folder: expected {ae_lib.CONVERTED_CONFIG_NAME} "
        f"(converted with `python -m lapflow_jax.latents --convert_from=... --convert_to=...`) or "
        f"a diffusers folder with {ae_lib.CONFIG_NAME} and {ae_lib.SAFETENSORS_NAME}{hint}. "
        "See docs/latent.md for getting sd-vae-ft-ema / EQ-VAE.")


def params_digest(model: ae_lib.AutoencoderKL) -> str:
    """sha256 of the float32 parameters (names, shapes and bytes): identifies the weights."""
    digest = hashlib.sha256()
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    for path, variable in sorted(flat, key=lambda kv: tuple(str(p) for p in kv[0])):
        array = np.asarray(variable.get_value(), np.float32)
        digest.update("/".join(str(p) for p in path).encode())
        digest.update(str(array.shape).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def autoencoder_path(config: ml_collections.ConfigDict) -> str:
    """``config.latent.autoencoder``, or else the one the cached latents were made with."""
    if config.latent.autoencoder:
        return config.latent.autoencoder
    if config.data.get("latents_dir") and epath.Path(
            latents_data.info_path(config.data.latents_dir)).is_file():
        return latents_data.read_info(config.data.latents_dir)["autoencoder"]["path"]
    raise ValueError("config.latent.autoencoder is empty and config.data.latents_dir holds no cached "
                     "latents naming one: set config.latent.autoencoder to the autoencoder folder "
                     "(docs/latent.md)")


def _decoder_key(config: ml_collections.ConfigDict) -> tuple[str, str, int]:
    chunk = int(config.latent.decode_batch_size)
    if chunk <= 0:
        raise ValueError(f"config.latent.decode_batch_size={chunk} must be positive")
    return storage.resolve(autoencoder_path(config)), str(config.latent.dtype), chunk


@functools.lru_cache(maxsize=4)
def _autoencoder(path: str, dtype: str):
    """(graphdef, state, config) of the autoencoder at `path`: loaded once per process, shared by the
    decoder and the encoder."""
    model, ae_config = load_autoencoder(path, dtype)
    graphdef, state = nnx.split(model)
    return graphdef, state, ae_config


@functools.lru_cache(maxsize=4)
def _decoder(path: str, dtype: str, chunk: int):
    graphdef, state, _ = _autoencoder(path, dtype)

    def decode(state, z):
        model = nnx.merge(graphdef, state)
        return parallel.map_in_chunks(lambda x: model.from_latent(x).astype(jnp.float32), z, chunk)

    return decode, state


def decoder(config: ml_collections.ConfigDict):
    """(decode, state): decode(state, z) maps one device's scaled latents [n, h, w, c] to images
    float32 [n, h*f, w*f, 3], about in [-1, 1], config.latent.decode_batch_size at a time; pure,
    for jit and shard_map. `state`: the weights of the autoencoder at autoencoder_path(config)."""
    return _decoder(*_decoder_key(config))


def autoencoder_config(config: ml_collections.ConfigDict) -> ae_lib.AutoencoderKLConfig:
    """The AutoencoderKLConfig at autoencoder_path(config) (its factor, channels, scaling)."""
    return _autoencoder(*_decoder_key(config)[:2])[2]


@functools.lru_cache(maxsize=4)
def _encoder(path: str, dtype: str, chunk: int):
    graphdef, state, ae_config = _autoencoder(path, dtype)
    shift = 0.0 if ae_config.shift_factor is None else float(ae_config.shift_factor)
    scale = float(ae_config.scaling_factor)

    def encode(state, x):
        model = nnx.merge(graphdef, state)
        # Training draws (mean + std * eps - shift) * scale (data/latents.py, SampleLatent): its
        # expectation, the posterior mean normalised the same way, is the one latent of an image.
        return parallel.map_in_chunks(lambda v: (model.encode(v)[0] - shift) * scale, x, chunk)

    return jax.jit(encode), state


def encode_images(config: ml_collections.ConfigDict, images: jax.Array) -> jax.Array:
    """Images float [n, H, W, C] in [-1, 1] -> the latents training sees, float32 [n, H/f, W/f, c]:
    the posterior mean, (mean - shift_factor) * scaling_factor as data/latents.py normalises the
    cached posteriors, config.latent.encode_batch_size images at a time, on one device (the
    upsample mode's inputs; caching a dataset is cache_latents)."""
    path, dtype, _ = _decoder_key(config)
    chunk = int(config.latent.encode_batch_size)
    if chunk <= 0:
        raise ValueError(f"config.latent.encode_batch_size={chunk} must be positive")
    encode, state = _encoder(path, dtype, chunk)
    return encode(state, jnp.asarray(images, jnp.float32))


@functools.lru_cache(maxsize=4)
def _mesh_decoder(path: str, dtype: str, chunk: int, mesh: Mesh):
    decode, state = _decoder(path, dtype, chunk)
    # From host copies: every process loaded the same weights, so each places its own replicas. A
    # device_put of this process's device arrays onto a mesh spanning other hosts is a cross-host
    # transfer, which a multi-process CPU job refuses ("does not support cross-host device
    # transfers": the rehearsal's 2-host pod, at the end-of-training samples of a latent config).
    state = jax.device_put(jax.tree.map(np.asarray, state), NamedSharding(mesh, P()))
    program = jax.jit(jax.shard_map(decode, mesh=mesh, in_specs=(P(), parallel.batch_spec(mesh)),
                                    out_specs=parallel.batch_spec(mesh),
                                    check_vma=False))
    return lambda z: program(state, z)


def decode_latents(config: ml_collections.ConfigDict, latents: jax.Array, mesh: Mesh) -> jax.Array:
    """Scaled latents [N, h, w, c], sharded over the mesh's 'data' axis (N divisible by it) ->
    images float32 [N, h*f, w*f, 3], about in [-1, 1], sharded the same way: each device decodes
    its own rows with its replica of the autoencoder."""
    return _mesh_decoder(*_decoder_key(config), mesh)(latents)


# --------------------------------------------------------------------------------------------
# Caching
# --------------------------------------------------------------------------------------------


class _ReadImage(grain.transforms.Map):
    """Source index -> {"index", "image": uint8 [S, S, C] center crop, "label"} (picklable)."""

    def __init__(self, source, preprocess: pipeline.Preprocess):
        self.source = source
        self.preprocess = preprocess

    def map(self, index):
        index = int(index)
        record = self.preprocess.map_with_index(index, self.source[index])
        return {"index": index, "image": record["image"], "label": int(record["label"])}


def _source_identity(src: ml_collections.ConfigDict, source) -> dict[str, Any]:
    """What the source images are: the data config without loading knobs, plus fingerprints."""
    d = {k: v for k, v in json.loads(src.to_json()).items() if k not in _LOADING_FIELDS}
    d.pop("crop", None)  # caching always takes the center square (and its mirror)
    if src.name != "demo_photos":
        for key in ("num_records", "num_eval_records", "demo_seed", "demo_photos", "demo_min_crop"):
            d.pop(key, None)
    if src.name != "fashion_mnist":
        d.pop("fashion_mnist_pad_to", None)
    if src.name == "image_folder":
        from lapflow_jax.data import image_folder  # pylint: disable=import-outside-toplevel

        d["folder_fingerprint"] = image_folder.list_image_folder(src.folder).fingerprint
    d["num_records"] = len(source)
    return d


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _identity_differences(old: dict, new: dict) -> list[str]:
    a, b = _flat(old), _flat(new)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if any(key == f or key.startswith(f + ".") for f in _IDENTITY_FIELDS):
            if a.get(key) != b.get(key):
                shown = lambda v: (repr(v) if len(repr(v)) < 120 else repr(v)[:117] + "...")
                diffs.append(f"{key}: cached {shown(a.get(key))}, now {shown(b.get(key))}")
    return diffs


def _write_json_atomic(path: str, data: dict) -> None:
    if storage.is_remote(path):  # one object upload: whole or nothing
        epath.Path(path).write_text(json.dumps(data, indent=2))
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def _check_latent_config(config: ml_collections.ConfigDict, ae_config: ae_lib.AutoencoderKLConfig
                         ) -> tuple[int, int, int]:
    src = config.latent.source
    if src.name == "latents":
        raise ValueError("config.latent.source.name='latents': the source to encode must be a pixel "
                         f"dataset, one of {tuple(n for n in pipeline.NAMES if n != 'latents')}")
    size, _, channels = pipeline.image_shape(src)
    if channels != ae_config.in_channels:
        raise ValueError(f"config.latent.source.channels={channels}, but the autoencoder takes "
                         f"{ae_config.in_channels} channels")
    f = ae_config.downsample_factor
    if size % f:
        raise ValueError(f"config.latent.source.image_size={size} is not divisible by the "
                         f"autoencoder's downsampling factor {f}")
    shape = (size // f, size // f, ae_config.latent_channels)
    if config.latent.shape is not None and tuple(config.latent.shape) != shape:
        raise ValueError(
            f"config.latent.shape={tuple(config.latent.shape)}, but images of "
            f"config.latent.source.image_size={size} encode to {shape} with this autoencoder "
            f"(factor {f}, {ae_config.latent_channels} channels)")
    if config.latent.store_dtype not in latents_data.STORE_DTYPES:
        raise ValueError(f"config.latent.store_dtype={config.latent.store_dtype!r} is not one of "
                         f"{latents_data.STORE_DTYPES}")
    for field in ("encode_batch_size", "images_per_shard"):
        if int(config.latent[field]) <= 0:
            raise ValueError(f"config.latent.{field}={config.latent[field]} must be positive")
    return shape


@functools.lru_cache(maxsize=4)
def _encode_program(graphdef, mesh: Mesh, flip: bool, store_dtype: str):
    """The jitted encoder for a model structure (cached: a resumed call in the same process
    does not compile again)."""
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    dtype = jnp.dtype(store_dtype)

    def encode(state, images):
        model = nnx.merge(graphdef, state)
        x = images.astype(jnp.float32) * (2.0 / 255.0) - 1.0  # as pipeline.ToFloat
        views = [x, x[:, :, ::-1]] if flip else [x]
        mean, logvar = model.encode(jnp.concatenate(views, axis=0))
        std = jnp.exp(0.5 * logvar)
        regroup = lambda a: jnp.stack(jnp.split(a, len(views), axis=0), axis=1).astype(dtype)
        return regroup(mean), regroup(std)

    return jax.jit(encode, in_shardings=(replicated, split), out_shardings=(split, split))


def _make_encoder(model: ae_lib.AutoencoderKL, *, flip: bool, store_dtype: str, batch: int):
    """uint8 images [B, S, S, C] -> (mean, std) [B, V, h, w, c] of store_dtype, on this host's devices.

    The batch is split over the largest number of local devices that divides it.
    """
    devices = jax.local_devices()
    n = max(d for d in range(1, len(devices) + 1) if batch % d == 0)
    mesh = Mesh(np.asarray(devices[:n]), ("data",))
    graphdef, state = nnx.split(model)
    # From host copies: every process loaded the same weights, so each places its own replicas. A
    # device_put of this process's device arrays onto a mesh spanning other hosts is a cross-host
    # transfer, which a multi-process CPU job refuses ("does not support cross-host device
    # transfers": the rehearsal's 2-host pod, at the end-of-training samples of a latent config).
    state = jax.device_put(jax.tree.map(np.asarray, state), NamedSharding(mesh, P()))
    program = _encode_program(graphdef, mesh, bool(flip), store_dtype)
    split = NamedSharding(mesh, P("data"))
    return lambda images: program(state, jax.device_put(images, split)), n


def cache_latents(config: ml_collections.ConfigDict, *, process_index: int | None = None,
                  process_count: int | None = None, max_shards: int | None = None) -> dict[str, Any]:
    """Encodes ``config.latent.source`` into ``config.data.latents_dir`` (this host's shards).

    Args:
      config: an experiment config with a ``latent`` section (config.py).
      process_index, process_count: this host and the host count (default: jax's).
      max_shards: stop after writing this many shards (None: all of this host's).

    Returns:
      {"written": [shard names], "skipped": [already there], "remaining": [this host's shards
      left by max_shards], "missing": [all shards not yet written, by any host], "info": dict}.
    """
    from lapflow_jax import config as config_lib  # pylint: disable=import-outside-toplevel

    config_lib.validate(config)
    latents_dir = config.data.get("latents_dir", "")
    if not latents_dir:
        raise ValueError("config.data.latents_dir is empty: set it to the folder to write the latents to")
    pi = jax.process_index() if process_index is None else int(process_index)
    pc = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= pi < pc:
        raise ValueError(f"process_index={pi} must be in [0, process_count={pc})")
    lat = config.latent
    ae_path = storage.resolve(lat.autoencoder)
    model, ae_config = load_autoencoder(lat.autoencoder, lat.dtype)
    shape = _check_latent_config(config, ae_config)
    src = lat.source
    source = pipeline.make_source(src, src.split, field="config.latent.source")
    n = len(source)
    per_shard = int(lat.images_per_shard)
    num_shards = -(-n // per_shard)
    shards = [latents_data.shard_name(j, num_shards) for j in range(num_shards)]
    variants = list(latents_data.VARIANTS if lat.flip else latents_data.VARIANTS[:1])
    info = {
        "format": latents_data.FORMAT,
        "num_images": n, "images_per_shard": per_shard, "num_shards": num_shards, "shards": shards,
        "variants": variants, "latent_shape": list(shape), "store_dtype": lat.store_dtype,
        "num_classes": pipeline.num_classes(src),
        "scaling_factor": float(ae_config.scaling_factor),
        "shift_factor": None if ae_config.shift_factor is None else float(ae_config.shift_factor),
        "image_size": int(src.image_size),
        "source": _source_identity(src, source),
        "autoencoder": {"path": ae_path, "config": ae_config.to_dict(),
                        "params_sha256": params_digest(model), "dtype": lat.dtype},
        "encode_batch_size": int(lat.encode_batch_size),
    }
    latents_dir = storage.resolve(latents_dir)
    epath.Path(latents_dir).mkdir(parents=True, exist_ok=True)
    path = latents_data.info_path(latents_dir)
    if epath.Path(path).is_file():
        old = latents_data.read_info(latents_dir)
        diffs = _identity_differences(old, info)
        if diffs:
            raise ValueError(
                f"{latents_dir} (config.data.latents_dir) holds latents cached with other settings:\n  "
                + "\n  ".join(diffs) + "\nUse another config.data.latents_dir, or delete this one "
                "to start over.")
        if old.get("encode_batch_size") != info["encode_batch_size"]:
            logging.warning("config.latent.encode_batch_size changed from %s to %s: the shards "
                            "written now may differ from the earlier ones in the last bits",
                            old.get("encode_batch_size"), info["encode_batch_size"])
        info["encode_batch_size"] = old.get("encode_batch_size")
    else:
        _write_json_atomic(path, info)  # every host writes the same content; rename is atomic

    mine = [j for j in range(num_shards) if j % pc == pi]
    present = storage.names(latents_dir)
    todo = [j for j in mine if shards[j] not in present]
    skipped = [shards[j] for j in mine if j not in todo]
    remaining = []
    if max_shards is not None and len(todo) > max_shards:
        todo, remaining = todo[:max_shards], [shards[j] for j in todo[max_shards:]]
    for j in todo:  # a killed run's half-written shards (local folders; gs:// never has any)
        for name in present:
            if name.startswith(shards[j] + ".tmp"):
                epath.Path(storage.join(latents_dir, name)).unlink(missing_ok=True)
    logging.info("Caching latents of %d images into %s: %d shards, host %d of %d has %d, %d done, "
                 "%d to write now", n, latents_dir, num_shards, pi, pc, len(mine), len(skipped), len(todo))

    batch = int(lat.encode_batch_size)
    encode, num_devices = _make_encoder(model, flip=bool(lat.flip), store_dtype=lat.store_dtype,
                                        batch=batch)
    preprocess = pipeline.Preprocess(num_records=n, image_size=src.image_size, channels=src.channels,
                                     crop="center", random_flip=False, use_labels=src.use_labels, seed=0)
    indices = np.concatenate([np.arange(j * per_shard, min(n, (j + 1) * per_shard)) for j in todo]
                             ) if todo else np.zeros((0,), np.int64)
    written = []
    if todo:
        ds = grain.MapDataset.source(indices).map(_ReadImage(source, preprocess)).to_iter_dataset(
            grain.ReadOptions(num_threads=int(src.read_threads),
                              prefetch_buffer_size=max(int(src.prefetch_buffer_size), int(src.read_threads))))
        if int(src.num_workers) > 0:
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=int(src.num_workers), per_worker_buffer_size=int(src.worker_buffer_size)))
        records = iter(ds)
        size = int(src.image_size)
        progress = metrics_lib.Progress(f"caching latents on {num_devices} device(s)", len(todo),
                                        items_per_batch=per_shard, unit="shard")
        tmp_dir = tempfile.mkdtemp(prefix="lapflow_latents_")
        for done, j in enumerate(todo, 1):
            count = min(n, (j + 1) * per_shard) - j * per_shard
            final = storage.join(latents_dir, shards[j])
            # array_record writes local files only: on gs:// the shard is made in a local
            # temporary folder and uploaded whole.
            tmp = (os.path.join(tmp_dir, f"{shards[j]}.tmp-{pi}-{os.getpid()}") if storage.is_remote(final)
                   else f"{final}.tmp-{pi}-{os.getpid()}")
            _write_shard(final, tmp, records, count, batch, encode, (size, size, int(src.channels)))
            written.append(shards[j])
            progress.update(done, wrote=shards[j])
    missing = latents_data.missing_shards(latents_dir, info)
    if missing:
        logging.info("%d of %d shards not written yet (other hosts' or left by --max_shards).",
                     len(missing), num_shards)
    return {"written": written, "skipped": skipped, "remaining": remaining, "missing": missing,
            "info": info}


def _write_shard(final: str, tmp: str, records, count: int, batch: int, encode, image_shape) -> None:
    """Encodes the next ``count`` records in batches from the shard's start; writes then renames.

    The next batch is prepared (decoded, resized) while the previous one runs on the devices.
    """
    from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel

    # group_size:1 makes every record a chunk of its own: fast random access in training.
    writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
    pending = None

    def flush(pending):
        (mean, std), metas = pending
        mean, std = np.asarray(mean), np.asarray(std)
        for k, (index, label) in enumerate(metas):
            writer.write(latents_data.encode_record(index, label, mean[k], std[k]))

    try:
        for start in range(0, count, batch):
            recs = [next(records) for _ in range(min(batch, count - start))]
            images = np.zeros((batch, *image_shape), np.uint8)  # zero rows pad the last batch
            for k, r in enumerate(recs):
                images[k] = r["image"]
            out = encode(images)  # asynchronous: the next batch is read meanwhile
            if pending is not None:
                flush(pending)
            pending = (out, [(r["index"], r["label"]) for r in recs])
        if pending is not None:
            flush(pending)
        writer.close()
    except BaseException:
        writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    storage.publish(tmp, final)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def convert(diffusers_dir: str, output_dir: str, *, overwrite: bool = False) -> ae_lib.AutoencoderKLConfig:
    """A diffusers AutoencoderKL folder -> our Orbax format in ``output_dir`` (loads faster)."""
    model, config = ae_lib.load_diffusers_vae(diffusers_dir)
    ae_lib.save_converted(model, config, output_dir, overwrite=overwrite)
    return config


def _run_cli() -> None:
    # Flags are defined here, not at import: generate.py imports this module inside
    # lapflow_jax.main, whose --config flag would clash.
    from absl import app, flags  # pylint: disable=import-outside-toplevel
    from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

    config_flags.DEFINE_config_file("config", None, "Experiment config (configs/*.py) with a latent section.",
                                    lock_config=True)
    flags.DEFINE_integer("process_index", None, "This host's index (default: jax.process_index()).")
    flags.DEFINE_integer("process_count", None, "Number of hosts (default: jax.process_count()).")
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (TPU pods, SLURM).")
    flags.DEFINE_integer("max_shards", None, "Write at most this many shards, then stop (resume later).")
    flags.DEFINE_string("convert_from", None, "Convert this diffusers AutoencoderKL folder ...")
    flags.DEFINE_string("convert_to", None, "... into this folder (our format), then exit.")
    flags.DEFINE_bool("overwrite", False, "With --convert_to: replace an existing conversion.")
    cli.define_verbose_flag()
    FLAGS = flags.FLAGS  # noqa: N806

    @cli.one_line_errors
    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
        cli.setup_console(FLAGS.verbose)
        if FLAGS.convert_from or FLAGS.convert_to:
            if not (FLAGS.convert_from and FLAGS.convert_to):
                raise app.UsageError("--convert_from and --convert_to go together")
            source, target = cli.resolve_path(FLAGS.convert_from), cli.resolve_path(FLAGS.convert_to)
            config = convert(source, target, overwrite=FLAGS.overwrite)
            print(f"converted {source} -> {target} (latent channels "
                  f"{config.latent_channels}, factor {config.downsample_factor}, scaling_factor "
                  f"{config.scaling_factor}); set config.latent.autoencoder={target}")
            return
        if FLAGS.config is None:
            raise app.UsageError("--config is required (or --convert_from/--convert_to)")
        cli.resolve_config_paths(FLAGS.config)  # once: the cache's info records absolute paths
        if FLAGS.distributed:
            jax.distributed.initialize()
        summary = cache_latents(FLAGS.config, process_index=FLAGS.process_index,
                                process_count=FLAGS.process_count, max_shards=FLAGS.max_shards)
        info = summary["info"]
        print(f"wrote {len(summary['written'])} shard(s), {len(summary['skipped'])} already there, "
              f"{len(summary['remaining'])} left by --max_shards; {len(summary['missing'])} of "
              f"{info['num_shards']} shards missing overall -> {FLAGS.config.data.latents_dir}")

    app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    _run_cli()
