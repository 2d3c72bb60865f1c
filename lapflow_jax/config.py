"""Default experiment config and its validation (run before anything compiles).

Experiment files in configs/ start from `base_config()` and change what they need. Per-scale
tuples are ordered finest scale first, like everything else in the package.
"""

from __future__ import annotations

import importlib.util
import pathlib

import math
import os

import ml_collections

from lapflow_jax import paths
from lapflow_jax.data import pipeline
from lapflow_jax.evaluation import networks
from lapflow_jax.models import attention, presets
from lapflow_jax.models.mot import ARCHITECTURES, REMAT_POLICIES
from lapflow_jax.pyramid import DOWN_FILTERS, UP_FILTERS
from lapflow_jax.sampling import ERROR_NORMS, METHODS

# Metrics of the eval mode (lapflow_jax/evaluate.py; evaluation/networks.py says what each reads).
EVAL_METRICS = networks.METRICS


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_scales = 2
    c.window_starts = (0.5, 0.0)      # T_k per scale, finest first; coarsest 0.
    c.path_kind = "global"            # "global" (paper) or "local" (ours).

    c.pyramid = ml_collections.ConfigDict()
    c.pyramid.down = "area"
    c.pyramid.up = "bilinear"
    # Per-scale normalisation factors (finest first). None: measured once from data at the start
    # of a run and stored in the checkpoint.
    c.pyramid.sigmas = ml_collections.config_dict.placeholder(tuple)
    c.pyramid.sigma_batches = 4

    c.model = ml_collections.ConfigDict()
    c.model.preset = "tiny"
    c.model.hidden_size = 0           # 0: from the preset.
    c.model.depth = 0
    c.model.num_heads = 0
    c.model.patch_sizes = (2, 2)
    c.model.mlp_ratio = 4.0
    c.model.class_dropout = 0.1       # label dropout for classifier-free guidance.
    c.model.conditional = True        # use the dataset's labels when it has them.
    c.model.attention_backend = "auto"    # splash on TPU, cuDNN on GPU (bf16), XLA prefix form elsewhere.
    c.model.architecture = "mot"      # "separate": one transformer per scale (models.mot.SeparateScaleModels).
    c.model.attention_mask = "block_causal"  # visibility between scales: attention.MASKS ("full", "self": ablations).
    c.model.time_scale = 1000.0
    c.model.dtype = "float32"         # compute dtype; parameters and optimizer stay float32.
    c.model.remat = "none"            # per-block activation checkpointing: mot.REMAT_POLICIES.
    c.model.scan_layers = False       # blocks stacked [depth, ...] and run by lax.scan (fast compile).

    c.data = pipeline.default_config()

    c.train = ml_collections.ConfigDict()
    c.train.global_batch_size = 32
    c.train.num_steps = 1000
    c.train.stage_fractions = ml_collections.config_dict.placeholder(tuple)  # None: equal.
    c.train.scale_weights = ml_collections.config_dict.placeholder(tuple)    # None: all 1.
    c.train.learning_rate = 1e-4
    c.train.warmup_steps = 0
    c.train.schedule = "constant"     # "constant" or "cosine" (after warmup).
    c.train.weight_decay = 0.0
    c.train.b1 = 0.9
    c.train.b2 = 0.999
    c.train.grad_clip = 1.0
    c.train.ema_decay = 0.9999
    c.train.max_consecutive_nonfinite = 10

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 500
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True
    # Resume even though resume-critical fields (model, scales, windows, batch, data) changed;
    # the parameter shapes must still match. See checkpoint.RESUME_CRITICAL.
    c.checkpoint.force_resume = False

    c.log = ml_collections.ConfigDict()
    c.log.every_steps = 50
    c.log.sample_every_steps = 0      # 0: only at the end.
    # jax.profiler trace of steps [profile_start_step, profile_start_step + profile_num_steps),
    # counted as the log lines count them (the first step is 1), written next to the TensorBoard
    # events: <workdir>/tensorboard/plugins/profile/<run>/ (local or gs://). 0: no trace. Pick a
    # step after the first (which compiles) for steady-state steps.
    c.log.profile_start_step = 0
    c.log.profile_num_steps = 2
    c.log.profile_processes = "first"  # "first": process 0 only; "all": every process (one file per host).

    c.sample = ml_collections.ConfigDict()
    c.sample.method = "heun"
    c.sample.steps = 50               # total over the segments, split by segment length.
    c.sample.guidance_scale = 1.0
    c.sample.num_images = 16
    c.sample.batch_size = 16
    c.sample.rtol = 1e-3
    c.sample.atol = 1e-3
    # dopri5 across window starts (sampling.Dopri5Options): carry the step size over a window start
    # (False: cold restart per segment, as before); measure the error on the reconstructed image
    # ("image") or on the normalised scales ("state", diffrax's default); one step size per sample
    # (False: one for the batch, from the RMS over all samples).
    c.sample.dopri5_carry_step = True
    c.sample.dopri5_norm = "image"
    c.sample.dopri5_per_sample = True
    # Samples per data shard in one model call (0: the whole sample batch in one call). Set, the
    # batch is evaluated in chunks of that shape (lax.map), so sample i is the same bits at any
    # sample batch that divides into chunks (XLA rounds a row differently at different batch
    # sizes), and a big sample batch needs only one chunk's activations.
    c.sample.rows_per_call = 0
    c.sample.previews = True
    c.sample.use_ema = True
    c.sample.grid_images = 64         # sample mode: images in grid.png (the .npz has all of them).
    c.sample.gflops = True            # sample mode: GFLOPs per sample (XLA cost analysis) + baseline.

    # Upsample mode (--mode=upsample, upsample.py): super-resolution / variations of the user's images
    # from the trained model, with config.sample's solver (docs/method.md, "Conditional sampling").
    c.upsample = ml_collections.ConfigDict()
    c.upsample.input = ""             # a folder of images or an .npz (`images`/`arr_0` uint8 [N, h, w, C]).
    c.upsample.split = ""             # instead of input: this split of config.data ("test"; latent mode:
    #                                   of config.latent.source), each image
    #                                   downsampled by upsample.factor (0: 2) with the model's Down.
    c.upsample.num_images = 0         # inputs to use (the first ones); 0: all.
    c.upsample.samples_per_image = 4  # k samples of each input.
    c.upsample.sampler = "inversion"  # "inversion" (exact) or "replacement" (the usual shortcut).
    c.upsample.project_steps = False  # also project the clean estimate at every step ("P" variants).
    c.upsample.label = -1             # class-conditional models: the class; -1: the null class.
    c.upsample.variation_t0 = 0.0     # 0: super-resolution; in (0, 1): variations of full-size inputs from t0.
    c.upsample.factor = 0             # 0: from the input size (variations: 2); else 2, 4, ...
    c.upsample.batch_size = 8         # inputs per batch (each gives samples_per_image rows).
    c.upsample.grid_images = 8        # rows of grid.png.
    # Latent mode: the constraint holds exactly on the latent's coarse scales, not on the decoded
    # pixels; True projects the decoded images onto Down^m = input in pixels (as pixel mode's outputs
    # are), which can only bring them closer to any image the input could have come from.
    c.upsample.project_decoded = True

    # Eval mode (--mode=eval, docs/evaluation.md): samples of a checkpoint against a reference.
    c.eval = ml_collections.ConfigDict()
    # "fid", "sfid", "inception_score", "precision_recall" (InceptionV3: need inception_weights),
    # "fd_efficientnet" (packaged weights) and "swd".
    c.eval.metrics = ("fd_efficientnet", "swd")
    c.eval.num_samples = 50000
    c.eval.labels = "random"          # class-conditional: "random" (ADM, DiT) or "balanced" (i mod classes).
    c.eval.reference_split = "test"   # dataset split giving the reference images.
    c.eval.num_reference = 0          # 0: as many as num_samples (or the whole split, if smaller).
    # .npz with `arr_0` (ADM's reference batches) or `images` [N, H, W, C]: replaces the dataset
    # split; its stored `mu`, `sigma` (and `mu_s`, `sigma_s`) give FID's (and sFID's) statistics.
    c.eval.reference_npz = ""
    c.eval.fid_stats = ""             # .npz with `mu`, `sigma` (pytorch-fid/TTUR/ADM layout) for FID.
    c.eval.inception_weights = ""     # local pt_inception-2015-12-05-6726825d.pth.
    c.eval.inception_preprocessing = "tensorflow"  # "tensorflow" (ADM, TTUR) or "pytorch_fid".
    c.eval.feature_batch_size = 50    # global batch of the reference pass (rounded up to the data axis).
    c.eval.swd_num_images = 10000     # swd compares at most this many samples and reference images.
    c.eval.part_rows = 0              # rows per part file (the unit of resume) over all hosts; 0: ~64 MB.
    c.eval.samples_npz = ""           # evaluate these `arr_0`/`images` instead of sampling a checkpoint.
    # During training: every `every_steps` steps (0: never), `train_metrics` of `train_num_samples`
    # samples of the EMA weights, logged to TensorBoard as eval/<metric> (cost: docs/evaluation.md).
    c.eval.every_steps = 0
    c.eval.train_metrics = ("fd_efficientnet",)
    c.eval.train_num_samples = 1000

    # Latent mode (docs/latent.md): the flow runs on autoencoder latents cached once by
    # `python -m lapflow_jax.latents --config=...` into data.latents_dir (data.name = "latents");
    # samples are decoded through the autoencoder.
    c.latent = ml_collections.ConfigDict()
    c.latent.enabled = False
    c.latent.autoencoder = ""         # converted or diffusers AutoencoderKL folder ("": the cache's).
    c.latent.shape = ml_collections.config_dict.placeholder(tuple)  # (h, w, c), e.g. (32, 32, 4) at 256 px.
    c.latent.dtype = "float32"        # autoencoder compute dtype: "float32" or "bfloat16".
    c.latent.decode_batch_size = 8
    c.latent.source = pipeline.default_config()  # the pixel dataset the caching command encodes.
    c.latent.flip = True              # also cache each image's mirror (used when data.random_flip).
    c.latent.encode_batch_size = 16   # per host.
    c.latent.images_per_shard = 1024  # the unit of resume.
    c.latent.store_dtype = "float32"  # or "float16" (half the disk).

    c.mesh_shape = (-1, 1)            # ('data', 'model'); -1: the rest of the devices.
    c.fsdp = False                    # also shard parameters, optimizer state and EMA over 'data'...
    # ...in groups of this many chips (0: the largest divisor of mesh_shape[0] up to 32), data
    # parallel across groups: libtpu compiles a weight all-gather over 64+ chips as an all-reduce.
    c.fsdp_group = 0
    # ZeRO-1, without FSDP on a data-parallel axis of several chips: the optimizer update, the
    # AdamW moments and the EMA are split over the data-parallel chips (parameters stay whole), so
    # each chip updates 1/data of them (parallel.zero1_specs). Checkpoints restore either way.
    c.zero1 = False
    # Slices the global batch is read as (parallel.InputShards); 0: one per group of hosts holding
    # distinct rows. Fix it (e.g. to the largest host count) to make every step's batch the same
    # on any number of hosts.
    c.input_shards = 0
    return c


