"""The README's demo makes digits a person (and a classifier) recognises: configs/demo.py exactly as
shipped, trained and then sampled class-conditionally by the command line (one CPU device, as a
user's shell has), judged by a CNN trained on the digits' own train split (at least 70% of the
samples must carry their class)."""

import os
import subprocess
import sys

import demo_run
import numpy as np
import pytest

from lapflow_jax.evaluation import classifier


def run_main(*args: str) -> None:
    # conftest.py's 8 fake devices are for the sharding tests; the demo runs as a user runs it.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run([sys.executable, "-m", "lapflow_jax.main", f"--config={demo_run.DEMO_CONFIG}", *args],
                          cwd=demo_run.REPO, env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
                          timeout=3600)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


@pytest.mark.slow
def test_demo_samples_show_their_digit(tmp_path):
    workdir = tmp_path / "demo"
    config = demo_run.demo_config({})
    run_main(f"--workdir={workdir}")
    # 200 samples, 20 per digit (labels i mod 10), with the demo's guidance and sampler.
    run_main(f"--workdir={workdir}", "--mode=sample", "--config.sample.num_images=200",
             "--config.sample.gflops=False")
    (out,) = (workdir / "generated").iterdir()
    assert out.name == f"step{config.train.num_steps:07d}"
    with np.load(out / "samples.npz") as f:
        images, labels = f["images"], f["labels"]
    assert images.shape == (200, 32, 32, 1) and np.bincount(labels).tolist() == [20] * 10

    train_x, train_y = classifier.labelled_split(config.data, "train")
    test_x, test_y = classifier.labelled_split(config.data, "test")
    judge = classifier.train_classifier(train_x, train_y, num_classes=10, steps=600, test_images=test_x,
                                        test_labels=test_y)
    accuracy = judge.accuracy(images, labels)
    per_class = [judge.accuracy(images[labels == c], labels[labels == c]) for c in range(10)]
    print(f"classifier: {judge.test_accuracy:.3f} on the 300 real test digits; {accuracy:.3f} on 200 demo samples "
          f"(CFG {config.sample.guidance_scale}); per class {np.round(per_class, 2).tolist()}")
    assert judge.test_accuracy >= 0.9
    assert accuracy >= 0.7
