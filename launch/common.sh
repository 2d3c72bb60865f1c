# launch/common.sh: helpers sourced by every launch script (never run on its own).
#
# Variables read here:
#   DRY_RUN   1 prints each gcloud/xpk/kubectl command on one line instead of running it
#             (the scripts' --dry-run flag sets it). Default 0.
#
# Conventions every launch script follows:
#   - its header comment documents every variable it reads, one per line as
#     "#   NAME   description"; `--help` prints that header;
#   - variables come from the environment or from NAME=VALUE arguments (arguments win);
#     only documented names are accepted, so a typo fails instead of being ignored;
#   - in dry-run mode stdout carries only the command lines (shell-quoted, copy-pasteable),
#     and every message goes to stderr.
#
# Functions: parse_args, usage, require_vars, die, log, quote_cmd, run_cmd, gcloud_state,
# the TPU type tables (tpu_parse, gke_parse) and the training command (train_command).
# shellcheck shell=bash

DRY_RUN=${DRY_RUN:-0}

# Prints a message on stderr, prefixed by the script's name.
log() {
  printf '[%s] %s\n' "$(basename "$0")" "$*" >&2
}

# Prints an error on stderr and exits with status 1.
die() {
  printf '[%s] error: %s\n' "$(basename "$0")" "$*" >&2
  exit 1
}

# Prints the calling script's header comment (everything up to the first non-comment line).
usage() {
  awk 'NR == 1 && /^#!/ { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
}

# Prints the header line that documents variable $1, or nothing when it is undocumented.
doc_line() {
  awk -v name="$1" 'NR == 1 && /^#!/ { next } !/^#/ { exit } $1 == "#" && $2 == name { sub(/^# +/, ""); print; exit }' "$0"
}

# Parses a script's arguments: --dry-run, -h/--help, NAME=VALUE for documented variables,
# script-specific flags through a `script_flag FLAG` function (status 0 when it handled
# FLAG), and everything after `--` into the array extra_args.
# shellcheck disable=SC2034  # extra_args is read by the calling script
parse_args() {
  extra_args=()
  local name
  while (($#)); do
    case "$1" in
      --dry-run) DRY_RUN=1 ;;
      -h | --help)
        usage
        exit 0
        ;;
      --)
        shift
        extra_args=("$@")
        break
        ;;
      [A-Z]*=*)
        name=${1%%=*}
        [[ "$name" =~ ^[A-Z][A-Z0-9_]*$ ]] || die "bad argument '$1': expected NAME=VALUE with an upper-case NAME"
        [[ -n "$(doc_line "$name")" ]] ||
          die "unknown variable '$name' in '$1'; $(basename "$0") --help lists the variables it reads"
        printf -v "$name" '%s' "${1#*=}"
        export "${name?}"
        ;;
      *)
        if declare -F script_flag >/dev/null && script_flag "$1"; then
          :
        else
          die "unknown argument '$1'; $(basename "$0") --help lists the flags and variables"
        fi
        ;;
    esac
    shift
  done
  export DRY_RUN
}

