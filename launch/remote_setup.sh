#!/usr/bin/env bash
# launch/remote_setup.sh: runs on each TPU VM worker (setup_workers.sh starts it there, from
# the root of the copied code): makes a Python >= 3.11 virtualenv and installs the package
# editable with the TPU extra, which pulls jax[tpu] (libtpu).
#
# Usage (on a worker, in the code directory): bash launch/remote_setup.sh [NAME=VALUE ...]
#
# Variables (environment or NAME=VALUE arguments):
#   VENV_DIR     virtualenv to create or reuse; a relative path is under $HOME
#                (default lapflow-venv).
#   PIP_EXTRAS   extras of lapflow-jax to install (default tpu): pip install -e '.[tpu]'.
#   CONSTRAINTS  pip constraints (lock) file, relative to the code root (default
#                launch/constraints-tpu.txt: the jax/jaxlib/libtpu/flax/orbax/grain versions
#                every compile and memory figure was measured with). Empty: newest releases.
#   PYTHON       interpreter for the virtualenv. Default: the first of python3.12,
#                python3.11 and python3 that is at least 3.11; when none is (the TPU
#                images run Ubuntu 22.04 with Python 3.10), python3.11 from apt.
#   DRY_RUN      1 prints the commands instead of running them (--dry-run).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "$@"
VENV_DIR=${VENV_DIR:-lapflow-venv}
PIP_EXTRAS=${PIP_EXTRAS:-tpu}
CONSTRAINTS=${CONSTRAINTS-launch/constraints-tpu.txt}
[[ "$VENV_DIR" == /* ]] || VENV_DIR="$HOME/$VENV_DIR"
[[ -f setup.py ]] || die "run from the root of the lapflow-jax code (no setup.py in $(pwd))"

python_ok() {
  command -v "$1" >/dev/null && "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))'
}

if [[ -z "${PYTHON:-}" ]]; then
  for candidate in python3.12 python3.11 python3; do
    if python_ok "$candidate"; then
      PYTHON=$candidate
      break
    fi
  done
fi
if [[ -z "${PYTHON:-}" ]]; then
  log "no Python >= 3.11 on this worker: installing python3.11 from apt"
  run_cmd sudo apt-get update -q
  run_cmd sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3.11 python3.11-venv
  PYTHON=python3.11
fi
[[ "$DRY_RUN" == 1 ]] || python_ok "$PYTHON" || die "PYTHON='$PYTHON' is not a Python >= 3.11 interpreter"

[[ -x "$VENV_DIR/bin/python" ]] || run_cmd "$PYTHON" -m venv "$VENV_DIR"
run_cmd "$VENV_DIR/bin/python" -m pip install --quiet --upgrade pip
if [[ -n "$CONSTRAINTS" ]]; then
  [[ -f "$CONSTRAINTS" ]] || die "CONSTRAINTS='$CONSTRAINTS': no such file under $(pwd)"
  run_cmd "$VENV_DIR/bin/python" -m pip install --quiet -c "$CONSTRAINTS" -e ".[$PIP_EXTRAS]"
else
  run_cmd "$VENV_DIR/bin/python" -m pip install --quiet -e ".[$PIP_EXTRAS]"
fi
# Importing jax does not touch the TPU, so this is safe on one worker of a pod at a time.
run_cmd "$VENV_DIR/bin/python" -c 'import jax, lapflow_jax; print("jax", jax.__version__, "installed in", jax.__file__)'
log "worker ready: $VENV_DIR/bin/python -m lapflow_jax.main"
