#!/usr/bin/env bash
# Launch a run on every host of a Cloud TPU pod slice (one process per host).
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/default.py:ARG gs://bucket/workdir [--config.x=y ...]
#
# Every host clones nothing: the repository must already be on each host at ~/openvlthinker
# (e.g. `gcloud compute tpus tpu-vm scp --recurse . TPU_NAME:~/openvlthinker --worker=all`).
# The workdir should be a GCS path so that orbax checkpoints are shared by all hosts.
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.overrides ...]" >&2
  exit 2
fi
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
overrides="$*"
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "
  set -e
  cd ~/openvlthinker
  test -x .venv/bin/python || (python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]')
  .venv/bin/python -m openvlthinker.main --distributed --config=$config --workdir=$workdir $overrides
"
