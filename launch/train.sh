#!/usr/bin/env bash
# launch/train.sh: run a LapFlow training config on every worker of a TPU VM slice (single
# host or pod), with the workdir on GCS, each worker's output saved to a log file on the
# worker and copied back here, and automatic recovery from preemption:
#
#   1. run `python -m lapflow_jax.main --config=CONFIG --workdir=WORKDIR [ARGS]` on all
#      workers (`gcloud compute tpus tpu-vm ssh --worker=all`), then fetch each worker's log;
#   2. if it fails, read the queued resource and TPU states: when the TPU was preempted,
#      suspended or is gone, delete it, recreate it (create_tpu.sh), set the workers up again
#      (setup_workers.sh) and rerun the same command, which resumes from the last checkpoint
#      in WORKDIR; at most MAX_RETRIES times;
#   3. when ssh itself fails (exit status 255: a worker could not be reached, or the connection
#      dropped) on a TPU that stays healthy, rerun the same command up to RELAUNCH_TRIES times
#      with a doubling wait (BACKOFF_SECONDS), without recreating anything;
#   4. any other failure on a healthy TPU is a bug, not a preemption: exit 1 at once, logs fetched.
#
# The TPU must exist and be set up (create_tpu.sh, setup_workers.sh) unless you want the
# first failure to create it, which counts as one retry.
#
# With --compile-check it first compiles the run for the slice's TPU topology on this machine
# (python -m lapflow_jax.compile_check, with the same config overrides) and stops, before any
# TPU is created or used, when the train step or sampling does not fit in the chips' memory.
#
# Usage: launch/train.sh [--dry-run] [--compile-check] [--spot | --reserved | --on-demand]
#                        [NAME=VALUE ...] [-- EXTRA TRAINING ARGS, e.g. --config.num_steps=1000]
#
# Variables (environment or NAME=VALUE arguments):
#   PROJECT            required. Google Cloud project id.
#   ZONE               required. Zone of the TPU.
#   TPU_NAME           required. Name of the TPU VM.
#   ACCELERATOR_TYPE   required. Slice type (v5litepod-8, v5p-32, v6e-8, ...): gives the number
#                      of workers whose logs are fetched, and recreates the same slice.
#   CONFIG             required. Config file relative to the repository root, e.g.
#                      configs/celebahq256_lapflow.py.
#   WORKDIR            required. gs://bucket/path for checkpoints, samples and metrics.
#   MAX_RETRIES        how many times a preempted or vanished TPU is recreated and the run
#                      restarted (default 3); 0 never recreates.
#   RUN_NAME           name of the log files (default: CONFIG's file name without .py).
#   LOG_DIR            local directory for the logs (default workdirs/tpu-logs/TPU_NAME/DATE
#                      in the repository); attempt K of worker I lands in
#                      LOG_DIR/attemptK/workerI.log.
#   NUM_WORKERS        number of TPU VM hosts (default: from ACCELERATOR_TYPE).
#   RECHECK_SECONDS    when the run fails but the TPU still looks healthy, seconds to wait
#                      before reading its state once more, since a preemption can take a
#                      while to show (default 60).
#   RELAUNCH_TRIES     tries at recreating and setting up a preempted TPU before giving up
#                      (default 3), BACKOFF_SECONDS apart, the wait doubling each time; also
#                      how many times a run whose ssh failed (exit 255) on a healthy TPU is
#                      started again.
#   BACKOFF_SECONDS    first wait between those tries (default 60).
#   REMOTE_DIR         code directory on each worker, under its home (default lapflow-jax).
#   VENV_DIR           virtualenv on each worker, under its home (default lapflow-venv).
#   QUEUED_RESOURCE    id of the queued resource (default TPU_NAME).
#   CAPACITY           on-demand, spot or reserved, for recreating (see create_tpu.sh).
#   RUNTIME_VERSION    passed to create_tpu.sh when recreating.
#   SERVICE_ACCOUNT    passed to create_tpu.sh when recreating.
#   WAIT_TIMEOUT       passed to create_tpu.sh when recreating.
#   POLL_SECONDS       passed to create_tpu.sh when recreating.
#   REPO_URL           passed to setup_workers.sh when recreating.
#   REPO_REF           passed to setup_workers.sh when recreating.
#   SRC_DIR            passed to setup_workers.sh when recreating.
#   PIP_EXTRAS         passed to setup_workers.sh when recreating.
#   DRY_RUN            1 prints the commands of one attempt instead of running them
#                      (--dry-run).
#   COMPILE_CHECK      1 runs the compile check first (--compile-check); it needs this
#                      checkout installed here with the TPU compiler:
#                      pip install -c launch/constraints-tpu.txt -e '.[tpu]'.
#   TOPOLOGY           topology for the compile check (default: from ACCELERATOR_TYPE, e.g.
#                      v5p-128 -> v5p:4x4x4).
#   LOCAL_PYTHON       interpreter that runs the compile check here (default python3).
set -euo pipefail
launch_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
source "$launch_dir/common.sh"

