#!/usr/bin/env bash
# launch/prepare_data.sh: turns ImageNet's tars, or any folder of images, into an array_record
# dataset (tensorflow-datasets) on this machine, then copies it to a gs:// bucket, where the
# pod's workers read it (latent caching or pixel training), and prints the config fields that
# point there. Run it on a machine with the disk for the build (see docs/cloud_tpu.md, "Data
# to a bucket": for ImageNet about 150 GB of tars plus about 150 GB of build, so a VM with a
# 400 GB disk in the bucket's region, not a TPU worker). It needs the `prepare` extra:
#   pip install -e '.[prepare]'     (TensorFlow, which tfds's ImageNet builder needs)
#
# Usage: launch/prepare_data.sh [--dry-run] [NAME=VALUE ...]
#
# Variables (environment or NAME=VALUE arguments):
#   SOURCE       required. imagenet2012 (ImageNet's ILSVRC2012 tars, tfds's imagenet2012
#                builder) or image_folder (a folder of JPEG/PNG files, one sub-folder per
#                class; lapflow_jax.data.image_folder).
#   DATA_DIR     required. gs://bucket/path: the tfds data_dir in the bucket; the config's
#                latent.source.data_dir (latent configs) or data.data_dir (pixel configs).
#   MANUAL_DIR   SOURCE=imagenet2012: folder holding ILSVRC2012_img_train.tar and
#                ILSVRC2012_img_val.tar (downloaded by you from image-net.org).
#   FOLDER       SOURCE=image_folder: the image folder.
#   LOCAL_DIR    local tfds data_dir the build is written to first (array_record's writer
#                opens local files only; default $TMPDIR/lapflow-tfds, or /tmp/lapflow-tfds).
#   PYTHON       interpreter with lapflow-jax[prepare] installed (default python3).
#   DRY_RUN      1 prints the commands instead of running them (--dry-run).
set -euo pipefail
launch_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
source "$launch_dir/common.sh"

parse_args "$@"
require_vars SOURCE DATA_DIR
PYTHON=${PYTHON:-python3}
LOCAL_DIR=${LOCAL_DIR:-${TMPDIR:-/tmp}/lapflow-tfds}
[[ "$DATA_DIR" =~ ^gs://[a-z0-9][-a-z0-9._]{1,220}[a-z0-9](/.*)?$ ]] ||
  die "DATA_DIR='$DATA_DIR': expected a gs://bucket/path that the workers can read"
DATA_DIR=${DATA_DIR%/}
repo=$(dirname "$launch_dir")

case "$SOURCE" in
  imagenet2012)
    require_vars MANUAL_DIR
    for tar in ILSVRC2012_img_train.tar ILSVRC2012_img_val.tar; do
      [[ "$DRY_RUN" == 1 || -f "$MANUAL_DIR/$tar" ]] ||
        die "MANUAL_DIR='$MANUAL_DIR' has no $tar (download it from https://image-net.org; tfds does not)"
    done
    log "building imagenet2012 as array_record into $LOCAL_DIR (hours; see docs/cloud_tpu.md for the disk)"
    run_cmd tfds build imagenet2012 --data_dir="$LOCAL_DIR" --file_format=array_record --manual_dir="$MANUAL_DIR"
    dataset=imagenet2012
    tfds_name=imagenet2012
    ;;
  image_folder)
    require_vars FOLDER
    [[ "$DRY_RUN" == 1 || -d "$FOLDER" ]] || die "FOLDER='$FOLDER': no such folder"
    dataset=lapflow_image_folder
    if [[ "$DRY_RUN" == 1 ]]; then
      run_cmd "$PYTHON" -m lapflow_jax.data.image_folder --folder="$FOLDER" --data_dir="$LOCAL_DIR"
      tfds_name="lapflow_image_folder/<folder>_<fingerprint>:1.0.0"
    else
      log "+ $(quote_cmd "$PYTHON" -m lapflow_jax.data.image_folder --folder="$FOLDER" --data_dir="$LOCAL_DIR")"
      built=$(cd "$repo" && "$PYTHON" -m lapflow_jax.data.image_folder --folder="$FOLDER" --data_dir="$LOCAL_DIR") ||
        die "building the image folder failed (above)"
      printf '%s\n' "$built" >&2
      # ".../lapflow_image_folder/<config>/1.0.0" -> "lapflow_image_folder/<config>:1.0.0"
      version_dir=$(sed -n 's/.* -> //p' <<<"$built" | head -n 1)
      [[ -n "$version_dir" ]] || die "could not read the built dataset's folder from: $built"
      tfds_name="lapflow_image_folder/$(basename "$(dirname "$version_dir")"):$(basename "$version_dir")"
    fi
    ;;
  *) die "SOURCE='$SOURCE': expected imagenet2012 or image_folder" ;;
esac

log "copying $LOCAL_DIR/$dataset to $DATA_DIR/"
run_cmd gcloud storage cp -r "$LOCAL_DIR/$dataset" "$DATA_DIR/"
log "done: $DATA_DIR/$dataset. Point the config there:"
printf '  latent configs: --config.latent.source.name=tfds --config.latent.source.tfds_name=%s --config.latent.source.data_dir=%s\n' \
  "$tfds_name" "$DATA_DIR" >&2
printf '  pixel configs:  --config.data.name=tfds --config.data.tfds_name=%s --config.data.data_dir=%s\n' \
  "$tfds_name" "$DATA_DIR" >&2
