"""Train state, the jitted train step and the training loop.

One batch's walk: Grain iterator (host-local numpy) -> global arrays sharded over 'data' ->
train step [pyramid.decompose -> normalise by the stored sigmas -> paths (noisy states, targets)
-> MoT -> loss -> optax update -> EMA] -> metrics -> Orbax checkpoint.

All randomness of step s comes from `fold_in(key(seed), s)`, so a resumed run draws exactly the
noise, times and label drops that an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import parameter_overview
from etils import epath
from flax import nnx
from jax.sharding import PartitionSpec as P

from lapflow_jax import checkpoint as ckpt_lib
from lapflow_jax import config as config_lib
from lapflow_jax import generate as generate_lib
from lapflow_jax import loss as loss_lib
from lapflow_jax import metrics as metrics_lib
from lapflow_jax import parallel, paths, pyramid
from lapflow_jax.data import pipeline
from lapflow_jax.models import build_model


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array                 # int32 []
    params: Any                     # pure dict of float32 arrays
    ema_params: Any
    opt_state: Any
    sigmas: jax.Array               # float32 [L], per-scale normalisation, finest first


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a NaN/Inf loss or gradient."""


def make_optimizer(train_cfg: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
    warmup = max(train_cfg.warmup_steps, 1)
    if train_cfg.schedule == "constant" and train_cfg.warmup_steps == 0:
        schedule = optax.constant_schedule(train_cfg.learning_rate)  # step 0 learns too
    elif train_cfg.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, train_cfg.learning_rate, warmup, max(train_cfg.num_steps, warmup + 1))
    else:
        schedule = optax.warmup_constant_schedule(0.0, train_cfg.learning_rate, warmup)
    tx = optax.chain(
        optax.clip_by_global_norm(train_cfg.grad_clip) if train_cfg.grad_clip else optax.identity(),
        optax.adamw(schedule, b1=train_cfg.b1, b2=train_cfg.b2, weight_decay=train_cfg.weight_decay))
    # A non-finite gradient skips the update (params and moments untouched) and is counted. optax
    # would apply updates again after max_consecutive_errors; we stop the run on the host before
    # that (train.max_consecutive_nonfinite), so the cap here is effectively unbounded.
    return optax.apply_if_finite(tx, max_consecutive_errors=2**30), schedule


@dataclasses.dataclass
class Setup:
    """Everything static about a run, derived from the config before anything compiles."""

    config: ml_collections.ConfigDict
    image_shape: tuple[int, int, int]
    num_classes: int
    stage_sizes: tuple[int, ...]
    scale_weights: tuple[float, ...]
    path: paths.MultiScalePath
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    param_specs: Any
    # Where the optimizer update runs and its state and the EMA live: param_specs, or with ZeRO-1
    # (config.zero1) each parameter split over the data-parallel chips (parallel.zero1_specs).
    update_specs: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule

    @property
    def zero1(self) -> bool:
        """ZeRO-1 in effect (`update_specs` is the split, not the parameters' own specs)."""
        return self.update_specs is not self.param_specs


def make_setup(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None, *,
               dataset_classes: int | None = None) -> Setup:
    """Validates the config, builds the mesh and the abstract model. Raises ValueError on bad config.

    dataset_classes: the dataset's number of classes; None reads it from config.data's metadata.
    """
    stage_sizes = config_lib.validate(config)
    mesh = mesh or parallel.mesh_for(config)
    config_lib.validate_for_mesh(config, parallel.data_size(mesh))
    image_shape = config_lib.input_shape(config)  # the latent's shape in latent mode
    if dataset_classes is None:
        dataset_classes = pipeline.num_classes(config.data)
    num_classes = config_lib.validate_labels(config, dataset_classes)
    abstract_model = nnx.eval_shape(lambda: build_model(config, image_shape=image_shape, num_classes=num_classes,
                                                        rngs=nnx.Rngs(config.seed)))
    graphdef, _ = nnx.split(abstract_model)
    tx, schedule = make_optimizer(config.train)
    weights = tuple(config.train.scale_weights or (1.0,) * config.num_scales)
    abstract_params = nnx.to_pure_dict(nnx.state(abstract_model, nnx.Param))
    specs = parallel.param_specs(abstract_model, parallel.logical_rules(config.fsdp))
    # Before anything compiles: every sharded dimension divides by its mesh axis.
    parallel.check_divisible(abstract_params, specs, mesh, num_heads=abstract_model.num_heads)
    return Setup(config=config, image_shape=image_shape, num_classes=num_classes, stage_sizes=stage_sizes,
                 scale_weights=weights, path=paths.MultiScalePath(tuple(config.window_starts), config.path_kind),
                 mesh=mesh, graphdef=graphdef, param_specs=specs,
                 update_specs=update_specs(config, abstract_params, specs, mesh), tx=tx, schedule=schedule)