script_flag() {
  case "$1" in
    --spot) export CAPACITY=spot ;;
    --reserved) export CAPACITY=reserved ;;
    --on-demand) export CAPACITY=on-demand ;;
    --compile-check) COMPILE_CHECK=1 ;;
    *) return 1 ;;
  esac
}

parse_args "$@"
require_vars PROJECT ZONE TPU_NAME ACCELERATOR_TYPE CONFIG WORKDIR
check_config_and_workdir "$CONFIG" "$WORKDIR"
tpu_parse "$ACCELERATOR_TYPE"
NUM_WORKERS=${NUM_WORKERS:-$tpu_hosts}
MAX_RETRIES=${MAX_RETRIES:-3}
RECHECK_SECONDS=${RECHECK_SECONDS:-60}
RELAUNCH_TRIES=${RELAUNCH_TRIES:-3}
BACKOFF_SECONDS=${BACKOFF_SECONDS:-60}
RUN_NAME=${RUN_NAME:-$(basename "$CONFIG" .py)}
LOG_DIR=${LOG_DIR:-$(dirname "$launch_dir")/workdirs/tpu-logs/$TPU_NAME/$(date +%Y%m%d-%H%M%S)}
REMOTE_DIR=${REMOTE_DIR:-lapflow-jax}
VENV_DIR=${VENV_DIR:-lapflow-venv}
QUEUED_RESOURCE=${QUEUED_RESOURCE:-$TPU_NAME}
export QUEUED_RESOURCE REMOTE_DIR VENV_DIR
for name in NUM_WORKERS MAX_RETRIES RECHECK_SECONDS RELAUNCH_TRIES BACKOFF_SECONDS; do
  [[ "${!name}" =~ ^[0-9]+$ ]] || die "$name='${!name}': expected a whole number"
done
((NUM_WORKERS > 0)) || die "NUM_WORKERS must be at least 1"
[[ "$RUN_NAME" =~ ^[A-Za-z0-9_.-]+$ ]] || die "RUN_NAME='$RUN_NAME': expected letters, digits, '.', '_', '-'"
[[ "$REMOTE_DIR" =~ ^[A-Za-z0-9_][A-Za-z0-9._-]*$ ]] || die "REMOTE_DIR='$REMOTE_DIR': expected a plain directory name"
[[ "$VENV_DIR" =~ ^[A-Za-z0-9_./-]+$ ]] || die "VENV_DIR='$VENV_DIR': expected a path of letters, digits, '.', '_', '-', '/'"
[[ -f "$(dirname "$launch_dir")/$CONFIG" ]] ||
  log "warning: $CONFIG is not in this checkout; it must exist in the code on the workers"

# The compile check: the same config and overrides, compiled here for the slice's topology.
if [[ "${COMPILE_CHECK:-0}" == 1 ]]; then
  TOPOLOGY=${TOPOLOGY:-$(compile_topology "$ACCELERATOR_TYPE")}
  overrides=()
  for arg in ${extra_args[@]+"${extra_args[@]}"}; do
    [[ "$arg" == --config.* ]] && overrides+=("$arg")
  done
  log "compile check of $CONFIG for $TOPOLOGY ($ACCELERATOR_TYPE) on this machine"
  (cd "$(dirname "$launch_dir")" && run_cmd "${LOCAL_PYTHON:-python3}" -m lapflow_jax.compile_check \
    --config="$CONFIG" --topology="$TOPOLOGY" ${overrides[@]+"${overrides[@]}"}) ||
    die "the compile check failed (above): $CONFIG does not fit or does not compile for $TOPOLOGY; nothing was started"
fi

