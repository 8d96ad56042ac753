#!/usr/bin/env bash
# Train on every worker of a Cloud TPU VM pod slice with one gcloud command. Each worker runs the
# same trainer and the TPU runtime joins the workers' chips into one set of global devices.
#
# Usage: TPU=NAME ZONE=ZONE [PROJECT=ID] launch/tpu_pod.sh CONFIG WORKDIR [more pvt_jax.main flags]
#   e.g. TPU=pvt ZONE=us-central2-b launch/tpu_pod.sh configs/b2.py:imagenet gs://bucket/runs/b2 \
#          --config.data_dir=gs://bucket/tfds
# WORKDIR (checkpoints) and the prepared dataset must be on storage every worker sees, e.g. GCS.
# SETUP=1 first clones REPO_URL (default the project's GitHub) into ~/pvt_jax on every worker and
# installs it with `jax[tpu]`.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  sed -n '5,7p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE to the TPU VM zone}"
config=$1 workdir=$2
shift 2
repo_url=${REPO_URL:-https://github.com/pvt-jax/pvt_jax}

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "${TPU}" --zone="${ZONE}" ${PROJECT:+--project="${PROJECT}"} \
    --worker=all --command="$1"
}

if [[ ${SETUP:-0} == 1 ]]; then
  on_all_workers "set -e; [ -d ~/pvt_jax ] || git clone -q ${repo_url} ~/pvt_jax; \
cd ~/pvt_jax && pip install -q -e . && pip install -q -U 'jax[tpu]'"
fi

on_all_workers "cd ~/pvt_jax && python3 -m pvt_jax.main --distributed --config=${config@Q} \
--workdir=${workdir@Q} ${*@Q}"
