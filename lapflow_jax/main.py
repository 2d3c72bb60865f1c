"""Command line: train, sample or evaluate a LapFlow model.

    python -m lapflow_jax.main --config=configs/demo.py --workdir=/tmp/lapflow_demo
    python -m lapflow_jax.main --config=configs/demo.py --workdir=/tmp/lapflow_demo --mode=sample
    python -m lapflow_jax.main --config=configs/demo.py --workdir=/tmp/lapflow_demo --mode=eval [--step=1500]
    python -m lapflow_jax.main --config=configs/demo.py --workdir=/tmp/lapflow_demo --mode=upsample \
        --config.upsample.input=low_res/

Config fields are overridden with --config.<field>=<value>; an unknown field is an error.
Relative and ~ paths (--workdir, config paths such as data.data_dir) are taken from the directory
the command runs in. The console shows the run's own progress and all warnings; --verbose adds
other libraries' INFO lines and the traceback of a bad config, path or dataset (see cli.py).
On several processes (GPU clusters, or CPU tests) pass --coordinator_address, --num_processes
and --process_id; on Cloud TPU jax.distributed.initialize() finds them itself.
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

from lapflow_jax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events and samples go here (local or gs://).")
flags.DEFINE_enum("mode", "train", ["train", "sample", "eval", "upsample"],
                  "What to do: train; sample (images, grids, GFLOPs: sample.py); eval (FID etc.: evaluate.py); "
                  "upsample (super-resolution / variations of config.upsample.input: upsample.py).")
flags.DEFINE_integer("step", None, "--mode=sample and --mode=eval: the checkpoint step to use (default: the latest).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs off TPU.")
flags.DEFINE_integer("num_processes", None, "Number of processes, for multi-process runs off TPU.")
flags.DEFINE_integer("process_id", None, "This process's index, for multi-process runs off TPU.")
flags.DEFINE_bool("distributed", None, "Force jax.distributed.initialize() on (True) or off (False); "
                  "default: on when a coordinator is given or on a TPU pod.")
cli.define_verbose_flag()
flags.mark_flags_as_required(["config", "workdir"])


def _on_multihost_tpu() -> bool:
    """True on a TPU pod slice or a multi-slice job: the TPU runtime names several workers (or a
    multi-slice coordinator) in the environment, and every worker must join the same program."""
    workers = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in workers or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def _maybe_initialize_distributed() -> None:
    import jax

    explicit = FLAGS.coordinator_address is not None
    if FLAGS.distributed is False:
        return
    if explicit:
        jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                   num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    elif FLAGS.distributed or _on_multihost_tpu():
        jax.distributed.initialize()  # Cloud TPU / SLURM: auto-detected
    if jax.process_count() > 1:
        logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                     jax.local_device_count(), jax.device_count())


@cli.one_line_errors
def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.setup_console(FLAGS.verbose)
    # Once, here: everything below sees absolute paths (or URLs).
    workdir = cli.resolve_path(FLAGS.workdir)
    cli.resolve_config_paths(FLAGS.config)
    _maybe_initialize_distributed()
    from lapflow_jax import sample as sample_lib
    from lapflow_jax import train as train_lib

    if FLAGS.mode == "train":
        train_lib.train(FLAGS.config, workdir)
    elif FLAGS.mode == "eval":
        from lapflow_jax import evaluate as evaluate_lib
        evaluate_lib.evaluate_from_checkpoint(FLAGS.config, workdir, step=FLAGS.step)
    elif FLAGS.mode == "upsample":
        from lapflow_jax import upsample as upsample_lib
        upsample_lib.upsample_from_checkpoint(FLAGS.config, workdir, step=FLAGS.step)
    else:
        sample_lib.sample_from_checkpoint(FLAGS.config, workdir, step=FLAGS.step)


def run():
    """Console-script entry point (`lapflow`)."""
    app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run()
