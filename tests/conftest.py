"""Test setup shared by every test file.

Eight fake CPU devices must be requested before jax is imported anywhere, so that the
sharding tests can build real meshes on a CPU-only machine.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Grain worker processes read absl flags; outside an absl app they must be marked parsed.
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

# pytest's unraisable-exception hook imports tracemalloc the first time it runs. When that first
# time falls inside tensorflow_datasets' lazy-import context (an object collected while tfds is
# being imported), tracemalloc's own `from functools import total_ordering` gets a lazy stub and
# the hook fails, failing whichever test was running (seen once in a full -n 2 run). Importing it
# here, once, takes the hook's import out of that window.
import tracemalloc  # noqa: E402,F401


import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--paper-configs", action="store_true", default=False,
                     help="also compile every paper config for the TPU its docstring names (about 2 min "
                          "each on 2 cores); CI compiles one of them")


@pytest.fixture
def paper_configs_requested(request):
    return request.config.getoption("--paper-configs")
