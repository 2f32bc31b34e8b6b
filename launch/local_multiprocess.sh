#!/usr/bin/env bash
# Runs N processes of the trainer on this machine as one multi-process JAX job: what a TPU pod's
# hosts do, on CPU devices, so the multi-host code paths can be run and tested without a pod.
#
#   launch/local_multiprocess.sh N CONFIG WORKDIR [ARGS ...]
#   launch/local_multiprocess.sh 2 configs/test.py /tmp/mp --mode=sft --config.seed=1
#
# Process i runs `$PYTHON -m openvlthinker.main --distributed --config=CONFIG --workdir=WORKDIR
# ARGS...` with JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT (a free port), JAX_NUM_PROCESSES=N,
# JAX_PROCESS_ID=i, JAX_PLATFORMS=cpu (unless set) and DEVICES_PER_PROCESS fake devices in
# XLA_FLAGS. Process 0 prints to the terminal; every process also writes
# WORKDIR/logs/process_<i>.log. When one process fails, the others are killed (they would wait
# forever in a collective) and the script exits with its status; SIGTERM or Ctrl-C is passed to
# every process (the trainer saves a checkpoint and exits 0), then the script waits for them.
#
# Environment: PYTHON (default .venv/bin/python, else python3), DEVICES_PER_PROCESS (default 4).
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

die() {
  echo "error: $*" >&2
  exit 2
}

# `wait -n PID...` needs bash 5.1.
if (( BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 501 )); then
  die "bash: expected version 5.1 or newer, got $BASH_VERSION"
fi

case ${1:-} in
  -h|--help) usage; exit 0 ;;
esac
if (( $# < 3 )); then
  echo "usage: $0 N CONFIG WORKDIR [ARGS ...]   (--help for more)" >&2
  exit 2
fi
num=$1 config=$2 workdir=$3
shift 3

[[ $num =~ ^[1-9][0-9]*$ ]] || die "N: expected a positive number of processes, got '$num'"
devices=${DEVICES_PER_PROCESS:-4}
[[ $devices =~ ^[1-9][0-9]*$ ]] ||
  die "DEVICES_PER_PROCESS: expected a positive number of devices, got '$devices'"
[[ -f ${config%%:*} ]] || die "CONFIG: expected a config file (configs/*.py[:arg]), got '$config'"

root=$(cd "$(dirname "$0")/.." && pwd)
if [[ -n ${PYTHON:-} ]]; then
  python=$PYTHON
elif [[ -x $root/.venv/bin/python ]]; then
  python=$root/.venv/bin/python
else
  python=python3
fi

# Ask the OS for a free port (a guessed one may be taken); python3 rather than $PYTHON, which may
# be anything that runs the trainer.
probe=python3
command -v "$probe" >/dev/null || probe=$python
port=$("$probe" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')

# The device-count flag replaces any earlier one: XLA takes the first, and conftest-style
# environments already carry one.
read -ra old_flags <<< "${XLA_FLAGS:-}"
xla_flags=()
for flag in "${old_flags[@]}"; do
  [[ $flag == --xla_force_host_platform_device_count=* ]] || xla_flags+=("$flag")
done
xla_flags+=("--xla_force_host_platform_device_count=$devices")

logs=$workdir/logs
mkdir -p "$logs"
echo "local_multiprocess: $num processes x $devices devices, coordinator 127.0.0.1:$port," \
  "logs in $logs/"

export JAX_COORDINATOR_ADDRESS=127.0.0.1:$port JAX_NUM_PROCESSES=$num
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} XLA_FLAGS="${xla_flags[*]}"
cmd=("$python" -m openvlthinker.main --distributed "--config=$config" "--workdir=$workdir" "$@")

# Each process in its own process group (job control): Ctrl-C reaches only this script, which
# passes it on once (a second SIGINT makes the trainer stop without saving), and a failure kills a
# process's whole group (its scoring workers too). Job control also stops bash from ignoring
# SIGINT in the background processes.
set -m
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Process 0's stdout and stderr each go to the terminal and to its log, through FIFOs read by
# tee (jobs that can be waited for, so nothing is lost at the end).
mkfifo "$tmp/out" "$tmp/err"
log0=$logs/process_0.log
: > "$log0"
tee -a "$log0" < "$tmp/out" &
tees=("$!")
tee -a "$log0" < "$tmp/err" >&2 &
tees+=("$!")

declare -A process_of=()
live=()
for (( i = 0; i < num; i++ )); do
  if (( i == 0 )); then
    JAX_PROCESS_ID=$i "${cmd[@]}" < /dev/null > "$tmp/out" 2> "$tmp/err" &
  else
    JAX_PROCESS_ID=$i "${cmd[@]}" < /dev/null > "$logs/process_$i.log" 2>&1 &
  fi
  process_of[$!]=$i
  live+=("$!")
done

# shellcheck disable=SC2329  # invoked by the traps below
forward() {
  echo "local_multiprocess: SIG$1: passing it to the ${#live[@]} running processes" >&2
  local pid
  for pid in "${live[@]}"; do
    kill -s "$1" "$pid" 2>/dev/null || true
  done
}
trap 'forward TERM' TERM
trap 'forward INT' INT

failed=0 status=0
while (( ${#live[@]} )); do
  # Sleep until a process ends or a signal arrives. `wait -n` alone can miss a process that job
  # control has already reported (it answers "no such job"), so each pass checks every process by
  # pid, and `wait PID` gives an ended one's status (bash keeps it).
  wait -n "${live[@]}" 2>/dev/null && code=0 || code=$?
  (( code != 127 )) || sleep 0.1
  rest=()
  for pid in "${live[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      rest+=("$pid")
      continue
    fi
    wait "$pid" && code=0 || code=$?
    if (( code != 0 && status == 0 )); then
      status=$code
      echo "local_multiprocess: process ${process_of[$pid]} exited with status $code;" \
        "killing the others" >&2
      failed=1
    fi
  done
  live=("${rest[@]}")
  if (( failed )); then
    failed=0
    for pid in "${live[@]}"; do
      kill -KILL -- "-$pid" 2>/dev/null || true
    done
  fi
done
wait "${tees[@]}" || true
exit "$status"