# Dies naming every variable in "$@" that is unset or empty, with its documentation line.
require_vars() {
  local name missing=()
  for name in "$@"; do
    [[ -n "${!name:-}" ]] || missing+=("$name")
  done
  ((${#missing[@]} == 0)) && return 0
  {
    printf '[%s] error: missing required variable(s): %s\n' "$(basename "$0")" "${missing[*]}"
    for name in "${missing[@]}"; do
      printf '  %s\n' "$(doc_line "$name")"
    done
    printf 'Set them in the environment or pass NAME=VALUE arguments (see %s --help).\n' "$(basename "$0")"
  } >&2
  exit 1
}

# Prints its arguments as one shell line: plain words as they are, the rest single-quoted,
# so the line can be pasted into a shell and `shlex.split` gives back the argv.
quote_cmd() {
  local arg line=""
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      line+="$arg "
    else
      line+="'${arg//\'/\'\\\'\'}' "
    fi
  done
  printf '%s\n' "${line% }"
}

# Runs a command; in dry-run mode prints it on stdout instead (status 0).
run_cmd() {
  if [[ "$DRY_RUN" == 1 ]]; then
    quote_cmd "$@"
    return 0
  fi
  log "+ $(quote_cmd "$@")"
  "$@"
}

# Runs `gcloud ARGS... --format=FORMAT` (FORMAT is $1) and prints its one-line output (a
# state such as ACTIVE or READY), NOT_FOUND when the resource does not exist, or returns 1
# with gcloud's error on stderr when the state cannot be read (network, permissions).
gcloud_state() {
  local format=$1 out err rc=0
  shift
  err=$(mktemp)
  out=$(gcloud "$@" --format="$format" 2>"$err") || rc=$?
  if ((rc == 0)); then
    rm -f "$err"
    printf '%s\n' "${out:-UNKNOWN}"
    return 0
  fi
  if grep -qiE 'NOT_FOUND|not found' "$err"; then
    rm -f "$err"
    echo NOT_FOUND
    return 0
  fi
  cat "$err" >&2
  rm -f "$err"
  return 1
}

# --- TPU types -----------------------------------------------------------------------------
# Accelerator types are FAMILY-N: v2-N, v3-N, v4-N and v5p-N count TensorCores (2 per chip),
# v5litepod-N (v5e) and v6e-N count chips. A TPU VM host holds 4 chips (v2/v3: 8 cores);
# v5e/v6e slices of up to 8 chips are one host. These functions set globals instead of
# printing, so that `die` stops the script (a command substitution would only end a subshell).

# Parses accelerator type $1 into tpu_family (v5litepod, v5p, v6e, v4, v3, v2), tpu_count,
# tpu_chips, tpu_hosts (TPU VM workers) and tpu_runtime (the TPU software version the Cloud
# TPU docs recommend for JAX on that family).
# shellcheck disable=SC2034  # the globals are read by the calling script
tpu_parse() {
  [[ "$1" =~ ^(v2|v3|v4|v5p|v5litepod|v6e)-([1-9][0-9]*)$ ]] ||
    die "accelerator type '$1' not understood: expected v5litepod-N, v5p-N, v6e-N, v4-N, v3-N" \
      "or v2-N (e.g. v5litepod-8, v5p-32, v6e-8)"
  tpu_family=${BASH_REMATCH[1]}
  tpu_count=${BASH_REMATCH[2]}
  case "$tpu_family" in
    v5litepod | v6e)
      tpu_chips=$tpu_count
      tpu_hosts=$((tpu_chips <= 8 ? 1 : tpu_chips / 4))
      ;;
    *)
      tpu_chips=$((tpu_count / 2 > 0 ? tpu_count / 2 : 1))
      tpu_hosts=$((tpu_chips <= 4 ? 1 : tpu_chips / 4))
      ;;
  esac
  case "$tpu_family" in
    v6e) tpu_runtime=v2-alpha-tpuv6e ;;
    v5p) tpu_runtime=v2-alpha-tpuv5 ;;
    v5litepod) tpu_runtime=v2-alpha-tpuv5-lite ;;
    *) tpu_runtime=tpu-ubuntu2204-base ;;
  esac
}

