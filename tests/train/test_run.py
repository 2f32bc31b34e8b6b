"""The trainer end to end through its entry point, on the test config.

- SIGKILL mid-RL, rerun the same command: every RL step after the resume has the metrics of an
  uninterrupted run (timings aside).
- A NaN injected into one optimizer step is skipped and counted; training goes on, finite.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMING_KEYS = ("_s", "tokens_per_s")


def command(workdir, *overrides):
  return [sys.executable, "-m", "openvlthinker.main", "--config=configs/test.py",
          f"--workdir={workdir}", "--config.sft.steps=2", "--config.eval.every=100", *overrides]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  # One persistent compilation cache for every run here: later processes reuse the executables.
  cache = str(tmp_path_factory.mktemp("jax_cache"))
  return dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")


def run(env, workdir, *overrides, timeout=600):
  proc = subprocess.run(command(workdir, *overrides), cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def records(workdir, stage):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [r for r in rows if r["stage"] == stage]


def deterministic(record):
  return {k: v for k, v in record.items() if not k.endswith(TIMING_KEYS)}


@pytest.mark.slow
def test_sigkill_mid_rl_then_rerun_matches_uninterrupted(tmp_path, env):
  steps = "--config.rl.steps=4"
  straight = str(tmp_path / "straight")
  run(env, straight, steps)
  killed = str(tmp_path / "killed")
  proc = subprocess.Popen(command(killed, steps), cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  target = os.path.join(killed, "rl", "checkpoints", "2")
  deadline = time.time() + 600
  while not os.path.isdir(target) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  assert proc.poll() is None, "the run finished before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert len(records(killed, "rl")) < 4
  run(env, killed, steps)
  want, got = records(straight, "rl"), records(killed, "rl")
  assert [r["step"] for r in got] == [1, 2, 3, 4]
  for a, b in zip(want, got):
    assert deterministic(a) == deterministic(b), a["step"]
  assert deterministic(records(straight, "eval")[-1]) == deterministic(records(killed, "eval")[-1])


@pytest.mark.slow
def test_nan_loss_step_is_skipped_and_counted(tmp_path, env):
  workdir = str(tmp_path / "nan")
  # Optimizer step 1 is the second minibatch update of RL step 1 (2 updates per rollout).
  # Shaping on, so the length reward and the entropy term run end to end too.
  run(env, workdir, "--config.rl.steps=2", "--config.debug.nan_loss_at_rl_step=1",
      "--config.rl.length.enabled=True", "--config.rl.entropy.enabled=True",
      "--config.rl.entropy.estimator=sampled_token")
  rl = records(workdir, "rl")
  assert all("entropy_loss" in r and any(k.startswith("length_reward/") for k in r) for r in rl)
  assert rl[0]["skipped_step"] == 1.0 and rl[1]["skipped_step"] == 0.0
  assert rl[-1]["skipped_steps_total"] == 1
  for r in rl:
    assert math.isfinite(r["param_norm"]) and r["param_norm"] > 0
  assert math.isfinite(rl[1]["policy_loss"])
