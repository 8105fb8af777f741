#!/usr/bin/env bash
# SwiftBrush on a Cloud TPU VM pod slice: the same command on every worker.
#
#   launch/tpu_pod.sh <tpu-name> <zone> <workdir> [--config.key=value ...]
#
# The workdir must be shared by all workers: a gs:// bucket path (orbax writes checkpoints there directly,
# everything else goes through swiftbrush_jax.storage); the VM's service account is the credential.
# jax.distributed.initialize() finds the pod's workers by itself (TPU_WORKER_HOSTNAMES).
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 <tpu-name> <zone> <workdir> [--config.key=value ...]" >&2
  exit 2
fi
TPU_NAME=$1; ZONE=$2; WORKDIR=$3; shift 3
CONFIG=${CONFIG:-configs/sd21.py}
HERE=$(cd "$(dirname "$0")/.." && pwd)

# Copy this checkout to every worker, then install and start the same command on all of them.
gcloud compute tpus tpu-vm scp --recurse "$HERE" "$TPU_NAME":~/swiftbrush-jax --zone "$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  cd swiftbrush-jax
  python3 -m venv .venv && . .venv/bin/activate
  pip install -q -U pip && pip install -q -e . 'jax[tpu]'
  python -m swiftbrush_jax.train --config $CONFIG --workdir $WORKDIR $*
"
