#!/usr/bin/env bash
# launch/delete_tpu.sh: delete a queued resource and its TPU VM(s) (whatever their state:
# waiting, active, preempted). Succeeds when they are already gone.
#
# Usage: launch/delete_tpu.sh [--dry-run] [NAME=VALUE ...]
#
# Variables (environment or NAME=VALUE arguments):
#   PROJECT            required. Google Cloud project id.
#   ZONE               required. Zone of the TPU.
#   TPU_NAME           required. Name of the TPU VM (the node id).
#   QUEUED_RESOURCE    id of the queued resource. Default: TPU_NAME.
#   DRY_RUN            1 prints the gcloud command instead of running it (--dry-run).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "$@"
require_vars PROJECT ZONE TPU_NAME
QUEUED_RESOURCE=${QUEUED_RESOURCE:-$TPU_NAME}

# --force deletes the nodes first, then the request; --quiet skips the confirmation prompt.
delete=(gcloud compute tpus queued-resources delete "$QUEUED_RESOURCE"
  --zone="$ZONE" --project="$PROJECT" --force --quiet)
if [[ "$DRY_RUN" == 1 ]]; then
  run_cmd "${delete[@]}"
  exit 0
fi

log "deleting queued resource $QUEUED_RESOURCE and TPU $TPU_NAME in $ZONE"
log "+ $(quote_cmd "${delete[@]}")"
rc=0
output=$("${delete[@]}" 2>&1) || rc=$?
[[ -z "$output" ]] || printf '%s\n' "$output" >&2
if ((rc != 0)); then
  if grep -qiE 'NOT_FOUND|not found' <<<"$output"; then
    log "queued resource $QUEUED_RESOURCE does not exist: nothing to delete"
    exit 0
  fi
  die "deleting queued resource $QUEUED_RESOURCE failed (gcloud exit status $rc, output above)"
fi
log "deleted queued resource $QUEUED_RESOURCE"
