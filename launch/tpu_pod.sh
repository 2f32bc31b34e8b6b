#!/usr/bin/env bash
# A training run on every host of a Cloud TPU pod slice, from this checkout, in one command.
#
#   launch/tpu_pod.sh SUBCOMMAND --name=TPU --zone=ZONE [OPTIONS] [--config.FIELD=VALUE ...]
#       [-- TRAINER ARGS]
#
# Subcommands:
#   create   create the TPU VM (--queued: through a queued resource, waiting until it is ACTIVE)
#   setup    put the code on every worker (copy this checkout, or --repo/--ref: git clone) and
#            install it there: a venv with `pip install -c constraints.txt -e . jax[tpu]==PIN`;
#            with --bucket, also mount the buckets (below)
#   run      python -m openvlthinker.main --distributed --config=CONFIG --workdir=WORKDIR on every
#            worker (after mounting the --bucket buckets, if any); worker 0's output streams
#            here, every worker also appends to REMOTE_DIR/logs/train.log on itself
#   logs     follow a worker's train.log (--worker=N, default 0), e.g. after a dropped connection
#   delete   delete the TPU VM (--queued: the queued resource and its TPU)
#   all      create, setup and run (and delete with --delete-after)
#
# Options (--opt=value or --opt value):
#   --name NAME            the TPU (and queued resource) name                       [all]
#   --zone ZONE            e.g. us-east5-a                                           [all]
#   --project PROJECT      the gcloud project (default: gcloud's configured one)
#   --accelerator TYPE     e.g. v5p-64, v6e-32, v5litepod-16, v4-32                [create]
#   --version RUNTIME      the TPU runtime version (default from the accelerator:
#                          v5p v2-alpha-tpuv5, v5e v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e,
#                          v4 tpu-ubuntu2204-base)
#   --queued               create/delete through a queued resource
#   --spot                 create Spot capacity (preemptible; the trainer resumes on a rerun)
#   --repo URL [--ref REF] setup: git clone URL on every worker at REF (default HEAD) instead of
#                          copying this checkout with `gcloud compute tpus tpu-vm scp --recurse`
#   --remote-dir DIR       where the code goes on the workers, relative to home (openvlthinker)
#   --python PY            the workers' interpreter for the venv (python3.11; apt-installed when
#                          missing, as on the Ubuntu 22.04 runtime images)
#   --bucket NAME          setup/run/all: mount gs://NAME at /gcs/NAME on every worker with
#                          Cloud Storage FUSE (gcsfuse, apt-installed from Google's repository
#                          when missing); skipped where it is already mounted. Repeat it or give
#                          a comma list for several buckets. The trainer reads no gs:// URLs:
#                          pass the mounted paths (--workdir=/gcs/NAME/run, data under /gcs/...)
#   --config SPEC          e.g. configs/tpu_pod.py:v5p-64                            [run]
#   --workdir DIR          the workdir every host shares, e.g. /gcs/NAME/run         [run]
#   --config.FIELD=VALUE   config overrides, passed to the trainer as they are
#   -- ARGS                everything after -- is passed to the trainer too (e.g. --mode=rl)
#   --worker N             logs: which worker's log (0)
#   --delete-after         run/all: delete the TPU when the run ends, whatever its status
#   --dry-run              print every command, one per line and shell-quoted, instead of
#                          running it (a queued resource's status poll is printed once)
#
# Reaching several workers at once needs your key in an ssh agent: ssh-add
# ~/.ssh/google_compute_engine (gcloud creates it on the first ssh). Bad arguments exit 2 with one
# line naming the argument; otherwise the exit status is that of the failing gcloud command.
set -euo pipefail
# Runs on bash 3.2 too (macOS): hence ${a[@]+"${a[@]}"} for arrays that may be empty.

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

die() {
  echo "error: $*" >&2
  exit 2
}