# Parses accelerator type $1 for GKE into gke_accelerator and gke_topology (the node labels
# cloud.google.com/gke-tpu-accelerator and cloud.google.com/gke-tpu-topology; gke_topology
# is empty for uncommon shapes), gke_chips_per_vm (google.com/tpu per pod: single-host
# v5e/v6e slices put up to 8 chips on one VM, multi-host slices 4) and gke_vms_per_slice.
# shellcheck disable=SC2034  # the globals are read by the calling script
gke_parse() {
  tpu_parse "$1"
  case "$tpu_family" in
    v6e) gke_accelerator=tpu-v6e-slice ;;
    v5p) gke_accelerator=tpu-v5p-slice ;;
    v5litepod) gke_accelerator=tpu-v5-lite-podslice ;;
    v4) gke_accelerator=tpu-v4-podslice ;;
    *) die "accelerator type '$1': GKE has no TPU $tpu_family node pools; use v4, v5e (v5litepod), v5p or v6e" ;;
  esac
  gke_topology=""
  case "$tpu_family:$tpu_chips" in
    v5litepod:1 | v6e:1) gke_topology=1x1 ;;
    v5litepod:4 | v6e:4) gke_topology=2x2 ;;
    v5litepod:8 | v6e:8) gke_topology=2x4 ;;
    v5litepod:16 | v6e:16) gke_topology=4x4 ;;
    v5litepod:32 | v6e:32) gke_topology=4x8 ;;
    v5litepod:64 | v6e:64) gke_topology=8x8 ;;
    v5litepod:128 | v6e:128) gke_topology=8x16 ;;
    v5litepod:256 | v6e:256) gke_topology=16x16 ;;
    v5p:4 | v4:4) gke_topology=2x2x1 ;;
    v5p:8 | v4:8) gke_topology=2x2x2 ;;
    v5p:16 | v4:16) gke_topology=2x2x4 ;;
    v5p:32 | v4:32) gke_topology=2x4x4 ;;
    v5p:64 | v4:64) gke_topology=4x4x4 ;;
    v5p:128 | v4:128) gke_topology=4x4x8 ;;
    v5p:256 | v4:256) gke_topology=4x8x8 ;;
    v5p:512 | v4:512) gke_topology=8x8x8 ;;
  esac
  gke_chips_per_vm=$((tpu_hosts == 1 ? tpu_chips : 4))
  gke_vms_per_slice=$((tpu_chips / gke_chips_per_vm))
}

# Prints the TPU compiler's topology name of accelerator type $1 (v5litepod-8 -> v5e:2x4,
# v5p-128 -> v5p:4x4x4, v6e-256 -> v6e:16x16), as `python -m lapflow_jax.compile_check
# --topology` takes it; dies for a type without one.
compile_topology() {
  gke_parse "$1"
  [[ -n "$gke_topology" ]] || die "accelerator type '$1' has no known topology shape; set TOPOLOGY (e.g. v5e:2x4)"
  local family=$tpu_family
  [[ "$family" == v5litepod ]] && family=v5e
  printf '%s:%s\n' "$family" "$gke_topology"
}

# --- commands shared by the scripts --------------------------------------------------------

# Prints the training command line for interpreter $1, config $2 and workdir $3, followed
# by the extra arguments (config overrides), each shell-quoted for the remote shell.
train_command() {
  local arg line
  line="$1 -m lapflow_jax.main --config=$(printf '%q' "$2") --workdir=$(printf '%q' "$3")"
  shift 3
  for arg in "$@"; do
    line+=" $(printf '%q' "$arg")"
  done
  printf '%s\n' "$line"
}

# Checks config $1 and workdir $2 of a training run (the entry point's required flags).
check_config_and_workdir() {
  [[ "$1" == *.py && "$1" != /* ]] ||
    die "CONFIG='$1': expected a config file relative to the repository root, e.g. configs/celebahq256_lapflow.py"
  [[ "$2" =~ ^gs://[a-z0-9][-a-z0-9._]{1,220}[a-z0-9](/.*)?$ ]] ||
    die "WORKDIR='$2': expected a gs://bucket/path, so that every worker, every recreated TPU" \
      "and every restart sees the same checkpoints"
}

# Checks that name $2 (of variable $1) is a valid JobSet/xpk workload name.
check_k8s_name() {
  [[ "$2" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ && ${#2} -le 40 ]] ||
    die "$1='$2': expected at most 40 lower-case letters, digits and '-', starting with a letter (xpk and JobSet pod names)"
}
