"""The eval mode: FID-50K and its companions the way ImageNet papers measure them, on one host or a pod.

    python -m lapflow_jax.main --config=configs/imagenet256_b2_lapflow.py \
        --workdir=workdirs/imagenet256_b2_lapflow --mode=eval [--step=400000] \
        --config.eval.reference_npz=VIRTUAL_imagenet256_labeled.npz \
        --config.eval.metrics='("fid","sfid","inception_score","precision_recall")'

One walk (`evaluate_from_checkpoint`): checkpoint -> samples -> features -> statistics -> metrics.

  checkpoint  the latest one in <workdir>/checkpoints, or --step (EMA weights by default).
  samples     config.eval.num_samples of them, sample i from (seed, i) alone (noise, and for a
              class-conditional model a uniformly random label, config.eval.labels="random", as
              ADM and DiT sample for FID); or the images of config.eval.samples_npz.
  features    each global batch is sampled, decoded (latent mode), rounded to uint8 pixels and
              turned into features on the devices that made it (evaluation/streaming.py); each
              host stores its own rows in <workdir>/eval/step<step>/parts/, resumable part by part.
  statistics  mean and covariance of the features, streamed from the parts (never all rows in
              memory); for the reference the same pass runs over its images, sharded over the
              hosts, and its statistics are cached under a key of what fixes them (dataset fields
              or the .npz's sha256, count, the network's weights' sha256, preprocessing).
  metrics     process 0 computes them; <workdir>/eval/step<step>/metrics.json and TensorBoard.

Metrics (config.eval.metrics; evaluation/networks.py says which features each reads):
  fid, sfid, inception_score, precision_recall   as ADM's evaluator (guided-diffusion
                  evaluations/evaluator.py): InceptionV3 pool3 FID, spatial-feature sFID, Inception
                  Score over splits of 5,000, improved precision/recall with k = 3. They need the
                  InceptionV3 weights (config.eval.inception_weights).
  fd_efficientnet Fréchet distance of EfficientNet-Lite0 features (packaged weights; offline).
  swd             ProGAN's sliced Wasserstein distance on Laplacian-pyramid patches (x1e3), on at
                  most config.eval.swd_num_images samples and reference images.

Reference (what the samples are compared with):
  config.eval.reference_npz   an .npz with `arr_0` (ADM's reference batches, e.g.
                  VIRTUAL_imagenet256_labeled.npz) or `images`; when it also stores `mu`, `sigma`
                  (and `mu_s`, `sigma_s`), FID (and sFID) use those, as ADM does (statistics of the
                  whole training set), and its images serve precision/recall.
  config.eval.fid_stats       an .npz with `mu`, `sigma` (pytorch-fid, TTUR or ADM) for FID.
  otherwise the first config.eval.num_reference images (0: as many as samples) of the dataset
                  split config.eval.reference_split (in latent mode, of config.latent.source).

Outputs in <workdir>/eval/step<step>/: parts/ (each host's rows: images, labels, features),
samples_<N>x<H>x<W>x3.npz (the samples in ADM's layout: `arr_0` uint8, `arr_1` labels, so
guided-diffusion's evaluator reads them), metrics.json. Run again, the same command reuses what
is there: a killed run resumes, another metric reuses the samples and features, a larger N
samples only the rest.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from lapflow_jax import cli
from lapflow_jax import config as config_lib
from lapflow_jax import generate as generate_lib
from lapflow_jax import metrics as metrics_lib
from lapflow_jax import parallel
from lapflow_jax import sample as sample_lib
from lapflow_jax import train as train_lib
from lapflow_jax.data import pipeline, sources
from lapflow_jax.evaluation import frechet, inception_score, precision_recall, streaming, swd
from lapflow_jax.evaluation import networks as networks_lib
from lapflow_jax.evaluation import npz as npz_lib

FRECHET_METRICS = networks_lib.FRECHET_METRICS
# ADM's reference batches store the statistics of the whole training set under these suffixes.
STORED_STATS = {("inception", "pool"): "", ("inception", "spatial"): "_s"}


# ------------------------------------------------------------------------------------------------
# Reference


class Reference:
    """The images samples are compared with, and statistics stored beside them.

    Args:
      tag: readable name for cache folders and metrics.json (source, split, count, size).
      key: everything that fixes the reference images (JSON-able; no paths' file times).
      num: number of reference images.
      image_shape: (H, W, C) of its pixels.
      read_rows: indices [n] -> uint8 pixels [n, H, W, C] (this host's rows of the pass).
      stored: (network, output) -> (.npz path, key suffix) of statistics used instead of computing.
      cache_dir: where the reference passes and their statistics go (None: nowhere, no pass).
    """

    def __init__(self, *, tag: str, key: Mapping[str, Any], num: int, image_shape: tuple[int, int, int],
                 read_rows: Callable[[np.ndarray], np.ndarray] | None,
                 stored: Mapping[tuple[str, str], tuple[str, str]] | None = None,
                 cache_dir: str | epath.Path | None = None):
        self.tag, self.key, self.num = tag, dict(key), int(num)
        self.image_shape = tuple(image_shape)
        self.read_rows = read_rows
        self.stored = dict(stored or {})
        self.cache_dir = epath.Path(cache_dir) if cache_dir else None

    def cache_path(self, network: networks_lib.FeatureNetwork) -> epath.Path:
        """<cache_dir>/<tag>_<network>_<digest of the reference key and the network's identity>."""
        if self.cache_dir is None:
            raise ValueError("this reference has no cache_dir to compute its features in.")
        digest = hashlib.sha256(json.dumps({"reference": self.key, "network": network.identity},
                                           sort_keys=True).encode()).hexdigest()[:16]
        return self.cache_dir / f"{self.tag}_{network.name}_{digest}"

    def _stats_file(self, network, output: str) -> epath.Path:
        return self.cache_path(network) / f"stats.{output}.npz"

    def needs_pass(self, network, outputs: Sequence[str], features: bool) -> bool:
        """Whether features of `network` must be (or be checked to have been) computed: some output
        has neither stored nor cached statistics, or the features themselves are wanted."""
        return features or any((network.name, o) not in self.stored and not self._stats_file(network, o).exists()
                               for o in outputs)

    def store(self, network, batch: int, part_rows: int = 0) -> streaming.PartStore:
        row_bytes = 4 * sum(network.outputs.values())
        layout = streaming.Layout(batch=batch, batches_per_part=streaming.batches_per_part(batch, row_bytes, part_rows),
                                  processes=jax.process_count(), num_rows=self.num)
        return streaming.PartStore(self.cache_path(network), {"reference": self.key, "network": network.identity},
                                   layout)

    def run_pass(self, network, mesh, batch: int, part_rows: int = 0) -> streaming.PartStore:
        """The reference's features of `network` (every host its rows; cached, resumable)."""
        if self.read_rows is None:
            raise ValueError(f"reference {self.tag} has no images to compute {network.name} features from.")
        batch = streaming.global_batch(batch, mesh)
        store = self.store(network, batch, part_rows)
        make_batch = streaming.host_reader(self.read_rows, mesh, batch, self.num,
                                           streaming.blank_rows(self.image_shape))
        streaming.run(store, _program(mesh, {network.name: network}), label=f"eval: reference {network.name} features",
                      make_batch=make_batch, keep_images=False)
        return store

    def stats(self, network, output: str) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) of `output`: stored, cached, or computed from the features' parts and cached
        (process 0 writes the cache file)."""
        if (network.name, output) in self.stored:
            path, suffix = self.stored[(network.name, output)]
            return frechet.load_stats(path, suffix)
        path = self._stats_file(network, output)
        if path.exists():
            logging.info("reference %s %s.%s statistics from %s", self.tag, network.name, output, path)
            return frechet.load_stats(path)
        store = streaming.PartStore.open(self.cache_path(network), self.num)
        running = frechet.RunningStats(network.outputs[output])
        for _, rows in store.rows(streaming.kind_of(network), [output], limit=self.num):
            running.add(rows[output])
        if running.count != self.num:
            raise ValueError(f"{store.dir}: found {running.count} rows of reference features, expected {self.num}.")
        mu, sigma = running.stats()
        frechet.save_stats(path, mu, sigma)
        logging.info("wrote %s", path)
        return mu, sigma

    def features(self, network, output: str) -> np.ndarray:
        """All reference rows of `output` [num, D], in order (precision/recall)."""
        store = streaming.PartStore.open(self.cache_path(network), self.num)
        return np.concatenate([rows[output] for _, rows in store.rows(
            streaming.kind_of(network), [output], limit=self.num, ordered=True)])

    def images(self, n: int) -> np.ndarray:
        """The first n reference images, uint8 [n, H, W, C] (swd)."""
        return self.read_rows(np.arange(min(n, self.num)))


def reference_key(data: ml_collections.ConfigDict, split: str, count: int) -> tuple[str, dict[str, Any]]:
    """(tag, key) of the first `count` images of `split` of the dataset `data` describes.

    The key holds every data field that can change those images (name, tfds_name, folder,
    data_dir made absolute, image size, channels, source-specific fields), the split and the
    count; the tag is its short readable form for file names and metrics.json.
    """
    key = {k: v for k, v in data.to_dict().items() if k not in _NOT_REFERENCE_FIELDS}
    for field in ("data_dir", "folder"):
        key[field] = cli.resolve_path(key.get(field) or "")
    if data.name in ("tfds", "image_folder") and not key["data_dir"]:
        key["data_dir"] = cli.resolve_path(sources.default_tfds_data_dir())  # what "" means there
    key.update(reference_split=str(split), count=int(count))
    source = {"tfds": data.tfds_name, "image_folder": os.path.basename(os.path.normpath(data.folder or "."))}
    tag = _safe_name(f"reference_{source.get(data.name) or data.name}_{split}_{count}_"
                     f"{data.image_size}x{data.channels}")
    return tag, json.loads(json.dumps(key, default=str))


# config.data fields that change how records are loaded, not which images the eval pass reads (it
# always center-crops, never flips and ignores labels): left out of the statistics cache key.
_NOT_REFERENCE_FIELDS = frozenset({"split", "crop", "random_flip", "use_labels", "latents_dir", "num_workers",
                                   "worker_buffer_size", "read_threads", "prefetch_buffer_size",
                                   "max_skipped_fraction"})


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def _reference_split_size(data: ml_collections.ConfigDict, split: str) -> int:
    """Records in the reference split; opens the source (metadata only) so a missing split fails early."""
    try:
        n = len(pipeline.make_source(data, split))
    except (KeyError, ValueError) as e:
        raise ValueError(f"config.eval.reference_split={split!r}: {e}") from e
    if n == 0:
        raise ValueError(f"config.eval.reference_split={split!r} of data.name={data.name!r} has no records.")
    return n


def reference_from_config(config: ml_collections.ConfigDict, num: int, cache_dir: str | epath.Path | None,
                          metrics: Sequence[str] | None = None) -> Reference:
    """The Reference that config.eval describes, `num` images (config.eval.num_reference overrides).

    Checks what the metrics will need before any sampling: the reference split exists and has
    records, and the .npz files named exist and hold what they should.
    """
    ev = config.eval
    metrics = tuple(ev.metrics if metrics is None else metrics)
    num = int(ev.num_reference) or int(num)
    stored: dict[tuple[str, str], tuple[str, str]] = {}
    if ev.fid_stats:
        path = cli.resolve_path(ev.fid_stats)
        if not epath.Path(path).exists():
            raise FileNotFoundError(f"config.eval.fid_stats={path!r}: no such file.")
        stored.update({k: (path, s) for k, s in STORED_STATS.items() if frechet.has_stats(path, s)})
        if ("inception", "pool") not in stored:
            raise ValueError(f"config.eval.fid_stats={path!r} has no `mu` and `sigma`.")
    if ev.reference_npz:
        path = cli.resolve_path(ev.reference_npz)
        images = npz_lib.NpzImages(path, field="config.eval.reference_npz")
        for k, s in STORED_STATS.items():
            if k not in stored and frechet.has_stats(path, s):
                stored[k] = (path, s)
        count = min(num, len(images)) if int(ev.num_reference) else len(images)
        key = {"reference_npz_sha256": networks_lib.file_sha256(path), "count": count}
        return Reference(tag=_safe_name(f"reference_{epath.Path(path).stem}_{count}"), key=key, num=count,
                         image_shape=images.shape[1:], read_rows=_npz_rows(images), stored=stored,
                         cache_dir=cache_dir)
    # In latent mode the flow's data are latents; the reference is the pixel dataset they came from.
    data = config.latent.source if config.get("latent") and config.latent.enabled else config.data
    split = str(ev.reference_split)
    needs_images = any(m not in FRECHET_METRICS or networks_lib.METRIC_FEATURES[m] not in stored for m in metrics)
    count = min(num, _reference_split_size(data, split)) if needs_images else num
    tag, key = reference_key(data, split, count)
    source = functools.cache(lambda: pipeline.make_source(data, split))  # opened once, when first read
    return Reference(tag=tag, key=key, num=count, image_shape=pipeline.image_shape(data), stored=stored,
                     read_rows=lambda indices: pipeline.read_records(data, split, indices, source=source())["image"],
                     cache_dir=cache_dir)


def _npz_rows(images: npz_lib.NpzImages) -> Callable[[np.ndarray], np.ndarray]:
    """indices (ascending) -> rows of the .npz, read as contiguous runs."""
    def read(indices):
        indices = np.asarray(indices, np.int64)
        if len(indices) == 0:
            return np.zeros((0,) + images.shape[1:], np.uint8)
        breaks = np.flatnonzero(np.diff(indices) != 1) + 1
        runs = np.split(indices, breaks)
        return np.concatenate([images.read(int(r[0]), int(r[-1]) + 1) for r in runs])
    return read


# ------------------------------------------------------------------------------------------------
# Samples


@dataclasses.dataclass
class Samples:
    """Where the samples come from and where their parts go.

    make_batch: global batch index -> streaming.Batch; identity: what fixes the rows (recorded
    and checked in the parts folder); decode: the latent-mode decoder for the device program;
    keep_images: store the pixels (generated samples: for resume, swd and the ADM file);
    npz: the .npz of config.eval.samples_npz (its rows are read, not stored again).
    """

    make_batch: Callable[[int], streaming.Batch]
    identity: dict[str, Any]
    image_shape: tuple[int, int, int]
    batch: int
    decode: Any = None
    keep_images: bool = True
    npz: npz_lib.NpzImages | None = None
    num_classes: int = 0


# What fixes sample i: a directory of parts must not mix samples made with other values.
DOPRI5_SETTINGS = ("dopri5_carry_step", "dopri5_norm", "dopri5_per_sample")
_SAMPLE_SETTINGS = ("sample.method", "sample.steps", "sample.guidance_scale", "sample.rtol", "sample.atol",
                    "sample.use_ema", "num_scales", "window_starts", "path_kind", "model", "pyramid", "latent.enabled",
                    "latent.autoencoder", "latent.dtype", "eval.labels")


def samples_from_model(config: ml_collections.ConfigDict, setup, params: Any, sigmas: np.ndarray, *,
                       seed: int, step: int | None, keep_images: bool = True) -> Samples:
    """Samples of the model (params on setup.mesh), sample i from (seed, i)."""
    flat = json.loads(config.to_json())
    identity = {"seed": seed, "step": step}
    for key in _SAMPLE_SETTINGS:
        node = flat
        for part in key.split("."):
            node = node[part]
        identity[key] = node
    if config.sample.method == "dopri5":
        # Only dopri5's images depend on these (and identities of other methods stay as they were).
        identity.update({f"sample.{k}": config.sample[k] for k in DOPRI5_SETTINGS})
    pixel_shape = _pixel_shape(config, setup.image_shape)
    batch = streaming.global_batch(config.sample.batch_size, setup.mesh, config.sample.get("rows_per_call", 0))
    base = jax.random.key(seed)

    def make_batch(j: int) -> streaming.Batch:
        out = generate_lib.sample_on_mesh(config, setup.graphdef, params, sigmas, image_shape=setup.image_shape,
                                          num_classes=setup.num_classes, rng=base, batch=batch, mesh=setup.mesh,
                                          first_index=j * batch, label_mode=config.eval.labels)
        labels = None if out.labels is None else parallel.get_host_rows(out.labels)
        return streaming.Batch(x=out.x, labels=labels, nfe=out.nfe_per_segment)

    decode = None
    if config.latent.enabled:
        from lapflow_jax import latents as latents_lib  # pylint: disable=import-outside-toplevel
        decode = latents_lib.decoder(config)
    return Samples(make_batch=make_batch, identity=identity, image_shape=pixel_shape, batch=batch, decode=decode,
                   keep_images=keep_images, num_classes=setup.num_classes)


def _pixel_shape(config: ml_collections.ConfigDict, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """(H, W, C) of the samples' pixels: the flow's shape, or in latent mode the decoded image's."""
    if not config.latent.enabled:
        return tuple(image_shape)
    source = config.latent.source
    return (int(source.image_size), int(source.image_size), 3)


def samples_from_npz(path: str, mesh, batch: int) -> Samples:
    images = npz_lib.NpzImages(path, field="config.eval.samples_npz")
    batch = streaming.global_batch(batch, mesh)
    identity = {"samples_npz_sha256": networks_lib.file_sha256(path), "shape": list(images.shape)}
    make_batch = streaming.host_reader(_npz_rows(images), mesh, batch, len(images),
                                       streaming.blank_rows(images.shape[1:]))
    return Samples(make_batch=make_batch, identity=identity, image_shape=images.shape[1:], batch=batch,
                   keep_images=False, npz=images)


# ------------------------------------------------------------------------------------------------
# The walk


_PROGRAMS: dict[tuple, streaming.FeatureProgram] = {}


def _program(mesh, networks: Mapping[str, Any], decode=None) -> streaming.FeatureProgram:
    """The device program, made (and compiled) once per process for the same mesh, networks and
    decoder (the networks and decoders are themselves loaded once per process)."""
    networks = dict(networks)
    key = (mesh, tuple((name, id(net)) for name, net in sorted(networks.items())), None if decode is None else id(decode[0]))
    if key not in _PROGRAMS:
        _PROGRAMS[key] = streaming.FeatureProgram(mesh, networks, decode)
    return _PROGRAMS[key]


@functools.lru_cache(maxsize=4)
def _load_network(name: str, weights: str, preprocessing: str) -> networks_lib.FeatureNetwork:
    eval_config = ml_collections.ConfigDict({"inception_weights": weights, "inception_preprocessing": preprocessing})
    return networks_lib.load(name, eval_config)


def load_networks(metrics: Sequence[str], eval_config) -> dict[str, networks_lib.FeatureNetwork]:
    """The feature networks the metrics need, loaded once per process (weights checked first)."""
    out = {}
    for name in networks_lib.networks_for(metrics):
        weights = networks_lib.weights_path(name, eval_config)
        out[name] = _load_network(name, weights, str(eval_config.inception_preprocessing))
    return out


def evaluate_from_checkpoint(config: ml_collections.ConfigDict, workdir: str, step: int | None = None,
                             cache_dir: str | epath.Path | None = None) -> dict[str, Any]:
    """The eval mode (see the module docstring). Returns the metrics (on every process) and writes them.

    Args:
      step: the checkpoint to evaluate (default: the latest).
      cache_dir: where reference features and statistics are cached (default <workdir>/eval);
        benchmarks comparing several models against one reference share one.
    """
    config_lib.validate(config)
    ev = config.eval
    workdir = epath.Path(workdir)
    cache_dir = epath.Path(cache_dir) if cache_dir else workdir / "eval"
    metrics = tuple(ev.metrics)
    # Before any sampling: a missing package, weight file, split or .npz fails first.
    networks = load_networks(metrics, ev)
    if ev.samples_npz:
        path = cli.resolve_path(ev.samples_npz)
        mesh = parallel.mesh_for(config)
        samples = samples_from_npz(path, mesh, int(ev.feature_batch_size))
        num, step = len(samples.npz), None
        out_dir = workdir / "eval" / _safe_name(epath.Path(path).stem)
    else:
        num = int(ev.num_samples)
    reference = reference_from_config(config, num, cache_dir, metrics)
    if not ev.samples_npz:
        # 1. checkpoint
        setup, step, params, sigmas = sample_lib.restore_for_sampling(config, workdir, step)
        mesh = setup.mesh
        # 2. samples (made in the pass below, batch by batch)
        samples = samples_from_model(config, setup, params, sigmas, seed=config.seed + 13, step=step)
        out_dir = workdir / "eval" / f"step{step:07d}"
    result = evaluate_samples(config, mesh, samples, reference, networks, metrics=metrics, num=num,
                              out_dir=out_dir, write_adm=not ev.samples_npz, step=step)
    if jax.process_index() == 0:
        writer = metrics_lib.MetricWriter(workdir / "tensorboard")
        writer.scalars(step or 0, {f"eval/{k}": v for k, v in result["metrics"].items()})
        writer.close()
    logging.info("eval (step %s, %d samples vs %s): %s", step, num, reference.tag,
                 json.dumps({k: round(v, 4) for k, v in result["metrics"].items()}))
    return result


def evaluate_samples(config: ml_collections.ConfigDict, mesh, samples: Samples, reference: Reference,
                     networks: Mapping[str, networks_lib.FeatureNetwork], *, metrics: Sequence[str], num: int,
                     out_dir: epath.Path, write_adm: bool, step: int | None = None) -> dict[str, Any]:
    """samples -> features -> statistics -> metrics, on every process. Process 0 computes the
    metrics and writes <out_dir>/metrics.json; every process returns its content."""
    ev = config.eval
    start = time.perf_counter()
    needs = networks_lib.networks_for(metrics)
    # 3. features of the samples (every host its rows; resumable) ...
    row_bytes = (int(np.prod(samples.image_shape)) if samples.keep_images else 0) + sum(
        4 * sum(net.outputs.values()) for net in networks.values())
    layout = streaming.Layout(batch=samples.batch, processes=jax.process_count(), num_rows=num,
                              batches_per_part=streaming.batches_per_part(samples.batch, row_bytes, int(ev.part_rows)))
    store = streaming.PartStore(out_dir / "parts", samples.identity, layout)
    program = _program(mesh, networks, samples.decode)
    report = streaming.run(store, program, label="eval: samples", make_batch=samples.make_batch,
                           keep_images=samples.keep_images)
    # ... and of the reference, where stored or cached statistics do not cover it.
    for name, outputs in needs.items():
        if reference.needs_pass(networks[name], outputs, features="precision_recall" in metrics and name == "inception"):
            reference.run_pass(networks[name], mesh, int(ev.feature_batch_size), int(ev.part_rows))
    sampling = {"batches_sampled_now": len(report["nfe"])}
    if jax.process_index() == 0:
        if write_adm and samples.keep_images:
            write_adm_samples(store, num, samples.image_shape, out_dir, conditional=samples.num_classes > 0)
        # 4. statistics and 5. metrics
        values = compute_metrics(store, samples, reference, networks, metrics=metrics, num=num,
                                 swd_images=int(ev.swd_num_images), swd_seed=config.seed)
        if samples.keep_images:  # NFE per segment of every stored batch (this run's or an earlier one's)
            nfe = [store.read(p, 0, streaming.IMAGES, ("nfe",)).get("nfe") for p in range(store.layout.num_parts)]
            nfe = [n for n in nfe if n is not None]
            sampling["nfe_per_segment"] = np.concatenate(nfe).mean(axis=0).tolist() if nfe else None
        sampling["eval_seconds"] = time.perf_counter() - start
        result = {"step": step, "num_samples": num, "reference": reference.tag, "num_reference": reference.num,
                  "metrics": values, "samples_dir": str(store.dir), "sampling": sampling}
        if write_adm and samples.keep_images:
            result["samples_npz"] = str(adm_samples_path(out_dir, num, samples.image_shape))
        streaming.write_json(out_dir / "metrics.json", result)
    streaming.barrier(f"lapflow_eval_metrics_{out_dir}")
    return json.loads((out_dir / "metrics.json").read_text())


def adm_samples_path(out_dir: epath.Path, num: int, image_shape: Sequence[int]) -> epath.Path:
    h, w, _ = image_shape
    return out_dir / f"samples_{num}x{h}x{w}x3.npz"


def write_adm_samples(store: streaming.PartStore, num: int, image_shape: Sequence[int], out_dir: epath.Path, *,
                      conditional: bool) -> epath.Path:
    """The first `num` samples in ADM's layout (`arr_0` uint8 [N, H, W, 3], gray repeated to RGB;
    `arr_1` int64 labels for a class-conditional model), streamed from the parts in order."""
    path = adm_samples_path(out_dir, num, image_shape)
    if path.exists():
        return path
    h, w, c = image_shape
    arrays = {"arr_0": ((num, h, w, 3), np.uint8)}
    if conditional:
        arrays["arr_1"] = ((num,), np.int64)
    writer = npz_lib.NpzWriter(path, arrays)
    labels = []
    names = ["images"] + (["labels"] if conditional else [])
    for _, rows in store.rows(streaming.IMAGES, names, limit=num, ordered=True):
        images = rows["images"]
        writer.write("arr_0", np.repeat(images, 3, axis=-1) if c == 1 else images)
        if conditional:
            labels.append(rows["labels"])
    if conditional:
        writer.write("arr_1", np.concatenate(labels).astype(np.int64))
    writer.close()
    logging.info("wrote %s", path)
    return path


def compute_metrics(store: streaming.PartStore, samples: Samples, reference: Reference,
                    networks: Mapping[str, networks_lib.FeatureNetwork], *, metrics: Sequence[str], num: int,
                    swd_images: int = 10000, swd_seed: int = 0) -> dict[str, float]:
    """Statistics of the stored features, then each metric (one sweep over each network's parts)."""
    out: dict[str, float] = {}
    for name, outputs in networks_lib.networks_for(metrics).items():
        net = networks[name]
        running = {o: frechet.RunningStats(net.outputs[o]) for o in outputs if o != "logits"}
        score = inception_score.InceptionScore(num) if "inception_score" in metrics and name == "inception" else None
        pool = [] if "precision_recall" in metrics and name == "inception" else None
        for index, rows in store.rows(streaming.kind_of(net), outputs, limit=num, ordered=pool is not None):
            for o, stats in running.items():
                stats.add(rows[o])
            if score is not None:
                score.add(index, rows["logits"])
            if pool is not None:
                pool.append(rows["pool"])
        counts = {stats.count for stats in running.values()}
        if counts and counts != {num}:
            raise ValueError(f"{store.dir}: found {counts} rows of {name} features, expected {num}.")
        for metric in metrics:
            if networks_lib.METRIC_FEATURES.get(metric, (None,))[0] != name:
                continue
            output = networks_lib.METRIC_FEATURES[metric][1]
            if metric in FRECHET_METRICS:
                mu, sigma = running[output].stats()
                mu_r, sigma_r = reference.stats(net, output)
                out[metric] = frechet.frechet_distance(mu, sigma, mu_r, sigma_r)
            elif metric == "inception_score":
                out["inception_score"] = score.result()
            elif metric == "precision_recall":
                out["precision"], out["recall"] = precision_recall.precision_recall(
                    reference.features(net, "pool"), np.concatenate(pool))
    if "swd" in metrics:
        n = min(num, swd_images, reference.num)
        if samples.npz is not None:
            images = samples.npz.read(0, n)
        else:
            images = np.concatenate([r["images"] for _, r in store.rows(streaming.IMAGES, ["images"], limit=n,
                                                                           ordered=True)])
        ref = reference.images(n)
        if images.shape[1:] != ref.shape[1:]:
            raise ValueError(f"swd: samples {images.shape[1:]} and reference images {ref.shape[1:]} differ in shape.")
        out.update(swd.swd(sample_lib.from_uint8(images), sample_lib.from_uint8(ref), seed=swd_seed))
    return out


# ------------------------------------------------------------------------------------------------
# During training


def evaluate_in_training(setup, state, workdir: str | epath.Path, step: int) -> dict[str, float]:
    """config.eval.train_metrics of config.eval.train_num_samples samples of the training state
    (EMA weights by default), on the training mesh: {"eval/<metric>": value, "eval/seconds": wall
    time}, for TensorBoard. Parts go to <workdir>/eval/train/step<step>/ (resumable like the eval
    mode); the reference statistics are computed at the first call and cached."""
    start = time.perf_counter()
    config = setup.config
    ev = config.eval
    metrics = tuple(ev.train_metrics)
    workdir = epath.Path(workdir)
    networks = load_networks(metrics, ev)
    num = int(ev.train_num_samples)
    reference = reference_from_config(config, num, workdir / "eval", metrics)
    params = train_lib.sampling_params(setup, state)
    samples = samples_from_model(config, setup, params, np.asarray(state.sigmas), seed=config.seed + 13, step=step,
                                 keep_images="swd" in metrics)
    result = evaluate_samples(config, setup.mesh, samples, reference, networks, metrics=metrics, num=num,
                              out_dir=workdir / "eval" / "train" / f"step{step:07d}", write_adm=False, step=step)
    values = {f"eval/{k}": float(v) for k, v in result["metrics"].items()}
    values["eval/seconds"] = time.perf_counter() - start
    logging.info("step %d: eval of %d samples: %s", step, num, json.dumps({k: round(v, 4) for k, v in values.items()}))
    return values