def update_specs(config: ml_collections.ConfigDict, abstract_params: Any, param_specs: Any,
                 mesh: jax.sharding.Mesh) -> Any:
    """Setup.update_specs: ZeRO-1's split where config.zero1 asks for it and the parameters are
    replicated over several data-parallel chips (no FSDP), else the parameters' own specs."""
    if config.get("zero1", False) and not config.fsdp and parallel.data_size(mesh) > 1:
        return parallel.zero1_specs(abstract_params, param_specs, mesh)
    return param_specs


def _init_state(setup: Setup, sigmas: jax.Array) -> TrainState:
    model = build_model(setup.config, image_shape=setup.image_shape, num_classes=setup.num_classes,
                        rngs=nnx.Rngs(setup.config.seed))
    params = nnx.to_pure_dict(nnx.state(model))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                      opt_state=setup.tx.init(params), sigmas=sigmas)


def state_shardings(setup: Setup) -> TrainState:
    abstract = jax.eval_shape(functools.partial(_init_state, setup), jnp.ones((setup.config.num_scales,)))
    specs = TrainState(step=P(), params=setup.param_specs, ema_params=setup.update_specs,
                       opt_state=parallel.specs_like_params(abstract.opt_state, setup.update_specs), sigmas=P())
    return parallel.named(setup.mesh, specs), abstract


def create_state(setup: Setup, sigmas: np.ndarray) -> TrainState:
    """Initialises the train state directly into its shardings."""
    shardings, _ = state_shardings(setup)
    init = jax.jit(functools.partial(_init_state, setup), out_shardings=shardings)
    return init(jnp.asarray(sigmas, jnp.float32))


def make_train_step(setup: Setup):
    """The jitted train step: (state, batch) -> (state, metrics). State is donated."""
    cfg = setup.config
    base_rng = jax.random.key(cfg.seed)
    decay = cfg.train.ema_decay
    rules = parallel.logical_rules(cfg.fsdp)
    update_shardings = parallel.named(setup.mesh, setup.update_specs)

    def step_fn(state: TrainState, batch: dict[str, jax.Array]):
        # The model pins its key activations by logical names while it traces in here.
        with parallel.activation_sharding(setup.mesh, rules):
            return _step(state, batch)

    def _step(state: TrainState, batch: dict[str, jax.Array]):
        rng = jax.random.fold_in(base_rng, state.step)
        label_rng, loss_rng = jax.random.split(rng)
        residuals = pyramid.decompose(batch["image"], cfg.num_scales, down=cfg.pyramid.down, up=cfg.pyramid.up)
        residuals = [r / state.sigmas[k] for k, r in enumerate(residuals)]
        labels = None
        if setup.num_classes > 0:
            labels = loss_lib.drop_labels(label_rng, batch["label"], cfg.model.class_dropout, setup.num_classes)

        def loss_fn(params):
            model = nnx.merge(setup.graphdef, params)
            return loss_lib.multiscale_loss(model, residuals, labels, loss_rng, setup.path, setup.stage_sizes,
                                            setup.scale_weights)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        params = state.params
        if setup.zero1:
            # Each chip updates its split of the parameters (taking its slice of the replicated
            # ones costs nothing, the gradients may arrive reduce-scattered); out_shardings then
            # gathers the new parameters whole.
            params, grads = jax.lax.with_sharding_constraint((params, grads), (update_shardings,) * 2)
        updates, opt_state = setup.tx.update(grads, state.opt_state, params)
        params = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
        metrics.update(grad_norm=optax.global_norm(grads), learning_rate=setup.schedule(state.step),
                       nonfinite_consecutive=opt_state.notfinite_count,
                       nonfinite_total=opt_state.total_notfinite)
        return state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state), metrics

    shardings, _ = state_shardings(setup)
    batch_sharding = parallel.batch_sharding(setup.mesh)
    # Metrics replicated: every process can read them (float(loss)) without gathering.
    return jax.jit(step_fn, in_shardings=(shardings, batch_sharding),
                   out_shardings=(shardings, parallel.replicated(setup.mesh)), donate_argnums=0)


