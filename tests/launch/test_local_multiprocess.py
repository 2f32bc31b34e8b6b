"""launch/local_multiprocess.sh with a fake trainer (PYTHON=a script that records its environment
and arguments): the environment contract with the trainer, the logs, a failing or killed process
stopping the others with its status, and SIGTERM / SIGINT passed to every process once."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "launch", "local_multiprocess.sh")

# Prints one JSON record of its environment and arguments (stdout), a line on stderr, marks itself
# ready, waits for the others to be ready, then does what FAKE_<id> says: `exit:N`, `kill:SIG`
# (die by a signal), `sleep:S`.
# SIGTERM and SIGINT are recorded in its log and end it with status 0, as the trainer's do.
FAKE = """#!{python}
import json, os, signal, sys, time
me = os.environ["JAX_PROCESS_ID"]
def say(fd, text):  # one write per line: lines of stdout and stderr stay whole in process 0's log
  os.write(fd, (text + "\\n").encode())
def stop(signum, frame):
  say(1, "signal " + signal.Signals(signum).name)
  sys.exit(0)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
keys = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_PLATFORMS",
        "XLA_FLAGS")
say(1, json.dumps({{"env": {{k: os.environ.get(k) for k in keys}}, "argv": sys.argv[1:],
                   "pid": os.getpid()}}))
say(2, "stderr of " + me)
ready = os.environ["READY_DIR"]
open(os.path.join(ready, me), "w").close()
action, _, value = os.environ.get("FAKE_" + me, "exit:0").partition(":")
deadline = time.monotonic() + 30
while len(os.listdir(ready)) < int(os.environ["JAX_NUM_PROCESSES"]) and time.monotonic() < deadline:
  time.sleep(0.02)  # fail only once every process is up, as a trainer would
if action == "sleep":
  time.sleep(float(value))
elif action == "kill":
  os.kill(os.getpid(), getattr(signal, value))
  time.sleep(5)
sys.exit(int(value) if action == "exit" else 0)
"""


@pytest.fixture
def fake(tmp_path):
  path = tmp_path / "fake_python"
  path.write_text(FAKE.format(python=sys.executable))
  path.chmod(0o755)
  ready = tmp_path / "ready"
  ready.mkdir()
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_", "FAKE_")) and k != "XLA_FLAGS"}  # each test sets its own
  env.update(PYTHON=str(path), READY_DIR=str(ready))
  return env


def start(env, n, workdir, *args, **extra):
  return subprocess.Popen(["bash", SCRIPT, str(n), "configs/test.py", str(workdir), *args],
                          cwd=ROOT, env=dict(env, **extra), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def records(text):
  return [json.loads(l) for l in text.splitlines() if l.startswith("{")]


def log(workdir, i):
  return (workdir / "logs" / f"process_{i}.log").read_text()


def test_environment_arguments_and_logs(fake, tmp_path):
  workdir = tmp_path / "mp"
  proc = start(fake, 3, workdir, "--mode=sft", "--config.data.path=a b's.jsonl",
               DEVICES_PER_PROCESS="2",
               XLA_FLAGS="--xla_cpu_a=1 --xla_force_host_platform_device_count=8 --xla_cpu_b=2")
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 0, err
  first = out.splitlines()[0]
  port = re.search(r"127\.0\.0\.1:(\d+)", first).group(1)
  assert "3 processes" in first and "2 devices" in first and str(workdir / "logs") in first
  seen = {}
  for i in range(3):
    (record,) = records(log(workdir, i))
    seen[i] = record
    assert record["env"] == {
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "3",
        "JAX_PROCESS_ID": str(i), "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_cpu_a=1 --xla_cpu_b=2 --xla_force_host_platform_device_count=2"}
    assert record["argv"] == ["-m", "openvlthinker.main", "--distributed",
                              "--config=configs/test.py", f"--workdir={workdir}", "--mode=sft",
                              "--config.data.path=a b's.jsonl"]
    assert f"stderr of {i}" in log(workdir, i)
  # Process 0 alone reaches the terminal, its stdout and stderr kept apart.
  assert records(out) == [seen[0]]
  assert "stderr of 0" in err and "stderr of 1" not in err and "stderr of 1" not in out


def test_platform_kept_when_set(fake, tmp_path):
  proc = start(fake, 1, tmp_path, JAX_PLATFORMS="tpu")
  proc.communicate(timeout=60)
  assert records(log(tmp_path, 0))[0]["env"]["JAX_PLATFORMS"] == "tpu"
  assert records(log(tmp_path, 0))[0]["env"]["XLA_FLAGS"] == (
      "--xla_force_host_platform_device_count=4")


def _gone(pid):
  for _ in range(100):
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return True
    time.sleep(0.05)
  return False


@pytest.mark.parametrize("action, status", [("exit:3", 3), ("kill:SIGKILL", 128 + 9)])
def test_a_failing_process_stops_the_others_with_its_status(fake, tmp_path, action, status):
  began = time.monotonic()
  proc = start(fake, 3, tmp_path, FAKE_0="sleep:60", FAKE_1=action, FAKE_2="sleep:60")
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == status, err
  assert time.monotonic() - began < 30  # not the survivors' 60 s
  assert f"process 1 exited with status {status}" in err
  for i in (0, 2):
    assert _gone(records(log(tmp_path, i))[0]["pid"])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_is_passed_to_every_process_once(fake, tmp_path, signum):
  proc = start(fake, 3, tmp_path, FAKE_0="sleep:60", FAKE_1="sleep:60", FAKE_2="sleep:60")
  ready = tmp_path / "ready"
  deadline = time.monotonic() + 30
  while len(os.listdir(ready)) < 3 and time.monotonic() < deadline:
    time.sleep(0.05)
  proc.send_signal(signum)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 0, err
  for i in range(3):
    assert log(tmp_path, i).count("signal ") == 1
    assert f"signal {signum.name}" in log(tmp_path, i)


@pytest.mark.parametrize("args, env, named", [
    (["0", "configs/test.py", "/tmp/x"], {}, "N"),
    (["two", "configs/test.py", "/tmp/x"], {}, "N"),
    (["2", "configs/nope.py:arg", "/tmp/x"], {}, "CONFIG"),
    (["2", "configs/test.py", "/tmp/x"], {"DEVICES_PER_PROCESS": "0"}, "DEVICES_PER_PROCESS"),
])
def test_bad_arguments(fake, args, env, named):
  proc = subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, env=dict(fake, **env),
                        capture_output=True, text=True, timeout=30)
  assert proc.returncode == 2
  assert proc.stderr.startswith(f"error: {named}:") and proc.stderr.count("\n") == 1


def test_usage():
  proc = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, timeout=30)
  assert proc.returncode == 2 and proc.stderr.startswith("usage:")
  proc = subprocess.run(["bash", SCRIPT, "--help"], capture_output=True, text=True, timeout=30)
  assert proc.returncode == 0 and "JAX_COORDINATOR_ADDRESS" in proc.stdout