# A word as the shell reads it: bare when it is plain, else single-quoted ('\'' for a quote).
quote() {
  local s=$1
  if [[ $s =~ ^[-A-Za-z0-9_./:=@%+,]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

quote_all() {
  local out="" arg
  for arg in "$@"; do
    out+="${out:+ }$(quote "$arg")"
  done
  printf '%s' "$out"
}

# Prints the command (--dry-run), or echoes it to stderr and runs it.
run() {
  if (( dry_run )); then
    quote_all "$@"
    echo
    return 0
  fi
  echo "+ $(quote_all "$@")" >&2
  "$@"
}

# Where the workers mount a bucket, and how many objects a directory rename may move there.
GCS_ROOT=/gcs RENAME_DIR_LIMIT=200000

# --bucket NAME[,NAME...]: adds each name once (gs://NAME and a trailing / are accepted too).
add_buckets() {
  local list=$1 b known
  [[ $list != ,* && $list != *, && $list != *,,* ]] ||
    die "--bucket: expected bucket names separated by commas, got '$list'"
  while [[ -n $list ]]; do
    b=${list%%,*}
    if [[ $list == *,* ]]; then list=${list#*,}; else list=""; fi
    b=${b#gs://}
    b=${b%/}
    [[ $b =~ ^[a-z0-9][-a-z0-9_.]{1,220}[a-z0-9]$ ]] ||
      die "--bucket: expected a bucket name such as my-bucket (lowercase letters, digits," \
        "- _ .), got '$b'"
    for known in ${buckets[@]+"${buckets[@]}"}; do
      [[ $known != "$b" ]] || continue 2
    done
    buckets+=("$b")
  done
}

# ------------------------------------------------------------------------------------ arguments
sub=${1:-}
case $sub in
  create|setup|run|logs|delete|all) shift ;;
  -h|--help|help) usage; exit 0 ;;
  "") die "SUBCOMMAND: expected one of create, setup, run, logs, delete, all (see --help)" ;;
  *) die "SUBCOMMAND: expected one of create, setup, run, logs, delete, all, got '$sub'" ;;
esac

name="" zone="" project="" accelerator="" version="" config="" workdir="" repo="" ref=""
remote_dir=openvlthinker python=python3.11 worker=0
queued=0 spot=0 dry_run=0 delete_after=0
trainer_args=() buckets=()
while (( $# )); do
  arg=$1
  shift
  case $arg in
    --config.*=*) trainer_args+=("$arg"); continue ;;
    --config.*) die "$arg: expected --config.FIELD=VALUE" ;;
    --) trainer_args+=("$@"); break ;;
    --queued) queued=1; continue ;;
    --spot) spot=1; continue ;;
    --dry-run) dry_run=1; continue ;;
    --delete-after) delete_after=1; continue ;;
    -h|--help) usage; exit 0 ;;
    --*=*) key=${arg%%=*} value=${arg#*=} ;;
    --*)
      key=$arg
      (( $# )) || die "$key: expected a value"
      value=$1
      shift
      ;;
    *) die "unexpected argument '$arg': options are --name=VALUE and so on (see --help)" ;;
  esac
  [[ -n $value ]] || die "$key: expected a value, got an empty one"
  case $key in
    --name) name=$value ;;
    --zone) zone=$value ;;
    --project) project=$value ;;
    --accelerator|--accelerator-type) accelerator=$value ;;
    --version|--runtime-version) version=$value ;;
    --config) config=$value ;;
    --workdir) workdir=$value ;;
    --repo) repo=$value ;;
    --ref) ref=$value ;;
    --remote-dir) remote_dir=${value#\~/} ;;
    --python) python=$value ;;
    --worker) worker=$value ;;
    --bucket) add_buckets "$value" ;;
    *) die "$key: unknown option (see --help)" ;;
  esac
done

[[ -n $name ]] || die "--name: expected the TPU's name"
[[ $name =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "--name: expected lowercase letters, digits and hyphens, starting with a letter, got '$name'"
[[ -n $zone ]] || die "--zone: expected a zone such as us-east5-a"
[[ $worker =~ ^[0-9]+$ ]] || die "--worker: expected a worker number such as 0, got '$worker'"
[[ -z $ref || -n $repo ]] || die "--ref: needs --repo (without it, this checkout is copied)"
[[ $python =~ ^python3(\.[0-9]+)?$ ]] ||
  die "--python: expected python3 or python3.N, got '$python'"
# A plain path: scp hands the destination to the remote shell unquoted.
[[ $remote_dir =~ ^[A-Za-z0-9_.][-A-Za-z0-9_./]*$ ]] ||
  die "--remote-dir: expected a path under home of letters, digits, _ . / -, got '$remote_dir'"
if [[ $sub == create || $sub == all ]]; then
  [[ -n $accelerator ]] || die "--accelerator: expected an accelerator type such as v5p-64"
  if [[ -z $version ]]; then
    case $accelerator in
      v5p-*) version=v2-alpha-tpuv5 ;;
      v5litepod-*|v5e-*) version=v2-alpha-tpuv5-lite ;;
      v6e-*) version=v2-alpha-tpuv6e ;;
      v4-*) version=tpu-ubuntu2204-base ;;
      *) die "--version: expected a runtime version (no default for accelerator '$accelerator')" ;;
    esac
  fi