def measure_sigmas(config: ml_collections.ConfigDict) -> np.ndarray:
    """Per-scale std from a few batches, or the configured values.

    Every host reads the same records (as if it were the only process), so all hosts get the same
    sigmas without any communication.
    """
    if config.pyramid.sigmas is not None:
        return np.asarray(config.pyramid.sigmas, np.float32)
    it = pipeline.make_train_iterator(config.data, global_batch_size=config.train.global_batch_size,
                                      seed=config.seed + 1, process_index=0, process_count=1)
    images = np.concatenate([next(it)["image"] for _ in range(config.pyramid.sigma_batches)])
    sigmas = np.asarray(pyramid.measure_sigmas(images, config.num_scales, down=config.pyramid.down,
                                               up=config.pyramid.up), np.float32)
    # A std at pyramid's floor means a scale without any signal (blank or constant images, or a
    # broken decode): training on it is pointless, so stop here, before anything compiles.
    bad = [k for k, s in enumerate(sigmas) if not np.isfinite(s) or s <= pyramid.SIGMA_FLOOR * (1 + 1e-6)]
    if bad:
        raise ValueError(
            f"per-scale std measured from {images.shape[0]} training images is {sigmas.tolist()} (finest first): "
            f"scale(s) {bad} have no signal (blank or constant images in config.data?). Check the data, or set "
            "config.pyramid.sigmas explicitly.")
    return sigmas


