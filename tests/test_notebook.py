"""The Colab demo notebook (launch/colab_demo.ipynb) runs top to bottom on the CPU and draws its figures.

The notebook reads LAPFLOW_DEMO_SIZE (and LAPFLOW_DEMO_WORKDIR); "ci" shrinks the run to a smoke
test: 16x16 images, a 1-block 32-wide model, 6 steps. nbclient executes it in a fresh ipykernel
started in the repository root, as a user would in Jupyter; matplotlib's inline backend turns
every `plt.show()` into an image/png output, which is what these tests inspect.
"""

import base64
import io
from pathlib import Path

import nbformat
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "launch" / "colab_demo.ipynb"
FIGURE_TAGS = ("figure-loss", "figure-samples", "figure-coarse-to-fine", "figure-upsample")


def _tagged(nb, tag):
    cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def _png_outputs(cell) -> list[np.ndarray]:
    images = []
    for output in cell.get("outputs", []):
        data = output.get("data", {})
        if "image/png" in data:
            images.append(np.asarray(Image.open(io.BytesIO(base64.b64decode(data["image/png"]))).convert("RGB")))
    return images


def _text(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream":
            parts.append(output["text"])
        elif "text/plain" in output.get("data", {}):
            parts.append(output["data"]["text/plain"])
    return "".join(parts)


def test_notebook_is_valid_and_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "clear the outputs before committing"
    params = _tagged(nb, "parameters")  # papermill injects its parameters after this cell
    assert "LAPFLOW_DEMO_SIZE" in params.source
    # One Colab form field says where the code comes from; no placeholder URL anywhere.
    assert 'REPO_SOURCE = ""  # @param {type:"string"}' in params.source
    assert "YOUR-ORG" not in NOTEBOOK.read_text() and "github.com/" not in params.source
    for tag in FIGURE_TAGS:
        assert "plt.show()" in _tagged(nb, tag).source


def test_upsample_cell_runs_the_readmes_upsample_command():
    """The notebook's super-resolution cell applies the flags of the README's upsample command
    ("Using it"), word for word after its --workdir."""
    import re
    import shlex
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    import test_readme

    nb = nbformat.read(NOTEBOOK, as_version=4)
    cell = _tagged(nb, "figure-upsample").source
    match = re.search(r"UPSAMPLE_FLAGS = \((.*?)\)\n", cell, re.S)
    assert match, "the cell keeps its flags in UPSAMPLE_FLAGS = (...)"
    flags = "".join(re.findall(r'"([^"]*)"', match.group(1))).split()
    (readme,) = [shlex.split(c) for k, c in test_readme.using_it() if test_readme.kind(k, c) == "upsample"]
    after = readme[next(i for i, w in enumerate(readme) if w.startswith("--workdir=")) + 1:]
    assert flags == after, (flags, after)


def _install_helpers() -> dict:
    """The install cell's functions (everything above its first statement that acts), run on their own."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    source = next(c.source for c in nb.cells if "def find_repo_root" in c.source)
    namespace = {}
    exec(source[:source.index("\nproblem = repo_source_problem(")], namespace)
    return namespace


def test_repo_source_is_checked_with_a_one_line_message(tmp_path):
    helpers = _install_helpers()
    problem = helpers["repo_source_problem"]
    assert problem("", REPO / "launch") is None  # Jupyter started inside a clone
    assert problem(str(REPO), tmp_path) is None
    assert problem("https://github.com/someone/lapflow-jax.git", tmp_path) is None
    assert problem("git@github.com:someone/lapflow-jax.git", tmp_path) is None
    for source, expected in (("", "REPO_SOURCE is empty"), (str(tmp_path), "neither a git URL nor"),
                             ("/no/such/folder", "neither a git URL nor")):
        message = problem(source, tmp_path)
        assert message is not None and expected in message and "\n" not in message, (source, message)


def test_install_pins_jax_jaxlib_and_the_plugin_to_the_tested_release():
    pins = _install_helpers()["jax_pins"]
    lock = (REPO / "launch" / "constraints-tpu.txt").read_text().splitlines()
    version = next(line.split("==")[1] for line in lock if line.startswith("jax=="))
    assert f"jaxlib=={version}" in lock
    assert pins(REPO, "cpu") == [f"jax=={version}", f"jaxlib=={version}"]
    assert pins(REPO, "gpu") == [f"jax[cuda12]=={version}"]
    assert pins(REPO, "tpu") == ["-c", str(REPO / "launch" / "constraints-tpu.txt")]


@pytest.mark.slow
def test_notebook_runs_top_to_bottom_on_cpu_and_draws_its_figures(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    # The kernel inherits this environment: the smoke size, a fresh workdir, one CPU device
    # (conftest asks for 8 fake devices for the sharding tests), and no MPLBACKEND that would
    # override the inline backend.
    monkeypatch.setenv("LAPFLOW_DEMO_SIZE", "ci")
    monkeypatch.setenv("LAPFLOW_DEMO_WORKDIR", str(tmp_path / "workdir"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    monkeypatch.delenv("MPLBACKEND", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel starts in the notebook's folder, as Jupyter starts it; the notebook finds the checkout above.
    client = NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    try:
        client.execute()  # raises CellExecutionError, with the cell's traceback, if any cell fails
    finally:
        nbformat.write(nb, tmp_path / "executed.ipynb")  # kept for debugging a failure

    install = "".join(_text(c) for c in nb.cells if "def find_repo_root" in c.source)
    assert "already installed from" in install and str(REPO) in install  # used the checkout, ran no pip
    devices = "".join(_text(c) for c in nb.cells if "jax.default_backend()" in c.source)
    assert "backend 'cpu'" in devices and "demo size: ci" in devices
    trained = "".join(_text(c) for c in nb.cells if "train_lib.train(config, WORKDIR)" in c.source)
    assert "trained to step 6" in trained
    assert (tmp_path / "workdir" / "checkpoints" / "6").is_dir()

    for tag in FIGURE_TAGS:
        images = _png_outputs(_tagged(nb, tag))
        assert len(images) == 1, f"cell {tag!r} drew {len(images)} figures"
        image = images[0]
        assert image.shape[0] > 150 and image.shape[1] > 300, (tag, image.shape)
        assert image.std() > 5, f"figure {tag!r} is blank"
    # Coarse to fine: one row per segment (2 scales -> 2 segments), as the cell reports them.
    c2f = _text(_tagged(nb, "figure-coarse-to-fine"))
    assert "segment t 0.00 -> 0.50: finest active scale 1" in c2f
    assert "segment t 0.50 -> 1.00: finest active scale 0" in c2f
