#!/usr/bin/env bash
# launch/cache_latents.sh: encode a latent config's dataset into its latent cache on every worker
# of a TPU slice at once (`python -m lapflow_jax.latents --distributed` on each host; host i
# writes shards i, i + P, ...). Point config.data.latents_dir at a bucket (gs://...), which
# training then reads; never inside the code directory, which setup_workers.sh replaces. On a
# slice of several workers a local path is refused: each worker would write only its own shards
# to its own disk, and training on the other workers would never see them.
# Safe to rerun: finished shards are skipped, so a preempted or failed run is retried (with
# backoff) up to MAX_RETRIES times and resumes where it stopped.
#
# Usage: launch/cache_latents.sh [--dry-run] [NAME=VALUE ...] [-- --config.FIELD=VALUE ...]
#
# Variables (environment or NAME=VALUE arguments):
#   PROJECT            required. Google Cloud project id.
#   ZONE               required. Zone of the TPU.
#   TPU_NAME           required. Name of the TPU VM.
#   ACCELERATOR_TYPE   required. Slice type (v5litepod-8, v5p-32, v6e-8, ...): gives the number
#                      of workers.
#   CONFIG             required. Latent config, relative to the repository root.
#   LATENTS_DIR        config.data.latents_dir to write (e.g. gs://my-bucket/latents/imagenet256);
#                      empty: the config's own (a --config.data.latents_dir=... after -- wins).
#                      Must be gs:// on a slice of several workers (unless LATENTS_DIR_SHARED=1).
#   LATENTS_DIR_SHARED 1: the local LATENTS_DIR is one file system mounted on every worker
#                      (Filestore, gcsfuse), so a multi-worker slice may write to it (default 0).
#   NUM_WORKERS        number of TPU VM hosts (default: from ACCELERATOR_TYPE).
#   REMOTE_DIR         code directory on each worker, under its home (default lapflow-jax).
#   VENV_DIR           virtualenv on each worker, under its home (default lapflow-venv).
#   MAX_RETRIES        reruns after a failed attempt (default 3), BACKOFF_SECONDS apart,
#                      doubling each time (default 30).
#   BACKOFF_SECONDS    first wait before a rerun (default 30).
#   DRY_RUN            1 prints the commands instead of running them (--dry-run).
set -euo pipefail
launch_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
source "$launch_dir/common.sh"

parse_args "$@"
require_vars PROJECT ZONE TPU_NAME ACCELERATOR_TYPE CONFIG
tpu_parse "$ACCELERATOR_TYPE"
NUM_WORKERS=${NUM_WORKERS:-$tpu_hosts}
LATENTS_DIR=${LATENTS_DIR:-}
LATENTS_DIR_SHARED=${LATENTS_DIR_SHARED:-0}
REMOTE_DIR=${REMOTE_DIR:-lapflow-jax}
VENV_DIR=${VENV_DIR:-lapflow-venv}
MAX_RETRIES=${MAX_RETRIES:-3}
BACKOFF_SECONDS=${BACKOFF_SECONDS:-30}
for name in MAX_RETRIES BACKOFF_SECONDS NUM_WORKERS; do
  [[ "${!name}" =~ ^[0-9]+$ ]] || die "$name='${!name}': expected a whole number"
done
[[ "$CONFIG" == *.py && "$CONFIG" != /* ]] ||
  die "CONFIG='$CONFIG': expected a config file relative to the repository root, e.g. configs/imagenet256_b2_lapflow.py"
[[ "$REMOTE_DIR" =~ ^[A-Za-z0-9_][A-Za-z0-9._-]*$ ]] || die "REMOTE_DIR='$REMOTE_DIR': expected a plain directory name"
case "$LATENTS_DIR" in
  "" | gs://* | /*) ;;
  *) die "LATENTS_DIR='$LATENTS_DIR': expected a gs:// URL (or an absolute path on a shared disk); a relative path would land inside $REMOTE_DIR, which setup_workers.sh replaces" ;;
esac
[[ "$LATENTS_DIR_SHARED" == 0 || "$LATENTS_DIR_SHARED" == 1 ]] ||
  die "LATENTS_DIR_SHARED='$LATENTS_DIR_SHARED': expected 0 or 1"

# The folder the workers will write: LATENTS_DIR, unless an override after -- sets the field again
# (the last one wins, as in the command below).
latents_dir=$LATENTS_DIR
latents_field=LATENTS_DIR
for arg in ${extra_args[@]+"${extra_args[@]}"}; do
  if [[ "$arg" == --config.data.latents_dir=* ]]; then
    latents_dir=${arg#*=}
    latents_field=--config.data.latents_dir
  fi
done
if ((NUM_WORKERS > 1)) && [[ "$latents_dir" != gs://* && "$LATENTS_DIR_SHARED" != 1 ]]; then
  if [[ -n "$latents_dir" ]]; then
    where="$latents_field='$latents_dir' is a local path"
  else
    where="LATENTS_DIR is empty, so config.data.latents_dir is the config's own (a local path)"
  fi
  die "$where:" \
    "on $TPU_NAME's $NUM_WORKERS workers each would write only its own shards to its own disk, and training" \
    "on the other workers would never see them. Set LATENTS_DIR=gs://BUCKET/latents/NAME" \
    "(config.data.latents_dir in a bucket), or LATENTS_DIR_SHARED=1 if that path is one file system" \
    "mounted on every worker"
fi

[[ "$VENV_DIR" == /* ]] && python="$VENV_DIR/bin/python" || python="\$HOME/$VENV_DIR/bin/python"
command="$python -m lapflow_jax.latents --config=$(printf '%q' "$CONFIG") --distributed"
[[ -z "$LATENTS_DIR" ]] || command+=" --config.data.latents_dir=$(printf '%q' "$LATENTS_DIR")"
for arg in ${extra_args[@]+"${extra_args[@]}"}; do
  command+=" $(printf '%q' "$arg")"
done
remote="set -o pipefail; cd \$HOME/$REMOTE_DIR && PYTHONUNBUFFERED=1 $command"

wait_seconds=$BACKOFF_SECONDS
for ((attempt = 0; ; attempt++)); do
  if run_cmd gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all --zone="$ZONE" --project="$PROJECT" \
    --command="$remote"; then
    log "latent caching finished on every worker of $TPU_NAME"
    exit 0
  fi
  ((attempt < MAX_RETRIES)) || die "latent caching failed $((attempt + 1)) time(s); rerun this script to resume"
  log "attempt $attempt failed; retrying in ${wait_seconds}s (finished shards are kept)"
  [[ "$DRY_RUN" == 1 ]] || sleep "$wait_seconds"
  wait_seconds=$((wait_seconds * 2))
done
