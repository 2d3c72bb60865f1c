#!/usr/bin/env bash
# Installs LapFlow-JAX with its test extras into ./.venv and runs the test suite:
# the default (fast) tests first, then the ones marked slow (multi-process, worker processes,
# full-size models). Either pytest run failing, or collecting no tests (exit 5), fails this script.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch==2.13.0 (in the "reference" extra) is the CPU build; the reference implementations our
# ports are tested against come with it. torch-fidelity's InceptionV3 is one of them: installed
# without dependencies because it declares torchvision, which would pull a multi-GB CUDA build,
# and the test loads only its torchvision-free model file.
python -m pip install -q -e '.[test,reference]'
python -m pip install -q --no-deps 'torch-fidelity==0.4.0'
python -m pytest -m "not slow" -n 2 -q --durations=15
python -m pytest -m slow -q --durations=15
