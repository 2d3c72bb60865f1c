#!/usr/bin/env bash
# launch/xpk.sh: run LapFlow training as an XPK workload on a GKE cluster with TPU slices:
# one slice or several (multi-slice over the data-center network). XPK builds a JobSet in
# which every TPU VM of every slice runs the same command; jax.distributed.initialize()
# finds the topology, and after a failure (a preempted slice) the JobSet restarts every
# pod up to MAX_RESTARTS times, each run resuming from the last checkpoint in WORKDIR.
#
# Usage: launch/xpk.sh [--dry-run] [create | delete | list] [NAME=VALUE ...]
#                      [-- EXTRA TRAINING ARGS, e.g. --config.num_steps=1000]
#   create (default)   xpk workload create
#   delete             xpk workload delete
#   list               xpk workload list, for this workload
#
# The cluster comes first, e.g. for two v5p-32 slices on spot capacity:
#   xpk cluster create --cluster=CLUSTER --tpu-type=v5p-32 --num-slices=2 --spot \
#     --project=PROJECT --zone=ZONE
# and the image holds this repository at its working directory with the package installed
# (pip install -e '.[tpu]'); see launch/README.md.
#
# Variables (environment or NAME=VALUE arguments):
#   PROJECT            required. Google Cloud project id.
#   ZONE               required. Zone of the cluster's TPU node pools.
#   CLUSTER            required. Name of the GKE cluster (made by xpk cluster create).
#   TPU_TYPE           required for create. Slice type: v5litepod-16, v5p-32, v6e-16, ...
#   NUM_SLICES         number of slices (default 1); 2 or more runs multi-slice.
#   DOCKER_IMAGE       required for create. Image with lapflow-jax installed with the tpu
#                      extra, e.g. us-docker.pkg.dev/PROJECT/lapflow/lapflow-jax:latest.
#   CONFIG             required for create. Config file relative to the image's working
#                      directory, e.g. configs/celebahq256_lapflow.py.
#   WORKDIR            required for create. gs://bucket/path for checkpoints and samples.
#   WORKLOAD           workload name, at most 40 of [a-z0-9-] (default lapflow-RUN where RUN
#                      is CONFIG's file name without .py, '_' and '.' turned into '-').
#   MAX_RESTARTS       how many times the JobSet restarts after a failure (default 3).
#   PRIORITY           optional xpk priority: very-low, low, medium, high or very-high.
#   DRY_RUN            1 prints the xpk command instead of running it (--dry-run).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

action=create
script_flag() {
  case "$1" in
    create | delete | list) action=$1 ;;
    *) return 1 ;;
  esac
}

parse_args "$@"
require_vars PROJECT ZONE CLUSTER
if [[ -z "${WORKLOAD:-}" ]]; then
  require_vars CONFIG
  WORKLOAD=$(basename "$CONFIG" .py | tr '[:upper:]_.' '[:lower:]--')
  WORKLOAD="lapflow-${WORKLOAD:0:32}"
  WORKLOAD=${WORKLOAD%-}
fi
check_k8s_name WORKLOAD "$WORKLOAD"
where=(--project="$PROJECT" --zone="$ZONE")

case "$action" in
  delete)
    run_cmd xpk workload delete --cluster="$CLUSTER" --workload="$WORKLOAD" "${where[@]}"
    ;;
  list)
    run_cmd xpk workload list --cluster="$CLUSTER" --filter-by-job="$WORKLOAD" "${where[@]}"
    ;;
  create)
    require_vars TPU_TYPE DOCKER_IMAGE CONFIG WORKDIR
    check_config_and_workdir "$CONFIG" "$WORKDIR"
    gke_parse "$TPU_TYPE"
    NUM_SLICES=${NUM_SLICES:-1}
    MAX_RESTARTS=${MAX_RESTARTS:-3}
    [[ "$NUM_SLICES" =~ ^[1-9][0-9]*$ ]] || die "NUM_SLICES='$NUM_SLICES': expected a positive whole number"
    [[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "MAX_RESTARTS='$MAX_RESTARTS': expected a whole number"
    ((NUM_SLICES == 1 || tpu_hosts > 1)) ||
      log "warning: GKE multi-slice needs multi-host slices; $TPU_TYPE is a single host"
    create=(xpk workload create --cluster="$CLUSTER" --workload="$WORKLOAD"
      --tpu-type="$TPU_TYPE" --num-slices="$NUM_SLICES" --docker-image="$DOCKER_IMAGE"
      --command="$(train_command python "$CONFIG" "$WORKDIR" ${extra_args[@]+"${extra_args[@]}"})"
      --max-restarts="$MAX_RESTARTS")
    if [[ -n "${PRIORITY:-}" ]]; then
      [[ "$PRIORITY" =~ ^(very-low|low|medium|high|very-high)$ ]] ||
        die "PRIORITY='$PRIORITY': expected very-low, low, medium, high or very-high"
      create+=(--priority="$PRIORITY")
    fi
    log "workload $WORKLOAD: $NUM_SLICES x $TPU_TYPE ($((NUM_SLICES * gke_vms_per_slice)) pods) on cluster $CLUSTER"
    run_cmd "${create[@]}" "${where[@]}"
    ;;
esac
