#!/usr/bin/env bash
# Several JAX processes on one CPU machine, talking over 127.0.0.1: a rehearsal of a multi-host run.
#
#   launch/local_multiprocess.sh <num_processes> <devices_per_process> <workdir> [--config.key=value ...]
#
# Uses configs/tiny.py unless CONFIG is set. Exits non-zero if any process fails.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 <num_processes> <devices_per_process> <workdir> [--config.key=value ...]" >&2
  exit 2
fi
N=$1; DEVICES=$2; WORKDIR=$3; shift 3
CONFIG=${CONFIG:-configs/tiny.py}
PORT=${PORT:-$((20000 + RANDOM % 20000))}
PYTHON=${PYTHON:-python}
pids=()
for ((i = 0; i < N; i++)); do
  JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=$DEVICES "$PYTHON" -m swiftbrush_jax.train --config "$CONFIG" \
    --workdir "$WORKDIR" --coordinator_address "127.0.0.1:$PORT" --num_processes "$N" --process_id "$i" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