def compiled_flops(compiled) -> float | None:
    """FLOPs of one call per device, from XLA's cost analysis of a compiled program."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX returned one dict per device
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def step_flops_per_device(setup: Setup, compiled, state: TrainState, batch: dict[str, jax.Array]) -> float | None:
    """FLOPs of one train step per device. XLA's cost analysis counts a loop's body once, so with
    config.model.scan_layers the count comes from the unrolled step, lowered (not compiled) for the
    whole mesh and divided by its devices (work replicated on several devices counts once: about
    10% low on a 4x2 mesh of a tiny model, where the compiled unrolled count is exact)."""
    if not setup.config.model.get("scan_layers", False):
        return compiled_flops(compiled)
    config = ml_collections.ConfigDict(setup.config.to_dict())
    config.model.scan_layers = False
    unrolled = make_setup(config, setup.mesh)
    shardings, abstract = state_shardings(unrolled)
    cost = make_train_step(unrolled).lower(ckpt_lib.abstract_with_shardings(abstract, shardings), batch).cost_analysis()
    return float(cost["flops"]) / setup.mesh.size if cost and "flops" in cost else None


def param_counts(setup: Setup, params) -> tuple[list[int], int]:
    """(parameters of each scale's expert, finest first; parameters shared by all scales)."""
    L = setup.config.num_scales
    per_scale = [0] * L
    shared = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = "/".join(str(getattr(p, "key", p)) for p in path)
        # [L, ...], or [depth, L, ...] with config.model.scan_layers.
        stacked = leaf.ndim >= 1 and L in leaf.shape[:2] and any(
            n in names for n in ("adaln", "qkv", "out", "mlp_in", "mlp_out", "final_adaln", "scale_embed"))
        per_expert = any(f"/{k}/" in f"/{names}/" for k in range(L)) and (
            "patch_embed" in names or "final_linear" in names)
        if stacked:
            for k in range(L):
                per_scale[k] += leaf.size // L
        elif per_expert:
            k = int(next(p for p in names.split("/") if p.isdigit()))
            per_scale[k] += leaf.size
        else:
            shared += leaf.size
    return per_scale, shared


def param_summary(setup: Setup, params) -> str:
    """One line: the total and each scale's count, e.g. "52,328 (scale 0: 21,348, ..., shared: 9,632)"."""
    per_scale, shared = param_counts(setup, params)
    parts = [f"scale {k}: {n:,}" for k, n in enumerate(per_scale)] + [f"shared: {shared:,}"]
    return f"{sum(per_scale) + shared:,} ({', '.join(parts)})"


def param_table(setup: Setup, params) -> str:
    """clu's parameter overview plus the parameter count of each scale's expert."""
    table = parameter_overview.get_parameter_overview(params, include_stats=False)
    per_scale, shared = param_counts(setup, params)
    lines = [f"scale {k}: {n:,} parameters" for k, n in enumerate(per_scale)] + [f"shared: {shared:,} parameters"]
    return table + "\n" + "\n".join(lines)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (resuming from the latest checkpoint in workdir) and writes samples at the end.

    Returns a summary: the final step, the loss per step (this process), and the sample grid path.
    """
    workdir = epath.Path(workdir)
    setup = make_setup(config)
    primary = jax.process_index() == 0
    if primary:
        workdir.mkdir(parents=True, exist_ok=True)
    writer = metrics_lib.MetricWriter(workdir / "tensorboard", enabled=primary, jsonl_path=workdir / "metrics.jsonl")
    checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", every_steps=config.checkpoint.every_steps,
                                         keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    # This process's rows of every global batch, read as config.input_shards Grain shards.
    data_iter = parallel.make_input_shards(setup.mesh, functools.partial(
        _shard_iterator, config.data, config.train.global_batch_size, config.seed), config.input_shards)
    shardings, abstract = state_shardings(setup)
    latest = checkpointer.latest_step()
    if latest is not None:
        # Refuses a changed model/scales/windows/batch (listing them) before anything compiles;
        # restore() then checks every array's shape against this model.
        checkpointer.check_resume(latest, config)
        state = checkpointer.restore(latest, ckpt_lib.abstract_with_shardings(abstract, shardings), data_iter)
        logging.info("Resumed from step %d in %s", latest, workdir)
    else:
        state = create_state(setup, measure_sigmas(config))
        logging.info("Per-scale sigmas (finest first): %s", np.asarray(state.sigmas).round(4).tolist())
    if primary:
        # Written only once the resume guard has accepted this config, so that a refused resume
        # leaves the workdir describing its checkpoints.
        (workdir / "config.json").write_text(config.to_json(indent=2))
        # The full table would fill the console: it goes to a file, the counts to one line.
        (workdir / "parameters.txt").write_text(param_table(setup, state.params) + "\n")
        logging.info("Parameters: %s; table in %s", param_summary(setup, state.params), workdir / "parameters.txt")
        if setup.zero1:
            # Says which parameters the split reached: one whose dimensions none divides by the
            # chip count stays whole (and replicated) in the optimizer state and EMA too.
            split = [s != p for s, p in zip(jax.tree.leaves(setup.update_specs), jax.tree.leaves(setup.param_specs))]
            logging.info("ZeRO-1: optimizer state and EMA of %d of %d parameter arrays split over %d data-parallel "
                         "chips", sum(split), len(split), parallel.data_size(setup.mesh))

    train_step = make_train_step(setup)
    step = int(state.step)
    total = config.train.num_steps
    losses = {}
    throughput = None
    consecutive_bad = 0
    interval = metrics_lib.IntervalMean()
    profiler = metrics_lib.StepProfiler(
        workdir / "tensorboard", start=config.log.profile_start_step, num_steps=config.log.profile_num_steps,
        enabled=primary or config.log.profile_processes == "all")
    # SIGTERM on any host: every host saves the same step and exits 0.
    with ckpt_lib.Preemption(step) as preemption:
        while step < total:
            batch = parallel.global_batch(next(data_iter), setup.mesh, config.train.global_batch_size)
            if throughput is None:
                # Compile once, ahead of time: the same executable gives the FLOP count and runs
                # every step (it cannot silently recompile).
                compile_start = time.perf_counter()
                train_step = train_step.lower(state, batch).compile()
                logging.info("Compiled the train step in %.1fs", time.perf_counter() - compile_start)
                throughput = metrics_lib.Throughput(total_steps=total, global_batch=config.train.global_batch_size,
                                                    flops_per_step_per_device=step_flops_per_device(
                                                        setup, train_step, state, batch))
                throughput.start(step)
            profiler.before_step(step + 1)
            with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
                state, metrics = train_step(state, batch)
            step += 1
            profiler.after_step(step, metrics)
            # One fetch per step: the losses (exact resume is checked on these) for the interval
            # means, and the skip counter.
            fetched = jax.device_get({k: v for k, v in metrics.items()
                                      if interval.wants(k) or k == "nonfinite_consecutive"})
            losses[step] = float(fetched["loss"])
            consecutive_bad = int(fetched["nonfinite_consecutive"])
            if not consecutive_bad:  # a skipped step's NaN would hide the interval's other steps
                interval.add(fetched)
            if consecutive_bad:
                logging.warning("step %d: non-finite loss or gradient, update skipped (%d in a row, %d total)",
                                step, consecutive_bad, int(metrics["nonfinite_total"]))
                if consecutive_bad >= config.train.max_consecutive_nonfinite:
                    checkpointer.wait()
                    raise NonFiniteError(
                        f"{consecutive_bad} consecutive non-finite steps up to step {step} "
                        f"(config.train.max_consecutive_nonfinite={config.train.max_consecutive_nonfinite}); "
                        f"the last good checkpoint (step {checkpointer.latest_step()}) is kept in {workdir}.")
            if step % config.log.every_steps == 0 or step == total:
                # Losses and gradient norm: means over the interval's (trained) steps; learning rate
                # and counters: this step's. All skipped: this step's (non-finite) values.
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                values.update(interval.pop())
                values.update(throughput.report(step))
                if primary:
                    metrics_lib.log_line(step, total, values)
                writer.scalars(step, values)
            if config.log.sample_every_steps and step % config.log.sample_every_steps == 0 and step < total:
                write_samples(setup, state, workdir, writer, step)
            stop = preemption.should_stop(step)
            # A skipped step leaves params and moments untouched, so every state is safe to save;
            # still, no interval save inside a streak of skipped steps, so that keep-N rotation never
            # replaces the checkpoints from before the streak (the last good ones).
            if consecutive_bad == 0 or stop or step == total:
                checkpointer.save(step, state, data_iter, config, force=stop or step == total)
            if stop:
                logging.warning("Preempted: checkpoint at step %d saved; exiting.", step)
                break
            if config.eval.every_steps and step % config.eval.every_steps == 0:
                from lapflow_jax import evaluate  # pylint: disable=import-outside-toplevel  (it imports this module)
                writer.scalars(step, evaluate.evaluate_in_training(setup, state, workdir, step))
    profiler.stop()  # a run that ended (or was preempted) inside the traced steps
    checkpointer.wait()
    summary = {"step": step, "losses": losses, "samples": None}
    if step >= total:
        summary["samples"] = write_samples(setup, state, workdir, writer, step)
    checkpointer.close()
    writer.close()
    return summary


def _shard_iterator(data_config, global_batch_size: int, seed: int, shard: int, count: int):
    return pipeline.make_train_iterator(data_config, global_batch_size=global_batch_size, seed=seed,
                                        process_index=shard, process_count=count)


def sample_batch_size(setup: Setup) -> int:
    """The batch `write_samples` samples: config.sample.num_images padded to whole rows (and model
    calls, config.sample.rows_per_call) per data-parallel chip; the extra images are trimmed."""
    return parallel.padded_batch(setup.config.sample.num_images, setup.mesh,
                                 setup.config.sample.get("rows_per_call", 0))


def sampling_params(setup: Setup, state: TrainState) -> Any:
    """The weights samples are drawn with (the EMA with config.sample.use_ema), in the parameters'
    layout: under ZeRO-1 the EMA is split over the data-parallel chips, and gathering it once here
    keeps the gather out of every sampling step."""
    if not setup.config.sample.use_ema:
        return state.params
    if not setup.zero1:
        return state.ema_params
    return jax.jit(lambda p: p, out_shardings=parallel.named(setup.mesh, setup.param_specs))(state.ema_params)


def write_samples(setup: Setup, state: TrainState, workdir: epath.Path, writer, step: int) -> str | None:
    """Samples a grid (EMA weights by default), saves it as PNG and to TensorBoard (process 0)."""
    cfg = setup.config
    params = sampling_params(setup, state)
    rng = jax.random.fold_in(jax.random.key(cfg.seed + 7), step)
    t0 = time.perf_counter()
    # Sampled on the training mesh (params stay sharded, noise is made on the devices).
    out = generate_lib.generate(cfg, setup.graphdef, params, np.asarray(state.sigmas), image_shape=setup.image_shape,
                                num_classes=setup.num_classes, rng=rng, batch=sample_batch_size(setup),
                                previews=cfg.sample.previews, mesh=setup.mesh)
    out.images = out.images[:cfg.sample.num_images]
    out.previews = out.previews and [p[:cfg.sample.num_images] for p in out.previews]
    if jax.process_index() != 0:
        return None
    path = workdir / "samples" / f"samples_step{step:07d}.png"
    grid = generate_lib.image_grid(out.images, columns=generate_lib.grid_columns(setup.num_classes,
                                                                                 len(out.images)))
    generate_lib.save_png(path, grid)
    writer.image(step, "samples", grid)
    if out.previews:
        # One row per segment end, for the first image of each class (or the first 16).
        preview = generate_lib.coarse_to_fine_grid(out.previews,
                                                   max_images=generate_lib.grid_columns(setup.num_classes,
                                                                                        len(out.images)) or 16)
        generate_lib.save_png(workdir / "samples" / f"coarse_to_fine_step{step:07d}.png", preview)
        writer.image(step, "coarse_to_fine", preview)
    logging.info("step %d: wrote %s (NFE per segment %s, %.1fs)", step, path, out.nfe_per_segment,
                 time.perf_counter() - t0)
    writer.flush()
    return str(path)
