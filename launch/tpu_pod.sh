#!/usr/bin/env bash
# SwiftBrush on a Cloud TPU VM pod slice: the same command on every worker.
#
#   launch/tpu_pod.sh <tpu-name> <zone> <workdir> [--config.key=value ...]
#
# The workdir must be shared by all workers: a gs:// bucket path (orbax writes checkpoints there directly,
# everything else goes through swiftbrush_jax.storage); the VM's service account is the credential.
# jax.distributed.initialize() finds the pod's workers by itself (TPU_WORKER_HOSTNAMES).
#
# A failed run (a lost worker: the others exit non-zero within config.peer_timeout_s) is started again on
# every worker, at most RETRIES more times (default 3), after RETRY_WAIT_S seconds (default 60); each start
# resumes from the newest complete checkpoint. Before a retry, a trainer still running on any worker (a hung
# one) is ended by the process id it recorded. docs/reliability.md says what happens when a worker is lost.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 <tpu-name> <zone> <workdir> [--config.key=value ...]" >&2
  exit 2
fi
TPU_NAME=$1; ZONE=$2; WORKDIR=$3; shift 3
CONFIG=${CONFIG:-configs/sd21.py}
RETRIES=${RETRIES:-3}
RETRY_WAIT_S=${RETRY_WAIT_S:-60}
HERE=$(cd "$(dirname "$0")/.." && pwd)

on_all() { gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"; }

# Copy this checkout to every worker and install it there, once.
gcloud compute tpus tpu-vm scp --recurse "$HERE" "$TPU_NAME":~/swiftbrush-jax --zone "$ZONE" --worker=all
on_all "set -e; cd swiftbrush-jax; python3 -m venv .venv && . .venv/bin/activate
  pip install -q -U pip && pip install -q -e . 'jax[tpu]'"

TRAIN="cd swiftbrush-jax && . .venv/bin/activate && exec python -m swiftbrush_jax.train --config $CONFIG --workdir $WORKDIR $*"
for ((attempt = 0; ; attempt++)); do
  status=0
  on_all "echo \$\$ > ~/swiftbrush-train.pid; $TRAIN" || status=$?
  [ "$status" -eq 0 ] && exit 0
  if [ "$attempt" -ge "$RETRIES" ]; then
    echo "error: training failed (status $status) $((attempt + 1)) times (RETRIES=$RETRIES); not retried:" \
         "read the workers' output, then run this again to resume from the newest checkpoint" >&2
    exit "$status"
  fi
  echo "training failed (status $status); retry $((attempt + 1)) of $RETRIES in $RETRY_WAIT_S s" >&2
  on_all 'p=$(cat ~/swiftbrush-train.pid 2>/dev/null) && kill -9 "$p" 2>/dev/null; true' || true
  sleep "$RETRY_WAIT_S"
done
