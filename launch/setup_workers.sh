#!/usr/bin/env bash
# launch/setup_workers.sh: put the code on every worker of a TPU (all hosts of a pod at
# once) and install it there with the TPU extra of jax, in a virtualenv (remote_setup.sh).
# The code is this checkout (a tarball copied with `gcloud compute tpus tpu-vm scp`) or,
# when REPO_URL is set, a `git clone` made on each worker. Safe to rerun: it replaces the
# code directory and reuses the virtualenv. User data the configs' relative defaults put in the
# code directory (latents/, autoencoders/, weights/) is kept across the replacement and never
# copied from here (keep large data in a bucket: docs/cloud_tpu.md).
#
# Usage: launch/setup_workers.sh [--dry-run] [NAME=VALUE ...]
#
# Variables (environment or NAME=VALUE arguments):
#   PROJECT            required. Google Cloud project id.
#   ZONE               required. Zone of the TPU.
#   TPU_NAME           required. Name of the TPU VM.
#   REPO_URL           git URL to clone on every worker. Empty (default): copy SRC_DIR.
#   REPO_REF           branch, tag or commit to check out after cloning (default: the
#                      repository's default branch).
#   SRC_DIR            local tree to copy when REPO_URL is empty. Default: the repository
#                      this script lives in (.git, .venv, workdirs and caches left out).
#   REMOTE_DIR         code directory on each worker, under its home (default lapflow-jax).
#   VENV_DIR           virtualenv on each worker, under its home (default lapflow-venv).
#   PIP_EXTRAS         extras to install (default tpu): pip install -e '.[tpu]'.
#   DRY_RUN            1 prints the commands instead of running them (--dry-run).
set -euo pipefail
launch_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
source "$launch_dir/common.sh"

parse_args "$@"
require_vars PROJECT ZONE TPU_NAME
REPO_URL=${REPO_URL:-}
REPO_REF=${REPO_REF:-}
SRC_DIR=${SRC_DIR:-$(dirname "$launch_dir")}
REMOTE_DIR=${REMOTE_DIR:-lapflow-jax}
VENV_DIR=${VENV_DIR:-lapflow-venv}
PIP_EXTRAS=${PIP_EXTRAS:-tpu}
# The code directory is replaced with rm -rf on the workers: keep it a plain name.
[[ "$REMOTE_DIR" =~ ^[A-Za-z0-9_][A-Za-z0-9._-]*$ ]] ||
  die "REMOTE_DIR='$REMOTE_DIR': expected a plain directory name (letters, digits, '.', '_', '-') under the workers' home"
[[ "$VENV_DIR" =~ ^[A-Za-z0-9_./-]+$ ]] || die "VENV_DIR='$VENV_DIR': expected a path of letters, digits, '.', '_', '-', '/'"
[[ "$PIP_EXTRAS" =~ ^[A-Za-z0-9_,-]+$ ]] || die "PIP_EXTRAS='$PIP_EXTRAS': expected comma-separated extra names, e.g. tpu"

where=(--zone="$ZONE" --project="$PROJECT")
install="cd $REMOTE_DIR; VENV_DIR=$(printf '%q' "$VENV_DIR") PIP_EXTRAS=$PIP_EXTRAS bash launch/remote_setup.sh"

# User data inside the old code directory moves aside while the code is replaced, then back.
keep="mkdir -p $REMOTE_DIR.keep; for d in latents autoencoders weights;"
keep+=" do if [ -e $REMOTE_DIR/\$d ]; then mv $REMOTE_DIR/\$d $REMOTE_DIR.keep/; fi; done"
restore="for d in latents autoencoders weights;"
restore+=" do if [ -e $REMOTE_DIR.keep/\$d ]; then mv $REMOTE_DIR.keep/\$d $REMOTE_DIR/; fi; done; rmdir $REMOTE_DIR.keep"

if [[ -n "$REPO_URL" ]]; then
  fetch="git clone --quiet $(printf '%q' "$REPO_URL") $REMOTE_DIR"
  [[ -z "$REPO_REF" ]] || fetch+="; git -C $REMOTE_DIR checkout --quiet $(printf '%q' "$REPO_REF")"
  log "cloning $REPO_URL${REPO_REF:+ at $REPO_REF} on every worker of $TPU_NAME"
else
  [[ -f "$SRC_DIR/setup.py" && -f "$SRC_DIR/launch/remote_setup.sh" ]] ||
    die "SRC_DIR='$SRC_DIR' is not a lapflow-jax checkout (needs setup.py and launch/remote_setup.sh)"
  tarball="${TMPDIR:-/tmp}/$TPU_NAME-$REMOTE_DIR.tar.gz"
  remote_tarball="$REMOTE_DIR.tar.gz"
  log "copying $SRC_DIR to every worker of $TPU_NAME"
  run_cmd tar -czf "$tarball" --exclude=.git --exclude=.venv --exclude=__pycache__ \
    --exclude='*.egg-info' --exclude=.pytest_cache --exclude=./workdirs \
    --exclude=./latents --exclude=./autoencoders --exclude=./weights -C "$SRC_DIR" .
  run_cmd gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:$remote_tarball" --worker=all "${where[@]}"
  fetch="mkdir $REMOTE_DIR; tar -xzf $remote_tarball -C $REMOTE_DIR; rm $remote_tarball"
fi

log "installing lapflow-jax[$PIP_EXTRAS] in ~/$VENV_DIR on every worker"
run_cmd gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${where[@]}" \
  --command="set -euo pipefail; $keep; rm -rf $REMOTE_DIR; $fetch; $restore; $install"