def _per_scale(c, field: str, value, num_scales: int):
    if value is not None and len(value) != num_scales:
        raise ValueError(f"config.{field}={tuple(value)} has {len(value)} entries, but "
                         f"config.num_scales={num_scales}; give one per scale, finest first.")


def input_shape(c: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """(H, W, C) of what the flow model sees: config.latent.shape in latent mode, else the image."""
    if not c.latent.enabled:
        return pipeline.image_shape(c.data)
    shape = c.latent.shape
    if shape is None or len(shape) != 3 or not all(isinstance(v, int) and v > 0 for v in shape):
        raise ValueError(f"config.latent.shape={shape!r} must be (height, width, channels) of a latent, "
                         "e.g. (32, 32, 4) for 256 px images and an f = 8 autoencoder.")
    return tuple(shape)


def _validate_latent(c: ml_collections.ConfigDict) -> None:
    if c.latent.enabled != (c.data.name == "latents"):
        raise ValueError(
            f"config.latent.enabled={c.latent.enabled} with config.data.name={c.data.name!r}: latent mode trains "
            "on cached latents, so set both (latent.enabled=True and data.name='latents', with data.latents_dir "
            "written by `python -m lapflow_jax.latents`) or neither.")
    if not c.latent.enabled:
        return
    from lapflow_jax.data import latents as latents_data  # pylint: disable=import-outside-toplevel

    shape = input_shape(c)
    if c.data.latents_dir and os.path.isfile(latents_data.info_path(c.data.latents_dir)):
        cached = latents_data.latent_shape(c.data.latents_dir)
        if cached != shape:
            raise ValueError(f"config.latent.shape={shape}, but the latents cached in config.data.latents_dir="
                             f"{c.data.latents_dir} are {cached}.")


def validate(c: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the field, its value and what is allowed."""
    L = c.num_scales
    if not isinstance(L, int) or L < 1:
        raise ValueError(f"config.num_scales={L!r} must be an integer >= 1.")
    _per_scale(c, "window_starts", c.window_starts, L)
    paths.validate_window_starts(c.window_starts, field="config.window_starts")
    if c.path_kind not in paths.PATH_KINDS:
        raise ValueError(f"config.path_kind={c.path_kind!r} is not one of {paths.PATH_KINDS}.")
    if c.pyramid.down not in DOWN_FILTERS:
        raise ValueError(f"config.pyramid.down={c.pyramid.down!r} is not one of {DOWN_FILTERS}.")
    if c.pyramid.up not in UP_FILTERS:
        raise ValueError(f"config.pyramid.up={c.pyramid.up!r} is not one of {UP_FILTERS}.")
    _per_scale(c, "pyramid.sigmas", c.pyramid.sigmas, L)
    if c.pyramid.sigmas is not None and min(c.pyramid.sigmas) <= 0:
        raise ValueError(f"config.pyramid.sigmas={tuple(c.pyramid.sigmas)} must all be > 0.")
    _per_scale(c, "model.patch_sizes", c.model.patch_sizes, L)
    _per_scale(c, "train.scale_weights", c.train.scale_weights, L)
    _per_scale(c, "train.stage_fractions", c.train.stage_fractions, L)
    if c.model.preset not in presets.PRESETS:
        raise ValueError(f"config.model.preset={c.model.preset!r} is not one of {sorted(presets.PRESETS)}.")
    if c.model.dtype not in presets.DTYPES:
        raise ValueError(f"config.model.dtype={c.model.dtype!r} is not one of {sorted(presets.DTYPES)}.")
    if c.model.remat not in REMAT_POLICIES:
        raise ValueError(f"config.model.remat={c.model.remat!r} is not one of {tuple(REMAT_POLICIES)}.")
    if c.input_shards < 0:
        raise ValueError(f"config.input_shards={c.input_shards} must be >= 0 (0: one per host group).")
    if c.model.attention_backend not in attention.BACKENDS:
        raise ValueError(f"config.model.attention_backend={c.model.attention_backend!r} is not one of "
                         f"{attention.BACKENDS}.")
    if c.model.architecture not in ARCHITECTURES:
        raise ValueError(f"config.model.architecture={c.model.architecture!r} is not one of {ARCHITECTURES}.")
    if c.model.attention_mask not in attention.MASKS:
        raise ValueError(f"config.model.attention_mask={c.model.attention_mask!r} is not one of {attention.MASKS}.")
    if c.sample.dopri5_norm not in ERROR_NORMS:
        raise ValueError(f"config.sample.dopri5_norm={c.sample.dopri5_norm!r} is not one of {ERROR_NORMS}.")
    if c.sample.method not in METHODS:
        raise ValueError(f"config.sample.method={c.sample.method!r} is not one of {METHODS}.")
    rows = c.sample.get("rows_per_call", 0)
    if rows < 0 or (rows and c.sample.batch_size % rows):
        raise ValueError(f"config.sample.rows_per_call={rows} must be 0 (one call per batch) or divide "
                         f"config.sample.batch_size={c.sample.batch_size}.")
    if c.model.conditional and c.sample.guidance_scale != 1.0 and c.model.class_dropout == 0:
        # Without label dropout the model has no null-class row (and never learns an unconditional
        # velocity): guidance would silently read a real class as its "null" (JAX clamps the index).
        raise ValueError(
            f"config.sample.guidance_scale={c.sample.guidance_scale} needs a trained null class, but "
            f"config.model.class_dropout={c.model.class_dropout}: train with class_dropout > 0 (e.g. 0.1) "
            "or sample with guidance_scale=1.0.")
    for field in ("metrics", "train_metrics"):
        metrics = tuple(c.eval[field])
        if not metrics or any(m not in EVAL_METRICS for m in metrics):
            raise ValueError(f"config.eval.{field}={metrics}: each must be one of {EVAL_METRICS}.")
    if c.eval.labels not in ("random", "balanced"):
        raise ValueError(f"config.eval.labels={c.eval.labels!r} is not one of ('random', 'balanced').")
    if c.eval.inception_preprocessing not in ("tensorflow", "pytorch_fid"):
        raise ValueError(f"config.eval.inception_preprocessing={c.eval.inception_preprocessing!r} is not one of "
                         "('tensorflow', 'pytorch_fid').")
    if c.train.schedule not in ("constant", "cosine"):
        raise ValueError(f"config.train.schedule={c.train.schedule!r} is not one of ('constant', 'cosine').")
    _validate_latent(c)
    if c.data.name not in pipeline.NAMES:
        raise ValueError(f"config.data.name={c.data.name!r} is not one of {pipeline.NAMES}.")
    height, width, _ = input_shape(c)
    # Scale k is the image halved k times; its own patch size must divide it (a coarse scale may
    # use a smaller patch than the finest, e.g. (8, 8, 8, 4) for 4 scales of 32 px).
    if height % 2 ** (L - 1) or width % 2 ** (L - 1):
        raise ValueError(f"config.data.image_size={height}x{width} must be divisible by 2**(num_scales-1) = "
                         f"{2 ** (L - 1)} to make {L} scales.")
    for k, p in enumerate(c.model.patch_sizes):
        if (height >> k) % p or (width >> k) % p:
            raise ValueError(
                f"config.data.image_size={height}x{width} halved {k} times is {height >> k}x{width >> k}, "
                f"which config.model.patch_sizes[{k}]={p} does not divide.")
    hidden, _, heads = presets.model_size(c.model)
    if hidden % heads:
        raise ValueError(f"config.model hidden size {hidden} is not divisible by num_heads {heads}.")
    batch = c.train.global_batch_size
    try:
        stage_sizes = paths.stage_batch_sizes(batch, c.train.stage_fractions, L)
    except ValueError as e:
        raise ValueError(f"config.train.global_batch_size={batch} with config.train.stage_fractions="
                         f"{c.train.stage_fractions}: {e}") from e
    if not 0 <= c.train.ema_decay < 1:
        raise ValueError(f"config.train.ema_decay={c.train.ema_decay} must be in [0, 1).")
    _validate_ranges(c)
    return stage_sizes


def _validate_ranges(c: ml_collections.ConfigDict) -> None:
    """Counts, intervals and rates that must be in range (ml_collections already checks types)."""
    at_least = {"train.num_steps": 1, "train.global_batch_size": 1, "train.warmup_steps": 0,
                "train.max_consecutive_nonfinite": 1, "checkpoint.every_steps": 1, "checkpoint.keep": 1,
                "log.every_steps": 1, "log.sample_every_steps": 0, "log.profile_start_step": 0,
                "log.profile_num_steps": 1, "sample.steps": 1, "sample.num_images": 1,
                "sample.batch_size": 1, "eval.num_samples": 2, "eval.num_reference": 0,
                "eval.feature_batch_size": 1, "eval.swd_num_images": 2, "eval.part_rows": 0, "eval.every_steps": 0,
                "eval.train_num_samples": 2}
    for field, low in at_least.items():
        value = c[field.split(".")[0]][field.split(".")[1]]
        if value < low:
            raise ValueError(f"config.{field}={value} must be >= {low}.")
    if c.log.profile_processes not in ("first", "all"):
        raise ValueError(f"config.log.profile_processes={c.log.profile_processes!r} is not one of ('first', 'all').")
    if c.sample.steps < c.num_scales:
        raise ValueError(f"config.sample.steps={c.sample.steps} must be >= config.num_scales={c.num_scales}: "
                         "each segment between window starts needs a step.")
    for field in ("train.learning_rate", "train.grad_clip", "train.weight_decay"):
        value = c[field.split(".")[0]][field.split(".")[1]]
        if not math.isfinite(value) or value < 0 or (field == "train.learning_rate" and value == 0):
            raise ValueError(f"config.{field}={value} must be a finite number "
                             f"{'> 0' if field == 'train.learning_rate' else '>= 0'}.")
    weights = c.train.scale_weights
    if weights is not None and (not all(math.isfinite(w) and w >= 0 for w in weights) or not any(weights)):
        raise ValueError(f"config.train.scale_weights={tuple(weights)} must be finite, >= 0 and not all 0.")
    if not 0 <= c.model.class_dropout < 1:
        raise ValueError(f"config.model.class_dropout={c.model.class_dropout} must be in [0, 1).")
    _validate_upsample(c)


def _validate_upsample(c: ml_collections.ConfigDict) -> None:
    from lapflow_jax.conditional import SAMPLERS  # pylint: disable=import-outside-toplevel
    u = c.upsample
    if u.sampler not in SAMPLERS:
        raise ValueError(f"config.upsample.sampler={u.sampler!r} is not one of {SAMPLERS}.")
    if u.input and u.split:
        raise ValueError(f"config.upsample.input={u.input!r} and config.upsample.split={u.split!r}: give one.")
    if u.num_images < 0:
        raise ValueError(f"config.upsample.num_images={u.num_images} must be >= 0 (0: all inputs).")
    for field in ("samples_per_image", "batch_size", "grid_images"):
        if u[field] < 1:
            raise ValueError(f"config.upsample.{field}={u[field]} must be >= 1.")
    if not (math.isfinite(u.variation_t0) and 0 <= u.variation_t0 < 1):
        raise ValueError(f"config.upsample.variation_t0={u.variation_t0} must be in [0, 1) (0: super-resolution).")
    if u.factor != 0 and (u.factor < 2 or u.factor & (u.factor - 1)):
        raise ValueError(f"config.upsample.factor={u.factor} must be 0 (from the input size) or a power of 2 >= 2.")
    if u.factor and 2 ** (c.num_scales - 1) < u.factor:
        raise ValueError(f"config.upsample.factor={u.factor} needs more scales than config.num_scales="
                         f"{c.num_scales} (a 2^m x upsample needs m + 1).")
    if u.label < -1 or (u.label >= 0 and not c.model.conditional):
        raise ValueError(f"config.upsample.label={u.label} must be -1 (null class / unconditional) or a class id of a "
                         "class-conditional model (config.model.conditional).")


def validate_for_mesh(c: ml_collections.ConfigDict, data_axis_size: int) -> None:
    """Batch checks that need the mesh: every per-stage sub-batch must split over 'data'."""
    batch = c.train.global_batch_size
    if batch % data_axis_size:
        raise ValueError(f"config.train.global_batch_size={batch} is not divisible by the mesh's data axis "
                         f"({data_axis_size} devices).")
    sizes = paths.stage_batch_sizes(batch, c.train.stage_fractions, c.num_scales)
    bad = [s for s in sizes if s % data_axis_size]
    if bad:
        raise ValueError(
            f"per-stage sub-batches {sizes} (config.train.global_batch_size={batch} split by "
            f"config.train.stage_fractions={c.train.stage_fractions}) must each be divisible by the data "
            f"axis size {data_axis_size}; choose a global batch that is a multiple of "
            f"{data_axis_size * c.num_scales}.")


def validate_labels(c: ml_collections.ConfigDict, num_classes: int) -> int:
    """The number of classes the model is conditioned on (0 = unconditional)."""
    if c.sample.guidance_scale != 1.0 and not c.model.conditional:
        raise ValueError(
            f"config.sample.guidance_scale={c.sample.guidance_scale} needs a class-conditional model, but "
            "config.model.conditional=False; set guidance_scale to 1.0 or model.conditional to True.")
    if c.model.conditional and c.sample.guidance_scale != 1.0 and num_classes == 0:
        raise ValueError(
            f"config.sample.guidance_scale={c.sample.guidance_scale} needs a class-conditional model, but "
            f"dataset config.data.name={c.data.name!r} has no labels; set guidance_scale to 1.0 or use a "
            "labelled dataset.")
    return num_classes if c.model.conditional else 0


def config_from_file(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """get_config() of the config file at `path`: for configs that build on another one."""
    path = pathlib.Path(path)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def single_scale_baseline(lapflow_config_path: str | os.PathLike) -> ml_collections.ConfigDict:
    """The LapFlow config in `lapflow_config_path` turned into its single-scale baseline.

    Everything else (data, autoencoder, model size, optimiser, sampler) stays, so the two runs
    differ only in the multi-scale part: one scale on the whole [0, 1], the finest patch size.
    The MoT with one scale is a plain DiT/SiT velocity model.
    """
    c = config_from_file(lapflow_config_path)
    c.num_scales = 1
    c.window_starts = (0.0,)
    c.model.patch_sizes = (c.model.patch_sizes[0],)
    return c
