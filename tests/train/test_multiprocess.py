"""The trainer as a multi-host job: two real JAX processes × 4 fake CPU devices (gloo), each reading
its own data shard, against one process × 8 devices reading the same two shards (`data.shards=2`):
the same global batches, so the same run.

- The toy RL task (`test_toy_rl.py`: rewards that vary, so advantages that do; images) for 8
  steps, two processes with the packed update against one with the padded one: equal parameters
  and metrics. What this checks across processes: the sampler's global batch from each process's
  prompts, the per-row figures gathered for G²RPO's task-level stage and the metrics, minibatches
  of every shard's rows, each process packing its rows into its block of the micro-batches.

The entry point, started by `launch/local_multiprocess.sh` (each two-process run costs a whole
compile: XLA:CPU's persistent-cache key differs between the processes and only process 0 writes
the cache, so the scenarios share runs):

- A signal that reaches one process only (SIGTERM to process 1, as a TPU host's maintenance event
  does) stops both at the same step with a checkpoint; the same command resumes it in a fresh
  two-process job.
- SIGKILL of one process mid-RL: the launcher kills the other (it would wait forever in a
  collective) and fails; rerunning the command resumes both from the last complete checkpoint
  (orbax's temporary directories of a save cut short are never read).

It finishes with the one-process run's parameters (atol 1e-5) and its per-step metrics (the
rollout's rewards, lengths and entropies are computed from the same rows). RL moves the weights
(entropy shaping, whose bounds the tiny policy's entropy exceeds, and length shaping), so equal
parameters mean equal updates, not two idle runs.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = os.path.join(ROOT, "launch", "local_multiprocess.sh")
RL_STEPS = 5
ARGS = ("--config.sft.steps=2", f"--config.rl.steps={RL_STEPS}", "--config.eval.every=100",
        "--config.rl.entropy.enabled=True", "--config.rl.length.enabled=True",
        "--config.rl.learning_rate=1e-4")
TIMING_KEYS = ("_s", "tokens_per_s")


TOY = os.path.join(ROOT, "tests", "train", "toy_multiprocess.py")


def free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_processes(env, argv, processes, devices, timeout=600):
  """Runs `argv` as `processes` JAX processes of `devices` fake CPU devices each; asserts all
  exit 0."""
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  common = dict(env, XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count="
                                                 f"{devices}"]))
  if processes > 1:
    common.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}",
                  JAX_NUM_PROCESSES=str(processes))
  procs = [subprocess.Popen(argv, cwd=ROOT, env=dict(common, JAX_PROCESS_ID=str(i)), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(processes)]
  try:
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]


@pytest.mark.slow
def test_toy_rl_on_two_processes_packed_equals_one_process_padded(tmp_path, env):
  one, two = tmp_path / "one.npz", tmp_path / "two.npz"
  run_processes(env, [sys.executable, TOY, str(one), "padded"], processes=1, devices=8)
  run_processes(env, [sys.executable, TOY, str(two), "packed"], processes=2, devices=4)
  want, got = np.load(one), np.load(two)
  assert sorted(want) == sorted(got)
  # The compacting sampler on the global batch: groups finished early and left the live batch
  # (fewer row × step slots than every row decoding to the longest), the same rows either way.
  lengths = want["sample/lengths"]
  assert lengths.min() < 20 and lengths.max() == 40
  assert want["sample/decoded_row_steps"] < len(lengths) * 39
  for field in ("tokens", "lengths", "decoded_row_steps"):
    np.testing.assert_array_equal(got[f"sample/{field}"], want[f"sample/{field}"], err_msg=field)
  reward = want["metrics/reward/mean"]
  assert reward[-3:].mean() > reward[:3].mean() + 0.1, reward  # it learns: advantages moved it
  for name in want:
    if name.startswith("sample/"):
      continue
    if name.startswith("params/"):
      np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=0, err_msg=name)
    else:  # the update's sums (gradient norm, ratios) are reduced in another order on 2 × 4
      np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-6, err_msg=name)
  for field in ("logprobs", "entropies"):  # other compiled programs: the last bits may differ
    np.testing.assert_allclose(got[f"sample/{field}"], want[f"sample/{field}"], atol=1e-5,
                               err_msg=field)


@pytest.fixture(scope="module")
def env(cli_env):
  return dict(cli_env, PYTHON=sys.executable, DEVICES_PER_PROCESS="4")


def launch(env, workdir):
  return subprocess.Popen(["bash", LAUNCH, "2", "configs/test.py", str(workdir), *ARGS], cwd=ROOT,
                          env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc, timeout=600):
  out, err = proc.communicate(timeout=timeout)
  return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def trainer_pid(launcher: subprocess.Popen, process_id: int) -> int:
  """The pid of trainer process `process_id` among the launcher's children."""
  deadline = time.time() + 60
  while time.time() < deadline:
    children = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True,
                              text=True).stdout.split()
    for pid in children:
      try:
        with open(f"/proc/{pid}/environ", "rb") as f:
          environ = f.read().split(b"\0")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
          cmdline = f.read()
      except OSError:
        continue
      if b"openvlthinker.main" in cmdline and f"JAX_PROCESS_ID={process_id}".encode() in environ:
        return int(pid)
    time.sleep(0.1)
  raise AssertionError(f"no trainer process {process_id} under the launcher")