fi
if (( ${#buckets[@]} )) && [[ $sub != setup && $sub != run && $sub != all ]]; then
  die "--bucket: only for setup, run and all, not $sub"
fi
# The trainer reads no URLs (every host must see the same files through the OS): gs://NAME/PATH
# is /gcs/NAME/PATH with --bucket=NAME. Fails here, in one line, rather than on every worker.
mount_hint() {
  local key=$1 url=$2 rest
  rest=${url#gs://}
  if [[ $url == gs://?* && $rest != *gs://* ]]; then
    die "$key: the trainer reads no URLs: mount the bucket with --bucket=${rest%%/*} and pass" \
      "$GCS_ROOT/$rest, got '$url'"
  fi
  die "$key: the trainer reads no URLs: mount each bucket with --bucket=NAME and pass paths" \
    "under $GCS_ROOT/NAME, got '$url'"
}
if [[ $sub == run || $sub == all ]]; then
  [[ -n $config ]] || die "--config: expected a config such as configs/tpu_pod.py:v5p-64"
  [[ -n $workdir ]] ||
    die "--workdir: expected a directory every host shares, such as $GCS_ROOT/BUCKET/run with" \
      "--bucket=BUCKET"
  [[ $workdir != *://* ]] || mount_hint --workdir "$workdir"
  for arg in ${trainer_args[@]+"${trainer_args[@]}"}; do
    if [[ $arg == --config.*=*gs://* ]]; then
      mount_hint "${arg%%=*}" "${arg#*=}"
    fi
  done
  if [[ $workdir == "$GCS_ROOT"/?* ]]; then
    bucket=${workdir#"$GCS_ROOT"/}
    bucket=${bucket%%/*}
    mounted=0
    for b in ${buckets[@]+"${buckets[@]}"}; do
      [[ $b != "$bucket" ]] || mounted=1
    done
    (( mounted )) || echo "warning: --workdir $workdir: without --bucket=$bucket, gs://$bucket" \
      "must already be mounted on every worker (a restarted worker has lost its mount)" >&2
  else
    echo "warning: --workdir $workdir is not under $GCS_ROOT: every host must see the same" \
      "workdir (a bucket mounted with --bucket=NAME at $GCS_ROOT/NAME)" >&2
  fi
fi
if (( delete_after )) && [[ $sub != run && $sub != all ]]; then
  die "--delete-after: only for run and all, not $sub"
fi

root=$(cd "$(dirname "$0")/.." && pwd)
gcloud=${GCLOUD:-gcloud}
where=(--zone="$zone")
[[ -z $project ]] || where+=(--project="$project")
jax_pin=$(sed -n 's/^jax==//p' "$root/constraints.txt")
[[ -n $jax_pin ]] || die "constraints.txt: expected a jax==VERSION pin"

# Runs a shell command on the workers (all, or the one named).
ssh_workers() {
  run "$gcloud" compute tpus tpu-vm ssh "$name" "${where[@]}" --worker="$1" --command="$2"
}

# ----------------------------------------------------------------------------------- subcommands
create() {
  local capacity=()
  (( ! spot )) || capacity=(--spot)
  if (( ! queued )); then
    run "$gcloud" compute tpus tpu-vm create "$name" "${where[@]}" \
      --accelerator-type="$accelerator" --version="$version" ${capacity[@]+"${capacity[@]}"}
    return
  fi
  run "$gcloud" compute tpus queued-resources create "$name" "${where[@]}" --node-id="$name" \
    --accelerator-type="$accelerator" --runtime-version="$version" ${capacity[@]+"${capacity[@]}"}
  local state=""
  while :; do
    state=$(run "$gcloud" compute tpus queued-resources describe "$name" "${where[@]}" \
      --format='value(state.state)')
    if (( dry_run )); then
      echo "$state"  # the poll's command line
      return
    fi
    case $state in
      ACTIVE) return ;;
      FAILED|SUSPENDED) echo "error: queued resource $name: $state" >&2; exit 1 ;;
    esac
    echo "queued resource $name: ${state:-unknown}; waiting" >&2
    sleep 30
  done
}

setup() {
  local dir install clone
  dir=$(quote "$remote_dir")
  if [[ -n $repo ]]; then
    # An existing clone is brought to REF too, so setup can be rerun to update the code.
    clone="{ test -d $dir/.git || git clone --quiet $(quote "$repo") $dir; }"
    clone+=" && git -C $dir fetch --quiet origin $(quote "${ref:-HEAD}")"
    clone+=" && git -C $dir checkout --quiet --force FETCH_HEAD"
    ssh_workers all "$clone"
  else
    # The package's files only (not .venv, runs/ or .git); scp needs the directory to exist.
    ssh_workers all "mkdir -p $dir"
    run "$gcloud" compute tpus tpu-vm scp --recurse "$root/setup.py" "$root/constraints.txt" \
      "$root/README.md" "$root/openvlthinker" "$root/configs" "$root/launch" \
      "$name:$remote_dir/" "${where[@]}" --worker=all
  fi
  install="cd $dir"
  install+=" && { command -v $python >/dev/null || { sudo apt-get update -qq"
  install+=" && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq"
  install+=" $python $python-venv; }; }"
  install+=" && { test -x .venv/bin/python || $python -m venv .venv; }"
  install+=" && .venv/bin/pip install --quiet --upgrade 'pip>=24'"
  install+=" && .venv/bin/pip install --quiet -c constraints.txt -e . $(quote "jax[tpu]==$jax_pin")"
  install+=" -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
  ssh_workers all "$install"
}

train() {
  local trainer remote
  trainer=$(quote_all .venv/bin/python -m openvlthinker.main --distributed "--config=$config" \
    "--workdir=$workdir" ${trainer_args[@]+"${trainer_args[@]}"})
  # Every worker runs the trainer and appends to its own log; worker 0 (numbered by the TPU
  # metadata server, as JAX does) also prints, which gcloud streams here.
  remote="cd $(quote "$remote_dir") && mkdir -p logs"
  local metadata=http://metadata.google.internal/computeMetadata/v1/instance/attributes
  remote+=" && w=\$(curl -sf -H Metadata-Flavor:Google $metadata/agent-worker-number || echo 0)"
  remote+=" && train() { JAX_COMPILATION_CACHE_DIR=\$HOME/.jax_cache $trainer ; }"
  remote+=" && if [ \"\$w\" = 0 ]; then set -o pipefail; train 2>&1 | tee -a logs/train.log;"
  remote+=" else train >> logs/train.log 2>&1; fi"
  ssh_workers all "$remote"
}

# Mounts each --bucket NAME at /gcs/NAME on every worker, installing gcsfuse first where it is
# missing (Google's apt repository for gcsfuse, as its install guide sets it up). A bucket already
# mounted there is left as it is, so setup and run can both do it. --implicit-dirs: directories
# that exist only as object-name prefixes (a bucket filled by `gcloud storage cp -r`) are seen.
# --rename-dir-limit: a flat bucket has no directories to rename, so gcsfuse refuses to rename a
# directory of more objects than this (0 by default) and otherwise copies and deletes each one;
# orbax commits a checkpoint step by renaming its temporary directory (see README).
mount_buckets() {
  local key=/usr/share/keyrings/cloud.google.asc b dir remote
  remote="{ command -v gcsfuse >/dev/null || { sudo curl -fsSL -o $key"
  remote+=" https://packages.cloud.google.com/apt/doc/apt-key.gpg"
  remote+=" && echo \"deb [signed-by=$key] https://packages.cloud.google.com/apt"
  remote+=" gcsfuse-\$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list"
  remote+=" >/dev/null && sudo apt-get update -qq"
  remote+=" && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcsfuse; }; }"
  for b in "${buckets[@]}"; do
    dir=$GCS_ROOT/$b
    remote+=" && { mountpoint -q $dir || { sudo mkdir -p $dir"
    remote+=" && sudo chown \"\$(id -u):\$(id -g)\" $dir"
    remote+=" && gcsfuse --implicit-dirs --rename-dir-limit=$RENAME_DIR_LIMIT $b $dir; }; }"
  done
  ssh_workers all "$remote"
}

logs() {
  ssh_workers "$worker" "tail -n 200 -F $(quote "$remote_dir/logs/train.log")"
}

delete() {
  if (( queued )); then
    run "$gcloud" compute tpus queued-resources delete "$name" "${where[@]}" --force --quiet
  else
    run "$gcloud" compute tpus tpu-vm delete "$name" "${where[@]}" --quiet
  fi
}

# --delete-after: delete on the way out, whatever ended the run (a failure, Ctrl-C), and keep the
# run's exit status.
delete_on_exit() {
  local status=$?
  trap - EXIT
  delete || echo "warning: deleting $name failed; retry: $0 delete --name=$name --zone=$zone" >&2
  exit "$status"
}

arm_delete() {
  if (( delete_after )); then
    trap delete_on_exit EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
  fi
}

mount_if_asked() {
  (( ! ${#buckets[@]} )) || mount_buckets
}

case $sub in
  create) create ;;
  setup) setup; mount_if_asked ;;
  run) arm_delete; mount_if_asked; train ;;
  logs) logs ;;
  delete) delete ;;
  all) create; arm_delete; setup; mount_if_asked; train ;;
esac
