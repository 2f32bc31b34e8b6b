"""launch/tpu_pod.sh: the gcloud commands each subcommand runs (from --dry-run, parsed back with
shlex as a shell would), the remote run command executed by bash on fake workers, exit statuses
and --delete-after against a fake gcloud, and one-line errors for bad arguments."""
import json
import os
import re
import shlex
import subprocess
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "launch", "tpu_pod.sh")
WHERE = ["--name=my-tpu", "--zone=us-east5-a"]
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone=us-east5-a"]
# An override a naive "$*" would split and an unquoted remote command would break.
NASTY = """--config.data.path=/gcs/b/it's a "data" file; $(rm -rf x) `y`.jsonl"""


# A `gcloud` first on PATH that fails loudly: no test may reach the real one.
_STUB_DIR = tempfile.mkdtemp(prefix="no_gcloud_")
with open(os.path.join(_STUB_DIR, "gcloud"), "w") as _f:
  _f.write("#!/bin/sh\necho 'the real gcloud was called' >&2\nexit 99\n")
os.chmod(os.path.join(_STUB_DIR, "gcloud"), 0o755)


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if k != "GCLOUD"}
  env["PATH"] = _STUB_DIR + os.pathsep + env["PATH"]
  env.update(extra)
  return env


def tpu_pod(*args, **env):
  return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=60,
                        env=_env(**env))


def dry(*args) -> list[list[str]]:
  """The commands --dry-run prints, each parsed back into argv as a shell would."""
  proc = tpu_pod(args[0], "--dry-run", *args[1:])  # before any `--`
  assert proc.returncode == 0, proc.stderr
  return [shlex.split(line) for line in proc.stdout.splitlines()]


def remote(command: list[str]) -> str:
  """The --command=... of a gcloud ssh argv."""
  (arg,) = [a for a in command if a.startswith("--command=")]
  return arg[len("--command="):]


def jax_pin() -> str:
  with open(os.path.join(ROOT, "constraints.txt")) as f:
    return re.search(r"^jax==(\S+)$", f.read(), re.M).group(1)


def test_create_tpu_vm_with_runtime_from_accelerator():
  assert dry("create", *WHERE, "--accelerator=v5p-64") == [
      ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu", "--zone=us-east5-a",
       "--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5"]]
  assert dry("create", *WHERE, "--project", "proj", "--accelerator", "v6e-32",
             "--version=v2-alpha-tpuv6e", "--spot") == [
      ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu", "--zone=us-east5-a",
       "--project=proj", "--accelerator-type=v6e-32", "--version=v2-alpha-tpuv6e", "--spot"]]


def test_create_queued_resource_then_polls_its_state():
  create, poll = dry("create", *WHERE, "--accelerator=v4-32", "--queued")
  assert create == ["gcloud", "compute", "tpus", "queued-resources", "create", "my-tpu",
                    "--zone=us-east5-a", "--node-id=my-tpu", "--accelerator-type=v4-32",
                    "--runtime-version=tpu-ubuntu2204-base"]
  assert poll == ["gcloud", "compute", "tpus", "queued-resources", "describe", "my-tpu",
                  "--zone=us-east5-a", "--format=value(state.state)"]


