#!/usr/bin/env bash
# launch/jobset.sh: run LapFlow training on a GKE cluster with TPU node pools without xpk:
# fills in launch/jobset.yaml (one Job per TPU slice, NUM_SLICES slices) and applies it
# with kubectl. The manifest is rendered in dry-run mode too, so it can be read first.
#
# Usage: launch/jobset.sh [--dry-run] [apply | delete | status] [NAME=VALUE ...]
#                         [-- EXTRA TRAINING ARGS, e.g. --config.num_steps=1000]
#   apply (default)   render the manifest and kubectl apply it
#   delete            kubectl delete the JobSet
#   status            kubectl get the JobSet and its pods
# Each action first points kubectl at the cluster (gcloud container clusters
# get-credentials). The cluster needs the JobSet controller and multi-host TPU slice node
# pools of TPU_TYPE, one per slice (see launch/README.md).
#
# Variables (environment or NAME=VALUE arguments):
#   PROJECT            required. Google Cloud project id.
#   CLUSTER            required. Name of the GKE cluster.
#   CLUSTER_LOCATION   required. Zone or region of the cluster.
#   TPU_TYPE           required for apply. Slice type: v5litepod-16, v5p-32, v6e-16, ...
#   NUM_SLICES         number of slices (default 1); 2 or more runs multi-slice.
#   DOCKER_IMAGE       required for apply. Image with lapflow-jax installed with the tpu
#                      extra and the repository at its working directory.
#   CONFIG             required for apply. Config file relative to the image's working
#                      directory, e.g. configs/celebahq256_lapflow.py.
#   WORKDIR            required for apply. gs://bucket/path for checkpoints and samples.
#   JOB_NAME           JobSet name, at most 40 of [a-z0-9-] (default lapflow-RUN where RUN is
#                      CONFIG's file name without .py, '_' and '.' turned into '-').
#   NAMESPACE          Kubernetes namespace (default default).
#   K8S_SERVICE_ACCOUNT  Kubernetes service account the pods run as (default default): the
#                      identity that reads and writes the gs:// bucket through Workload Identity
#                      Federation for GKE (grant it roles/storage.objectUser; launch/README.md).
#   MAX_RESTARTS       restarts of the whole JobSet after a failure (default 3).
#   TPU_TOPOLOGY       node label cloud.google.com/gke-tpu-topology (default: from TPU_TYPE).
#   CHIPS_PER_VM       TPU chips per pod (default: from TPU_TYPE).
#   VMS_PER_SLICE      pods per slice (default: from TPU_TYPE).
#   MANIFEST           where the rendered manifest is written (default
#                      ${TMPDIR:-/tmp}/JOB_NAME.yaml).
#   RENDERER           envsubst (the default when installed) or sed.
#   DRY_RUN            1 prints the gcloud/kubectl commands instead of running them
#                      (--dry-run); the manifest is still written.
set -euo pipefail
launch_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
source "$launch_dir/common.sh"

action=apply
script_flag() {
  case "$1" in
    apply | delete | status) action=$1 ;;
    *) return 1 ;;
  esac
}

parse_args "$@"
require_vars PROJECT CLUSTER CLUSTER_LOCATION
if [[ -z "${JOB_NAME:-}" ]]; then
  require_vars CONFIG
  JOB_NAME=$(basename "$CONFIG" .py | tr '[:upper:]_.' '[:lower:]--')
  JOB_NAME="lapflow-${JOB_NAME:0:32}"
  JOB_NAME=${JOB_NAME%-}
