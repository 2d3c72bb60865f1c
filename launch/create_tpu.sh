#!/usr/bin/env bash
# launch/create_tpu.sh: request a Cloud TPU slice through a queued resource and wait until
# it is ACTIVE (single-host slices such as v5litepod-8 and pods such as v5p-32 alike).
#
# Usage: launch/create_tpu.sh [--dry-run] [--spot | --reserved | --on-demand] [NAME=VALUE ...]
#
# Variables (environment or NAME=VALUE arguments):
#   PROJECT            required. Google Cloud project id.
#   ZONE               required. A zone that offers the type, e.g. us-west4-a (v5e),
#                      us-east5-a (v5p, v6e), europe-west4-a (v6e), us-central2-b (v4).
#   TPU_NAME           required. Name of the TPU VM (the node id).
#   ACCELERATOR_TYPE   required. Slice type: v5litepod-8, v5p-32, v6e-8, v4-32, ...
#   RUNTIME_VERSION    TPU software version. Default from the type, as the Cloud TPU docs
#                      recommend for JAX: v2-alpha-tpuv6e (v6e), v2-alpha-tpuv5 (v5p),
#                      v2-alpha-tpuv5-lite (v5e), tpu-ubuntu2204-base (v4 and older).
#   QUEUED_RESOURCE    id of the queued resource. Default: TPU_NAME.
#   CAPACITY           on-demand (default), spot or reserved. --spot, --reserved and
#                      --on-demand set it too. Spot slices can be preempted at any time:
#                      train.sh recreates them.
#   SERVICE_ACCOUNT    service account of the TPU VMs (it needs write access to the GCS
#                      bucket of the workdir). Default: the Compute Engine default account.
#   WAIT_TIMEOUT       seconds to wait for the queued resource to become ACTIVE (default
#                      3600); 0 returns right after the request is queued.
#   POLL_SECONDS       seconds between two state polls (default 30).
#   DRY_RUN            1 prints the gcloud commands instead of running them (--dry-run).
#
# Exits 0 once the queued resource is ACTIVE, 1 when it FAILED or was SUSPENDED, or when it
# is still queued after WAIT_TIMEOUT seconds (the request then stays in the queue: delete it
# with launch/delete_tpu.sh or run this script's wait again later).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

script_flag() {
  case "$1" in
    --spot) export CAPACITY=spot ;;
    --reserved) export CAPACITY=reserved ;;
    --on-demand) export CAPACITY=on-demand ;;
    *) return 1 ;;
  esac
}

parse_args "$@"
require_vars PROJECT ZONE TPU_NAME ACCELERATOR_TYPE
tpu_parse "$ACCELERATOR_TYPE"
RUNTIME_VERSION=${RUNTIME_VERSION:-$tpu_runtime}
QUEUED_RESOURCE=${QUEUED_RESOURCE:-$TPU_NAME}
CAPACITY=${CAPACITY:-on-demand}
WAIT_TIMEOUT=${WAIT_TIMEOUT:-3600}
POLL_SECONDS=${POLL_SECONDS:-30}
[[ "$WAIT_TIMEOUT" =~ ^[0-9]+$ ]] || die "WAIT_TIMEOUT='$WAIT_TIMEOUT': expected a whole number of seconds"
[[ "$POLL_SECONDS" =~ ^[0-9]+$ ]] || die "POLL_SECONDS='$POLL_SECONDS': expected a whole number of seconds"

create=(gcloud compute tpus queued-resources create "$QUEUED_RESOURCE"
  --node-id="$TPU_NAME" --zone="$ZONE" --project="$PROJECT"
  --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION")
case "$CAPACITY" in
  on-demand) ;;
  spot) create+=(--spot) ;;
  reserved) create+=(--reserved) ;;
  *) die "CAPACITY='$CAPACITY': expected on-demand, spot or reserved" ;;
esac
[[ -z "${SERVICE_ACCOUNT:-}" ]] || create+=(--service-account="$SERVICE_ACCOUNT")

describe=(compute tpus queued-resources describe "$QUEUED_RESOURCE" --zone="$ZONE" --project="$PROJECT")
request="$ACCELERATOR_TYPE ($tpu_chips chips, $tpu_hosts worker(s)) as $CAPACITY capacity:"
request+=" queued resource $QUEUED_RESOURCE, node $TPU_NAME in $ZONE"
if [[ "$DRY_RUN" == 1 ]]; then
  log "requesting $request"
  run_cmd "${create[@]}"
  # The wait loop polls this command until the state is ACTIVE.
  quote_cmd gcloud "${describe[@]}" --format='value(state.state)'
  exit 0
fi

deadline=$((SECONDS + WAIT_TIMEOUT))
read_state() {
  gcloud_state 'value(state.state)' "${describe[@]}" ||
    die "cannot read the state of queued resource $QUEUED_RESOURCE (gcloud's error above)"
}

# Rerunning the script waits for an existing request instead of failing on ALREADY_EXISTS;
# one still being deleted (just after delete_tpu.sh) is waited out first.
existing=$(read_state)
while [[ "$existing" == DELETING ]] && ((SECONDS < deadline)); do
  log "queued resource $QUEUED_RESOURCE is still being deleted; polling again in ${POLL_SECONDS}s"
  sleep "$POLL_SECONDS"
  existing=$(read_state)
done
case "$existing" in
  NOT_FOUND)
    log "requesting $request"
    run_cmd "${create[@]}"
    ;;
  FAILED | SUSPENDING | SUSPENDED | DELETING)
    die "queued resource $QUEUED_RESOURCE already exists in state $existing: free it with launch/delete_tpu.sh first"
    ;;
  *) log "queued resource $QUEUED_RESOURCE already exists ($existing): not requesting it again" ;;
esac
((WAIT_TIMEOUT > 0)) || exit 0

state=UNKNOWN
while :; do
  state=$(gcloud_state 'value(state.state)' "${describe[@]}") || state=UNREADABLE
  case "$state" in
    ACTIVE)
      log "queued resource $QUEUED_RESOURCE is ACTIVE: TPU $TPU_NAME is ready"
      exit 0
      ;;
    FAILED | SUSPENDING | SUSPENDED)
      die "queued resource $QUEUED_RESOURCE is $state; see: $(quote_cmd gcloud "${describe[@]}")"
      ;;
  esac
  ((SECONDS < deadline)) ||
    die "queued resource $QUEUED_RESOURCE is not ACTIVE after ${WAIT_TIMEOUT}s (last state:" \
      "$state); it stays queued: rerun this script with the same variables to keep waiting," \
      "or free it with launch/delete_tpu.sh"
  log "queued resource $QUEUED_RESOURCE is $state; polling again in ${POLL_SECONDS}s"
  sleep "$POLL_SECONDS"
done