def signal_when(env, workdir, checkpoint: str, sig) -> subprocess.CompletedProcess:
  """Launches the 2-process run and sends `sig` to trainer process 1 alone once
  `workdir/checkpoint` exists; returns the finished launcher."""
  proc = launch(env, workdir)
  target = os.path.join(workdir, checkpoint)
  deadline = time.time() + 600
  while not os.path.isdir(target) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert proc.poll() is None, f"the run ended before {checkpoint} appeared: {finish(proc).stderr}"
  os.kill(trainer_pid(proc, 1), sig)
  return finish(proc)


def records(workdir, stage):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["stage"] == stage]


def steps_of(workdir, stage):
  path = os.path.join(workdir, stage, "checkpoints")
  return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


def load_state(workdir, stage, step):
  """{leaf name: numpy array} of a checkpoint, read with orbax on the host (no mesh)."""
  import jax
  import orbax.checkpoint as ocp
  from etils import epath
  path = epath.Path(workdir) / stage / "checkpoints" / str(step) / "state"
  handler = ocp.PyTreeCheckpointHandler()
  tree = handler.metadata(path).tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return handler.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def assert_same_run(got_dir, want_dir):
  """Equal per-step metrics (counts exactly; floats to 1e-5 relative: 2 × 4 devices compile other
  programs than 8, whose sums differ in the last bits) and parameters (atol 1e-5)."""
  for stage in ("sft", "rl"):
    got, want = records(got_dir, stage), records(want_dir, stage)
    assert [r["step"] for r in got] == [r["step"] for r in want], stage
    for a, b in zip(got, want):
      assert a.keys() == b.keys(), (stage, a["step"], set(a) ^ set(b))
      for key, value in b.items():
        if key.endswith(TIMING_KEYS):
          continue
        if isinstance(value, float):
          assert a[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (stage, a["step"], key)
        else:
          assert a[key] == value, (stage, a["step"], key)
  got, want = load_state(got_dir, "rl", RL_STEPS), load_state(want_dir, "rl", RL_STEPS)
  assert got.keys() == want.keys()
  for name in want:
    np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=0, err_msg=name)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, env):
  """The reference: one process × 8 devices reading the two data shards."""
  workdir = tmp_path_factory.mktemp("one_process")
  proc = subprocess.run([sys.executable, "-m", "openvlthinker.main", "--config=configs/test.py",
                         f"--workdir={workdir}", *ARGS, "--config.data.shards=2"], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  sft, rl = load_state(workdir, "sft", 2), load_state(workdir, "rl", RL_STEPS)
  moved = max(np.abs(rl[k] - sft[k]).max() for k in sft if k.startswith("params."))
  assert moved > 2e-4, f"RL left the weights where SFT did ({moved}): the comparison is idle"
  return workdir


@pytest.mark.slow
def test_stopped_killed_and_resumed_on_two_processes_equals_one(tmp_path, env, one_process):
  cut = tmp_path / "cut"
  # A SIGTERM to process 1 alone stops both at the same step, each saving its part.
  term = signal_when(env, cut, "rl/checkpoints/1", signal.SIGTERM)
  assert term.returncode == 0, term.stderr[-3000:]
  # Process 0 did not receive the signal: it stopped because process 1 did.
  assert "a signal to another process: saved the rl checkpoint" in term.stderr, term.stderr[-3000:]
  with open(os.path.join(cut, "logs", "process_1.log")) as f:
    assert "SIGTERM: saved the rl checkpoint" in f.read()
  stopped = steps_of(cut, "rl")[-1]
  assert 1 <= stopped < RL_STEPS - 1 and len(records(cut, "rl")) == stopped

  # The same command resumes; SIGKILL of process 1 fails the job (the launcher kills process 0).
  kill = signal_when(env, cut, f"rl/checkpoints/{stopped + 1}", signal.SIGKILL)
  assert kill.returncode != 0
  assert "process 1 exited with status 137" in kill.stderr, kill.stderr[-3000:]
  complete = steps_of(cut, "rl")
  assert stopped < complete[-1] < RL_STEPS
  # What a save cut short leaves: orbax's temporary directory of the next step, half written.
  partial = os.path.join(cut, "rl", "checkpoints",
                         f"{complete[-1] + 1}.orbax-checkpoint-tmp-1765000000", "state")
  os.makedirs(partial, exist_ok=True)
  with open(os.path.join(partial, "_METADATA"), "w") as f:
    f.write('{"tree_metadata": {"params.decoder')  # cut off mid-write

  rerun = finish(launch(env, cut))
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  # It went on from the newest complete step (saved steps are never redone or damaged).
  assert not any(".damaged" in d for d in os.listdir(os.path.join(cut, "rl", "checkpoints")))
  assert steps_of(cut, "rl")[-1] == RL_STEPS
  assert_same_run(cut, one_process)