fi
check_k8s_name JOB_NAME "$JOB_NAME"
NAMESPACE=${NAMESPACE:-default}
[[ "$NAMESPACE" =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$ && ${#NAMESPACE} -le 63 ]] ||
  die "NAMESPACE='$NAMESPACE': expected a Kubernetes namespace name"

credentials=(gcloud container clusters get-credentials "$CLUSTER" --location="$CLUSTER_LOCATION" --project="$PROJECT")
case "$action" in
  delete)
    run_cmd "${credentials[@]}"
    run_cmd kubectl delete jobset "$JOB_NAME" --namespace="$NAMESPACE"
    exit 0
    ;;
  status)
    run_cmd "${credentials[@]}"
    run_cmd kubectl get jobset "$JOB_NAME" --namespace="$NAMESPACE"
    run_cmd kubectl get pods --namespace="$NAMESPACE" --selector="jobset.sigs.k8s.io/jobset-name=$JOB_NAME"
    exit 0
    ;;
esac

require_vars TPU_TYPE DOCKER_IMAGE CONFIG WORKDIR
K8S_SERVICE_ACCOUNT=${K8S_SERVICE_ACCOUNT:-default}
[[ "$K8S_SERVICE_ACCOUNT" =~ ^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$ && ${#K8S_SERVICE_ACCOUNT} -le 253 ]] ||
  die "K8S_SERVICE_ACCOUNT='$K8S_SERVICE_ACCOUNT': expected a Kubernetes service account name"
check_config_and_workdir "$CONFIG" "$WORKDIR"
gke_parse "$TPU_TYPE"
TPU_TOPOLOGY=${TPU_TOPOLOGY:-$gke_topology}
CHIPS_PER_VM=${CHIPS_PER_VM:-$gke_chips_per_vm}
VMS_PER_SLICE=${VMS_PER_SLICE:-$gke_vms_per_slice}
NUM_SLICES=${NUM_SLICES:-1}
MAX_RESTARTS=${MAX_RESTARTS:-3}
MANIFEST=${MANIFEST:-${TMPDIR:-/tmp}/$JOB_NAME.yaml}
[[ -n "$TPU_TOPOLOGY" ]] ||
  die "no default GKE topology for $TPU_TYPE: set TPU_TOPOLOGY (e.g. 4x4x8), CHIPS_PER_VM and VMS_PER_SLICE"
[[ "$TPU_TOPOLOGY" =~ ^[1-9][0-9]*(x[1-9][0-9]*){1,2}$ ]] || die "TPU_TOPOLOGY='$TPU_TOPOLOGY': expected AxB or AxBxC"
for name in NUM_SLICES CHIPS_PER_VM VMS_PER_SLICE; do
  [[ "${!name}" =~ ^[1-9][0-9]*$ ]] || die "$name='${!name}': expected a positive whole number"
done
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "MAX_RESTARTS='$MAX_RESTARTS': expected a whole number"
[[ "$DOCKER_IMAGE" =~ ^[A-Za-z0-9._/:@-]+$ ]] ||
  die "DOCKER_IMAGE='$DOCKER_IMAGE': expected an image such as us-docker.pkg.dev/PROJECT/REPO/IMAGE:TAG"
((NUM_SLICES == 1 || VMS_PER_SLICE > 1)) ||
  log "warning: GKE multi-slice needs multi-host slices; $TPU_TYPE is a single host"
if [[ -z "${RENDERER:-}" ]]; then
  if command -v envsubst >/dev/null; then RENDERER="envsubst"; else RENDERER="sed"; fi
fi
[[ "$RENDERER" == envsubst || "$RENDERER" == sed ]] || die "RENDERER='$RENDERER': expected envsubst or sed"

# The placeholders of jobset.yaml and their values.
values=(
  "JOB_NAME=$JOB_NAME" "NAMESPACE=$NAMESPACE" "NUM_SLICES=$NUM_SLICES"
  "VMS_PER_SLICE=$VMS_PER_SLICE" "CHIPS_PER_VM=$CHIPS_PER_VM" "GKE_ACCELERATOR=$gke_accelerator"
  "TPU_TOPOLOGY=$TPU_TOPOLOGY" "MAX_RESTARTS=$MAX_RESTARTS" "DOCKER_IMAGE=$DOCKER_IMAGE"
  "K8S_SERVICE_ACCOUNT=$K8S_SERVICE_ACCOUNT"
  "TRAIN_COMMAND=$(train_command python "$CONFIG" "$WORKDIR" ${extra_args[@]+"${extra_args[@]}"})"
)
mkdir -p "$(dirname "$MANIFEST")"
if [[ "$RENDERER" == envsubst ]]; then
  # Only the listed placeholders are replaced; any other $ text stays as it is.
  # shellcheck disable=SC2016  # the ${NAME} list is for envsubst, not for the shell
  env "${values[@]}" envsubst "$(printf '${%s} ' "${values[@]%%=*}")" <"$launch_dir/jobset.yaml" >"$MANIFEST"
else
  sed_args=()
  for pair in "${values[@]}"; do
    value=${pair#*=}
    value=${value//\\/\\\\}
    value=${value//&/\\&}
    value=${value//|/\\|}
    sed_args+=(-e "s|\\\${${pair%%=*}}|$value|g")
  done
  sed "${sed_args[@]}" "$launch_dir/jobset.yaml" >"$MANIFEST"
fi
log "rendered $MANIFEST: $NUM_SLICES x $TPU_TYPE ($VMS_PER_SLICE pod(s) of $CHIPS_PER_VM chips per slice, topology $TPU_TOPOLOGY)"
run_cmd "${credentials[@]}"
run_cmd kubectl apply -f "$MANIFEST"