where=(--zone="$ZONE" --project="$PROJECT")
[[ "$VENV_DIR" == /* ]] && python="$VENV_DIR/bin/python" || python="\$HOME/$VENV_DIR/bin/python"
training=$(train_command "$python" "$CONFIG" "$WORKDIR" ${extra_args[@]+"${extra_args[@]}"})

# Runs attempt $1 on all workers; each worker tees its output to ~/lapflow-logs/.
run_attempt() {
  local remote_log="lapflow-logs/$RUN_NAME-attempt$1.log"
  local remote="set -o pipefail; mkdir -p \$HOME/lapflow-logs; cd \$HOME/$REMOTE_DIR &&"
  remote+=" PYTHONUNBUFFERED=1 $training 2>&1 | tee \$HOME/$remote_log"
  run_cmd gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${where[@]}" --command="$remote"
}

# Copies each worker's log of attempt $1 to LOG_DIR/attempt$1/worker$I.log; a worker that is
# gone (preempted) only gets a warning.
fetch_logs() {
  local worker remote_log="lapflow-logs/$RUN_NAME-attempt$1.log" local_dir="$LOG_DIR/attempt$1"
  [[ "$DRY_RUN" == 1 ]] || mkdir -p "$local_dir"
  for ((worker = 0; worker < NUM_WORKERS; worker++)); do
    run_cmd gcloud compute tpus tpu-vm scp "$TPU_NAME:$remote_log" "$local_dir/worker$worker.log" \
      --worker="$worker" "${where[@]}" ||
      log "warning: could not fetch worker $worker's log (its VM may be gone)"
  done
}

# Prints "healthy" (queued resource ACTIVE and TPU READY) or "lost: <states>" (preempted,
# suspended, being repaired or deleted, or gone); returns 1 when the states cannot be read.
tpu_health() {
  local qr_state node_state
  qr_state=$(gcloud_state 'value(state.state)' \
    compute tpus queued-resources describe "$QUEUED_RESOURCE" "${where[@]}") || return 1
  node_state=$(gcloud_state 'value(state)' compute tpus tpu-vm describe "$TPU_NAME" "${where[@]}") || return 1
  if [[ "$qr_state" == ACTIVE && "$node_state" == READY ]]; then
    echo healthy
  else
    echo "lost: queued resource $QUEUED_RESOURCE $qr_state, TPU $TPU_NAME $node_state"
  fi
}

log "training $CONFIG on $TPU_NAME ($ACCELERATOR_TYPE, $NUM_WORKERS worker(s)), workdir $WORKDIR, logs in $LOG_DIR"
attempt=0
recreations=0
ssh_retries=0
ssh_wait=$BACKOFF_SECONDS
while :; do
  rc=0
  run_attempt "$attempt" || rc=$?
  fetch_logs "$attempt"
  if [[ "$DRY_RUN" == 1 ]]; then
    log "dry run: these are the commands of one attempt"
    exit 0
  fi
  if ((rc == 0)); then
    log "training finished (attempt $attempt); logs in $LOG_DIR/attempt$attempt"
    exit 0
  fi
  log "training failed with exit status $rc (attempt $attempt); reading the TPU state"
  unreadable="cannot read the state of $TPU_NAME (gcloud's error above); logs in $LOG_DIR/attempt$attempt"
  health=$(tpu_health) || die "$unreadable"
  if [[ "$health" == healthy ]]; then
    log "TPU looks healthy; reading its state again in ${RECHECK_SECONDS}s in case a preemption is under way"
    sleep "$RECHECK_SECONDS"
    health=$(tpu_health) || die "$unreadable"
  fi
  if [[ "$health" == healthy ]]; then
    # 255 is ssh's own failure (a worker unreachable, a dropped connection), not the program's:
    # the same command is started again on the same slice, the wait doubling each time.
    if ((rc == 255 && ssh_retries + 1 < RELAUNCH_TRIES)); then
      ssh_retries=$((ssh_retries + 1))
      attempt=$((attempt + 1))
      log "ssh to the workers failed (exit status 255) on a healthy TPU; relaunching in ${ssh_wait}s" \
        "(relaunch $ssh_retries of $((RELAUNCH_TRIES - 1)))"
      sleep "$ssh_wait"
      ssh_wait=$((ssh_wait * 2))
      continue
    fi
    ((rc == 255)) &&
      die "ssh to the workers failed (exit status 255) on a healthy TPU $RELAUNCH_TRIES time(s); see the logs" \
        "in $LOG_DIR/attempt$attempt, then rerun this script (it resumes from $WORKDIR)"
    die "training failed (exit status $rc) on a healthy TPU: not a preemption, so not retried;" \
      "see the logs in $LOG_DIR/attempt$attempt"
  fi
  log "TPU $health"
  ((recreations < MAX_RETRIES)) ||
    die "TPU $health, and all MAX_RETRIES=$MAX_RETRIES retries are used up; rerun this script" \
      "later to resume from the last checkpoint in $WORKDIR (logs in $LOG_DIR)"
  attempt=$((attempt + 1))
  recreations=$((recreations + 1))
  log "retry $recreations of $MAX_RETRIES: recreating $TPU_NAME"
  # The recreated VMs are bare: set them up again before training relaunches. Capacity or a
  # worker's ssh can fail for a while, so the whole step is retried with a doubling wait.
  wait_seconds=$BACKOFF_SECONDS
  for ((try = 1; ; try++)); do
    if "$launch_dir/delete_tpu.sh" && "$launch_dir/create_tpu.sh" && "$launch_dir/setup_workers.sh"; then
      break
    fi
    ((try < RELAUNCH_TRIES)) ||
      die "could not recreate and set up $TPU_NAME ($try tries); rerun this script once capacity is back" \
        "(it resumes from $WORKDIR)"
    log "recreating or setting up $TPU_NAME failed (try $try of $RELAUNCH_TRIES); again in ${wait_seconds}s"
    sleep "$wait_seconds"
    wait_seconds=$((wait_seconds * 2))
  done
done
