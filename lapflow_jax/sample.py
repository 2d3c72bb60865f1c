"""The sample mode: N images from the latest checkpoint, as PNG grids and an .npz.

Images are generated in batches; batch i uses `fold_in(key, i)`, so an interrupted run resumes
at the first missing batch file and produces exactly the images an uninterrupted run would.
"""

from __future__ import annotations

import json

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from lapflow_jax import checkpoint as ckpt_lib
from lapflow_jax import generate as generate_lib
from lapflow_jax import train as train_lib


def sample_from_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
    workdir = epath.Path(workdir)
    setup = train_lib.make_setup(config)
    checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", every_steps=1, keep=config.checkpoint.keep)
    step = checkpointer.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}: train first (--mode=train).")
    shardings, abstract = train_lib.state_shardings(setup)
    state = checkpointer.restore_state(step, ckpt_lib.abstract_with_shardings(abstract, shardings))
    params = state.ema_params if config.sample.use_ema else state.params
    out_dir = workdir / "generated" / f"step{step:07d}"
    out_dir.mkdir(parents=True, exist_ok=True)
    batch = config.sample.batch_size
    num_batches = -(-config.sample.num_images // batch)
    base = jax.random.key(config.seed + 11)
    nfe = None
    for i in range(num_batches):
        part = out_dir / f"batch{i:05d}.npz"
        if part.exists():
            continue
        out = generate_lib.generate(config, setup.graphdef, params, np.asarray(state.sigmas),
                                    image_shape=setup.image_shape, num_classes=setup.num_classes,
                                    rng=jax.random.fold_in(base, i), batch=batch, previews=False)
        nfe = out.nfe_per_segment
        with part.open("wb") as f:
            np.savez(f, images=out.images)
        logging.info("batch %d/%d done (NFE per segment %s)", i + 1, num_batches, nfe)
    images = []
    for i in range(num_batches):
        with (out_dir / f"batch{i:05d}.npz").open("rb") as f:
            images.append(np.load(f)["images"])
    images = np.concatenate(images)[:config.sample.num_images]
    with (out_dir / "samples.npz").open("wb") as f:
        np.savez(f, images=images)
    generate_lib.save_png(out_dir / "grid.png", generate_lib.image_grid(images[:64]))
    summary = {"step": step, "num_images": int(images.shape[0]), "nfe_per_segment": nfe, "dir": str(out_dir)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    logging.info("wrote %d samples to %s", images.shape[0], out_dir)
    checkpointer.close()
    return summary
