#!/usr/bin/env bash
# Simulate an N-host job on one machine: N CPU processes of the trainer joined through JAX's
# distributed runtime (gloo collectives), exactly the code path of a real multi-host run.
#
# Usage: launch/local_multiprocess.sh N CONFIG WORKDIR [more pvt_jax.main flags...]
#   e.g. launch/local_multiprocess.sh 2 configs/b0.py:runlocal runs/mp --config.num_train_steps=20
# Environment: PORT (coordinator port, default 12355), DEVICES_PER_PROCESS (CPU devices each
# process sees, default 1), GRACE_S (seconds stopped processes get to exit after SIGTERM before
# SIGKILL, default 30). Logs go to WORKDIR/process_<i>.log; the exit status is the first failing
# process's, and the others are stopped then.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '5,10p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
num_processes=$1 config=$2 workdir=$3
shift 3
port=${PORT:-12355}
grace_s=${GRACE_S:-30}
mkdir -p "${workdir}"

export JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-1}"

declare -A process_of=()

# SIGTERM (a preemption notice: the trainers save and exit) to the processes still running, then
# SIGKILL to those still there after the grace period; returns once all of them are gone.
stop_all() {
  local pids=("${!process_of[@]}") pid deadline=$((SECONDS + grace_s))
  ((${#pids[@]})) || return 0
  kill -TERM "${pids[@]}" 2>/dev/null || true
  for pid in "${pids[@]}"; do
    while kill -0 "${pid}" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
  done
  kill -KILL "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
}
trap stop_all EXIT
trap 'exit 143' TERM
trap 'exit 130' INT
for ((i = 0; i < num_processes; i++)); do
  python -m pvt_jax.main --config="${config}" --workdir="${workdir}" \
    --coordinator_address="127.0.0.1:${port}" --num_processes="${num_processes}" \
    --process_id="${i}" "$@" >"${workdir}/process_${i}.log" 2>&1 &
  process_of[$!]=${i}
done

# A process that fails leaves the others blocked in collectives: stop them at the first failure.
while ((${#process_of[@]})); do
  status=0
  wait -n -p pid "${!process_of[@]}" || status=$?
  i=${process_of[${pid}]}
  unset "process_of[${pid}]"
  if ((status)); then
    echo "error: process ${i} exited with status ${status}; see ${workdir}/process_${i}.log" >&2
    tail -n 20 "${workdir}/process_${i}.log" >&2
    exit "${status}"
  fi
done
