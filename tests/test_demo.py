"""The README's demo makes digits a person (and a classifier) recognises: configs/demo.py exactly as
shipped, trained, sampled class-conditionally by the sample mode, judged by a CNN trained on the
digits' own train split (issue: at least 70% of the samples must carry their class)."""

import json

import demo_run
import numpy as np
import pytest

from lapflow_jax import sample as sample_lib
from lapflow_jax import train
from lapflow_jax.evaluation import classifier


@pytest.mark.slow
def test_demo_samples_show_their_digit(tmp_path):
    # One device (conftest's 8 fake ones would only slow the 2 cores down); 200 samples, 20 per class.
    config = demo_run.demo_config({"mesh_shape": (1, 1), "sample.num_images": 200, "sample.gflops": False})
    workdir = tmp_path / "demo"
    summary = train.train(config, str(workdir))
    assert summary["step"] == config.train.num_steps
    sample_lib.sample_from_checkpoint(config, str(workdir))
    out = workdir / "generated" / f"step{summary['step']:07d}"
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
          f"(CFG {config.sample.guidance_scale}); per class {np.round(per_class, 2).tolist()}; "
          f"summary {json.loads((out / 'summary.json').read_text())['nfe_per_segment']}")
    assert judge.test_accuracy >= 0.9
    assert accuracy >= 0.7
