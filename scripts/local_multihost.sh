#!/usr/bin/env bash
# Runs N processes of a command on this machine as one multi-host JAX job (CPU, gloo collectives).
#
#   scripts/local_multihost.sh N CMD...
#   scripts/local_multihost.sh 2 python -m pplug_jax.train --config configs/lamp.py:demo --workdir W
#
# Each process sees DEVICES_PER_PROCESS (default 4) simulated CPU devices and is joined to the
# others by jax.distributed on localhost: pplug_jax.partitioning.maybe_initialize_distributed
# reads PPLUG_COORDINATOR_ADDRESS, PPLUG_NUM_PROCESSES and PPLUG_PROCESS_ID. Output lines are
# prefixed with [pI]; the script fails (with the first failing exit status) if any process fails,
# and stops the others when one fails.
set -uo pipefail
if [ "$#" -lt 2 ] || ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N CMD..." >&2
  exit 2
fi
n=$1
shift
devices=${DEVICES_PER_PROCESS:-4}
port=${PPLUG_COORDINATOR_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
pids=()
for ((i = 0; i < n; i++)); do
  (
    export PPLUG_COORDINATOR_ADDRESS="127.0.0.1:${port}" PPLUG_NUM_PROCESSES="$n" PPLUG_PROCESS_ID="$i"
    export JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${devices} ${XLA_FLAGS:-}"
    export PYTHONUNBUFFERED=1
    "$@" 2>&1 | sed -u "s/^/[p${i}] /"
    exit "${PIPESTATUS[0]}"
  ) &
  pids+=($!)
done
status=0
remaining=${#pids[@]}
declare -A done_
while [ "$remaining" -gt 0 ]; do
  for idx in "${!pids[@]}"; do
    pid=${pids[$idx]}
    [ -n "${done_[$idx]:-}" ] && continue
    if ! kill -0 "$pid" 2>/dev/null; then
      wait "$pid"
      rc=$?
      done_[$idx]=1
      remaining=$((remaining - 1))
      if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
        status=$rc
        echo "[local_multihost] process $idx exited with $rc; stopping the others" >&2
        for other in "${pids[@]}"; do pkill -TERM -P "$other" 2>/dev/null; done
      fi
    fi
  done
  sleep 0.2
done
exit "$status"