def test_setup_copies_the_checkout_and_installs_the_pinned_jax_tpu():
  mkdir, scp, install = dry("setup", *WHERE)
  assert mkdir == SSH + ["--worker=all", "--command=mkdir -p openvlthinker"]
  assert scp[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse"]
  assert scp[-3:] == ["my-tpu:openvlthinker/", "--zone=us-east5-a", "--worker=all"]
  sources = scp[6:-3]
  assert {os.path.join(ROOT, p) for p in ("setup.py", "constraints.txt", "openvlthinker",
                                          "configs")} <= set(sources)
  assert not any(s.endswith((".venv", ".git", "runs")) for s in sources)
  assert install[:-1] == SSH + ["--worker=all"]
  words = shlex.split(remote(install))
  assert words[:2] == ["cd", "openvlthinker"]
  pip = words.index("-c") - 3
  assert words[pip:pip + 10] == [
      ".venv/bin/pip", "install", "--quiet", "-c", "constraints.txt", "-e", ".",
      f"jax[tpu]=={jax_pin()}", "-f",
      "https://storage.googleapis.com/jax-releases/libtpu_releases.html"]
  assert "python3.11 -m venv .venv" in remote(install)


def test_setup_clones_a_repo_at_a_ref():
  clone, install = dry("setup", *WHERE, "--repo=https://github.com/o/r.git", "--ref=v1.2",
                       "--remote-dir=~/code/ovt")
  assert clone[:-1] == SSH + ["--worker=all"]
  words = shlex.split(remote(clone))
  assert "git clone --quiet https://github.com/o/r.git code/ovt" in remote(clone)
  assert words[words.index("fetch"):words.index("fetch") + 4] == ["fetch", "--quiet", "origin",
                                                                  "v1.2"]
  assert words[-4:] == ["checkout", "--quiet", "--force", "FETCH_HEAD"]
  assert shlex.split(remote(install))[:2] == ["cd", "code/ovt"]


def test_run_starts_the_distributed_trainer_on_every_worker_with_overrides_intact():
  (run,) = dry("run", *WHERE, "--config=configs/tpu_pod.py:v5p-64", "--workdir=/gcs/b/run",
               "--config.rl.advantage=grpo", NASTY, "--", "--mode=rl")
  assert run[:-1] == SSH + ["--worker=all"]
  words = shlex.split(remote(run))
  start = words.index(".venv/bin/python")
  assert words[start:start + 9] == [
      ".venv/bin/python", "-m", "openvlthinker.main", "--distributed",
      "--config=configs/tpu_pod.py:v5p-64", "--workdir=/gcs/b/run", "--config.rl.advantage=grpo",
      NASTY, "--mode=rl"]


@pytest.mark.parametrize("worker", [0, 1])
def test_the_remote_run_command_under_bash(tmp_path, worker):
  """The remote command as a worker's shell runs it: the trainer gets exactly the arguments
  given; every worker appends to its log, worker 0 (from the metadata server) also prints; the
  trainer's exit status comes back."""
  (run,) = dry("run", *WHERE, "--config=configs/test.py", "--workdir=/gcs/b/run", NASTY)
  home, bin_dir = tmp_path / "home", tmp_path / "bin"
  venv = home / "openvlthinker" / ".venv" / "bin"
  venv.mkdir(parents=True)
  bin_dir.mkdir()
  (bin_dir / "curl").write_text(f"#!/bin/sh\necho {worker}\n")
  (venv / "python").write_text("#!/usr/bin/env python3\nimport json, sys\n"
                               "print(json.dumps(sys.argv[1:]))\nsys.exit(5)\n")
  for f in (bin_dir / "curl", venv / "python"):
    f.chmod(0o755)
  proc = subprocess.run(["bash", "-c", remote(run)], cwd=home, capture_output=True, text=True,
                        timeout=60, env=dict(os.environ, HOME=str(home),
                                             PATH=f"{bin_dir}:{os.environ['PATH']}"))
  assert proc.returncode == 5, proc.stderr
  log = (home / "openvlthinker" / "logs" / "train.log").read_text()
  assert json.loads(log) == ["-m", "openvlthinker.main", "--distributed",
                             "--config=configs/test.py", "--workdir=/gcs/b/run", NASTY]
  assert proc.stdout == (log if worker == 0 else "")


def test_logs_and_delete():
  assert dry("logs", *WHERE, "--worker=3") == [
      SSH + ["--worker=3", "--command=tail -n 200 -F openvlthinker/logs/train.log"]]
  assert dry("delete", *WHERE) == [
      ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu", "--zone=us-east5-a", "--quiet"]]
  assert dry("delete", *WHERE, "--queued") == [
      ["gcloud", "compute", "tpus", "queued-resources", "delete", "my-tpu", "--zone=us-east5-a",
       "--force", "--quiet"]]


def test_all_runs_every_step_in_order():
  commands = dry("all", *WHERE, "--accelerator=v5p-8", "--config=configs/tpu_pod.py",
                 "--workdir=/gcs/b/run", "--delete-after")
  steps = [" ".join(c[3:5]) + (" " + remote(c).split()[0] if c[4] == "ssh" else "")
           for c in commands]
  assert steps == ["tpu-vm create", "tpu-vm ssh mkdir", "tpu-vm scp", "tpu-vm ssh cd",
                   "tpu-vm ssh cd", "tpu-vm delete"]
  assert "--distributed" in shlex.split(remote(commands[4]))
  # With --bucket, setup mounts it once, before the run.
  commands = dry("all", *WHERE, "--accelerator=v5p-8", "--config=configs/tpu_pod.py",
                 "--bucket=my-bucket", "--workdir=/gcs/my-bucket/run")
  mounts = [i for i, c in enumerate(commands) if c[4] == "ssh" and "gcsfuse" in remote(c)]
  assert mounts == [4] and "--distributed" in remote(commands[5]) and len(commands) == 6


# ------------------------------------------------------------------------- --bucket: gcsfuse
GCSFUSE_APT = ('echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] '
               'https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main" '
               '| sudo tee /etc/apt/sources.list.d/gcsfuse.list')


def mount_line(bucket: str) -> str:
  return (f"{{ mountpoint -q /gcs/{bucket} || {{ sudo mkdir -p /gcs/{bucket}"
          f' && sudo chown "$(id -u):$(id -g)" /gcs/{bucket}'
          f" && gcsfuse --implicit-dirs --rename-dir-limit=200000 {bucket} /gcs/{bucket}; }}; }}")


def test_setup_with_buckets_installs_gcsfuse_and_mounts_each_bucket_after_the_install():
  *_, install, mount = dry("setup", *WHERE, "--bucket=my-bucket,data.bucket_2",
                           "--bucket", "gs://my-bucket/")  # a repeat is mounted once
  assert "pip" in remote(install)
  assert mount[:-1] == SSH + ["--worker=all"]
  script = remote(mount)
  # Google's apt repository for gcsfuse, installed only where gcsfuse is missing.
  assert script.startswith("{ command -v gcsfuse >/dev/null || { sudo curl -fsSL -o "
                           "/usr/share/keyrings/cloud.google.asc "
                           "https://packages.cloud.google.com/apt/doc/apt-key.gpg && ")
  assert GCSFUSE_APT in script
  assert "sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y " \
         "-qq gcsfuse; }; }" in script
  assert script.endswith(f" && {mount_line('my-bucket')} && {mount_line('data.bucket_2')}")
  assert script.count("gcsfuse --implicit-dirs") == 2
  # Without --bucket, setup mounts nothing.
  assert not any("gcsfuse" in remote(c) for c in dry("setup", *WHERE) if "ssh" in c)


def test_run_with_a_bucket_mounts_it_before_the_trainer_starts():
  mount, run = dry("run", *WHERE, "--bucket=my-bucket", "--config=configs/tpu_pod.py:v5p-64",
                   "--workdir=/gcs/my-bucket/run", "--config.data.path=/gcs/my-bucket/d.jsonl")
  assert mount[:-1] == run[:-1] == SSH + ["--worker=all"]
  assert remote(mount).endswith(f" && {mount_line('my-bucket')}")
  assert "--workdir=/gcs/my-bucket/run" in shlex.split(remote(run))
  (run,) = dry("run", *WHERE, "--config=c.py", "--workdir=/gcs/my-bucket/run")
  assert "gcsfuse" not in remote(run)


def test_gs_urls_for_the_trainer_fail_with_the_mounted_path_to_use_instead():
  proc = tpu_pod("run", "--dry-run", *WHERE, "--config=c.py", "--workdir=gs://my-bucket/x/run")
  assert proc.returncode == 2 and proc.stdout == ""
  assert proc.stderr == ("error: --workdir: the trainer reads no URLs: mount the bucket with "
                         "--bucket=my-bucket and pass /gcs/my-bucket/x/run, got "
                         "'gs://my-bucket/x/run'\n")
  proc = tpu_pod("run", "--dry-run", *WHERE, "--config=c.py", "--bucket=b12",
                 "--workdir=/gcs/b12/run", "--config.data.image_root=gs://b12/images")
  assert proc.returncode == 2
  assert proc.stderr.startswith("error: --config.data.image_root: the trainer reads no URLs: "
                                "mount the bucket with --bucket=b12 and pass /gcs/b12/images")


def test_a_workdir_outside_the_mounted_buckets_warns():
  proc = tpu_pod("run", "--dry-run", *WHERE, "--config=c.py", "--workdir=/gcs/other/run",
                 "--bucket=my-bucket")
  assert proc.returncode == 0
  assert proc.stderr.startswith("warning: --workdir /gcs/other/run: without --bucket=other")
  proc = tpu_pod("run", "--dry-run", *WHERE, "--config=c.py", "--workdir=runs/x")
  assert proc.returncode == 0 and "not under /gcs" in proc.stderr
  proc = tpu_pod("run", "--dry-run", *WHERE, "--config=c.py", "--workdir=/gcs/b12/run",
                 "--bucket=b12")
  assert proc.returncode == 0 and proc.stderr == ""


def _fake_worker(tmp_path, mounted=(), installed=False):
  """A worker's commands for the mount script: `sudo` records what it would run (and runs only
  apt-get, itself a fake, and tee, which keeps what it is given); `mountpoint -q DIR` answers from
  a list of mounted directories that the fake `gcsfuse BUCKET DIR` adds to; `apt-get install`
  puts the fake gcsfuse on PATH."""
  bin_dir, log, table = tmp_path / "bin", tmp_path / "log", tmp_path / "mounted"
  bin_dir.mkdir(parents=True)
  table.write_text("".join(f"{d}\n" for d in mounted))
  gcsfuse = f'#!/bin/sh\necho "gcsfuse $*" >> {log}\n' + \
      f'[ "$4" != /gcs/fail ] || exit 3\necho "$4" >> {table}\n'
  scripts = {
      "sudo": f"""#!/bin/bash
echo "sudo $*" >> {log}
while [[ $1 == *=* ]]; do shift; done
case $1 in
  tee) cat >> {log} ;;
  apt-get) exec "$@" ;;
esac
""",
      "apt-get": f"""#!/bin/sh
echo "apt-get $*" >> {log}
case "$*" in *install*gcsfuse*) printf '%s' '{gcsfuse}' > {bin_dir}/gcsfuse; \
chmod +x {bin_dir}/gcsfuse ;; esac
""",
      "mountpoint": f'#!/bin/sh\n[ "$1" = -q ] && grep -qx "$2" {table}\n',
      "lsb_release": "#!/bin/sh\necho jammy\n",
  }
  if installed:
    scripts["gcsfuse"] = gcsfuse
  for name, text in scripts.items():
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  return bin_dir, log, table


def _run_mount_script(tmp_path, buckets, **worker):
  mount = dry("setup", *WHERE, f"--bucket={buckets}")[-1]  # after the install
  bin_dir, log, table = _fake_worker(tmp_path, **worker)
  env = dict(os.environ, PATH=f"{bin_dir}:/usr/bin:/bin")
  proc = subprocess.run(["bash", "-c", remote(mount)], cwd=tmp_path, capture_output=True,
                        text=True, timeout=60, env=env)
  lines = log.read_text().splitlines() if log.exists() else []
  return proc, lines, table.read_text().split()


def test_the_mount_script_installs_gcsfuse_then_mounts_each_bucket(tmp_path):
  proc, log, mounted = _run_mount_script(tmp_path, "bkt-a,bkt-b")
  assert proc.returncode == 0, proc.stderr
  uid = f"{os.getuid()}:{os.getgid()}"
  assert log == [
      "sudo curl -fsSL -o /usr/share/keyrings/cloud.google.asc "
      "https://packages.cloud.google.com/apt/doc/apt-key.gpg",
      "sudo tee /etc/apt/sources.list.d/gcsfuse.list",
      "deb [signed-by=/usr/share/keyrings/cloud.google.asc] "
      "https://packages.cloud.google.com/apt gcsfuse-jammy main",
      "sudo apt-get update -qq", "apt-get update -qq",
      "sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcsfuse",
      "apt-get install -y -qq gcsfuse",
      "sudo mkdir -p /gcs/bkt-a", f"sudo chown {uid} /gcs/bkt-a",
      "gcsfuse --implicit-dirs --rename-dir-limit=200000 bkt-a /gcs/bkt-a",
      "sudo mkdir -p /gcs/bkt-b", f"sudo chown {uid} /gcs/bkt-b",
      "gcsfuse --implicit-dirs --rename-dir-limit=200000 bkt-b /gcs/bkt-b"]
  assert mounted == ["/gcs/bkt-a", "/gcs/bkt-b"]


def test_the_mount_script_skips_what_is_already_there(tmp_path):
  """Installed and mounted: nothing runs. A restarted worker (installed, its mounts gone but one):
  only the missing mount is made."""
  proc, log, _ = _run_mount_script(tmp_path / "a", "bkt-a,bkt-b", installed=True,
                                   mounted=["/gcs/bkt-a", "/gcs/bkt-b"])
  assert proc.returncode == 0 and log == [], (proc.stderr, log)
  proc, log, mounted = _run_mount_script(tmp_path / "b", "bkt-a,bkt-b", installed=True,
                                         mounted=["/gcs/bkt-b"])
  assert proc.returncode == 0, proc.stderr
  assert [l for l in log if not l.startswith("sudo")] == [
      "gcsfuse --implicit-dirs --rename-dir-limit=200000 bkt-a /gcs/bkt-a"]
  assert sorted(mounted) == ["/gcs/bkt-a", "/gcs/bkt-b"]


def test_a_failed_mount_fails_the_script(tmp_path):
  proc, log, _ = _run_mount_script(tmp_path, "fail,bkt-b", installed=True)
  assert proc.returncode == 3
  assert not any("bkt-b" in l for l in log)


def _fake_gcloud(tmp_path, fail_on: str = ""):
  log = tmp_path / "gcloud.jsonl"
  fake = tmp_path / "gcloud"
  fake.write_text(f"""#!/usr/bin/env python3
import json, sys
with open({str(log)!r}, "a") as f:
  f.write(json.dumps(sys.argv[1:]) + "\\n")
if "describe" in sys.argv:
  print("ACTIVE")
if {fail_on!r} and any({fail_on!r} in a for a in sys.argv):
  sys.exit(7)
""")
  fake.chmod(0o755)
  return str(fake), log


def test_all_delete_after_deletes_when_the_run_fails_and_keeps_its_status(tmp_path):
  fake, log = _fake_gcloud(tmp_path, fail_on="--distributed")
  proc = tpu_pod("all", *WHERE, "--accelerator=v5p-8", "--queued", "--config=configs/test.py",
                 "--workdir=/gcs/b/run", "--delete-after", GCLOUD=fake)
  assert proc.returncode == 7, proc.stderr
  calls = [json.loads(l) for l in log.read_text().splitlines()]
  assert [c[2:4] for c in calls] == [["queued-resources", "create"],
                                     ["queued-resources", "describe"], ["tpu-vm", "ssh"],
                                     ["tpu-vm", "scp"], ["tpu-vm", "ssh"], ["tpu-vm", "ssh"],
                                     ["queued-resources", "delete"]]
  # What ran is what --dry-run printed (with the fake's path for gcloud).
  assert [[fake] + c for c in calls] == [
      [fake] + c[1:] for c in dry("all", *WHERE, "--accelerator=v5p-8", "--queued",
                                  "--config=configs/test.py", "--workdir=/gcs/b/run",
                                  "--delete-after")]


def test_a_failed_create_deletes_nothing(tmp_path):
  fake, log = _fake_gcloud(tmp_path, fail_on="create")
  proc = tpu_pod("all", *WHERE, "--accelerator=v5p-8", "--config=configs/test.py",
                 "--workdir=/gcs/b/run", "--delete-after", GCLOUD=fake)
  assert proc.returncode == 7
  assert [json.loads(l)[3] for l in log.read_text().splitlines()] == ["create"]


@pytest.mark.parametrize("args, named", [
    ([], "SUBCOMMAND"),
    (["launch", *WHERE], "SUBCOMMAND"),
    (["run", "--zone=z"], "--name"),
    (["run", "--name=my-tpu"], "--zone"),
    (["create", "--name=My_TPU", "--zone=z"], "--name"),
    (["create", *WHERE], "--accelerator"),
    (["create", *WHERE, "--accelerator=v9-8"], "--version"),
    (["run", *WHERE, "--workdir=/gcs/b"], "--config"),
    (["run", *WHERE, "--config=c.py"], "--workdir"),
    (["logs", *WHERE, "--zonee=x"], "--zonee"),
    (["logs", *WHERE, "--worker=first"], "--worker"),
    (["logs", *WHERE, "--zone"], "--zone"),
    (["logs", *WHERE, "--zone="], "--zone"),
    (["setup", *WHERE, "--ref=v1"], "--ref"),
    (["setup", *WHERE, "--python=python2"], "--python"),
    (["setup", *WHERE, "--remote-dir=my dir"], "--remote-dir"),
    (["create", *WHERE, "--accelerator=v5p-8", "--delete-after"], "--delete-after"),
    (["run", *WHERE, "--config=c.py", "--workdir=/gcs/b", "--config.rl.steps"],
     "--config.rl.steps"),
    (["run", *WHERE, "stray"], "stray"),
    (["setup", *WHERE, "--bucket=My_Bucket"], "--bucket"),
    (["setup", *WHERE, "--bucket=ok-bucket,"], "--bucket"),
    (["logs", *WHERE, "--bucket=my-bucket"], "--bucket"),
    (["run", *WHERE, "--config=c.py", "--workdir=s3://b/run"], "--workdir"),
])
def test_bad_arguments_give_one_line_naming_them_and_exit_2(args, named):
  proc = tpu_pod(*args[:1], "--dry-run", *args[1:])
  assert proc.returncode == 2
  assert proc.stdout == ""
  lines = proc.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], proc.stderr


def test_help():
  proc = tpu_pod("--help")
  assert proc.returncode == 0
  assert "Subcommands:" in proc.stdout and "--dry-run" in proc.stdout
