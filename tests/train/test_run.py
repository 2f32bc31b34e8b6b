"""The trainer end to end through its entry point, on the 8 fake devices the suite uses, with the
default mesh (fsdp over all 8) and with fsdp=4 × tensor=2 (there with the layer scan and the
packed update, as the pod presets run).

- Interrupted as a pod (or a user) would: SIGTERM mid-SFT (saves, exits 0), rerun; SIGKILL
  mid-SFT, rerun (its stale workdir lock taken over); Ctrl-C (SIGINT) mid-RL, rerun (on the
  second mesh: SIGKILL mid-RL, rerun, instead; on the default mesh that one runs as two
  processes, `test_multiprocess.py`). Every step's metrics (SFT, RL,
  evaluations) equal an uninterrupted run's (timings aside), and the checkpoints it wrote restore
  onto the mesh with the rule table's shardings.
- On the default mesh: `--mode=eval` afterwards scores the RL checkpoint (its parameter norm is
  the RL state's), and a new run started from its SFT checkpoint (`model.init`) evaluates those
  weights as the run did.
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
# The second also runs the decoder's layer scan and the packed update (the pod layout; the test
# config loops over layers and pads).
MESHES = {"fsdp8": (), "fsdp4_tensor2": ("--config.mesh.fsdp=4", "--config.mesh.tensor=2",
                                         "--config.model.scan_layers=True",
                                         "--config.rl.packing.enabled=True")}
STEPS = ("--config.sft.steps=4", "--config.rl.steps=4", "--config.eval.every=100")


def command(workdir, *overrides):
  return [sys.executable, "-m", "openvlthinker.main", "--config=configs/test.py",
          f"--workdir={workdir}", *STEPS, *overrides]


@pytest.fixture(scope="module")
def env(cli_env):
  assert "device_count=8" in cli_env["XLA_FLAGS"]
  return cli_env  # one compilation cache for every CLI run of the suite


def run(env, workdir, *overrides, timeout=600):
  proc = subprocess.run(command(workdir, *overrides), cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def interrupt_when(env, workdir, overrides, checkpoint: str, sig) -> subprocess.CompletedProcess:
  """Starts the run, sends `sig` once `workdir/checkpoint` exists, returns the finished process."""
  target = os.path.join(workdir, checkpoint)
  # A checkpoint of an earlier run would send the signal before this run even holds the lock.
  assert not os.path.isdir(target), f"{checkpoint} exists before the run starts"
  proc = subprocess.Popen(command(workdir, *overrides), cwd=ROOT, env=env, text=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 600
  while not os.path.isdir(target) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.1)
  assert proc.poll() is None, f"the run ended before {checkpoint} appeared: {proc.stderr.read()}"
  proc.send_signal(sig)
  _, stderr = proc.communicate(timeout=600)
  return subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr)


def records(workdir, stage):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [r for r in rows if r["stage"] == stage]


def deterministic(record):
  return {k: v for k, v in record.items() if not k.endswith(TIMING_KEYS)}


def steps_of(workdir, stage):
  path = os.path.join(workdir, stage, "checkpoints")
  return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


@pytest.mark.slow
@pytest.mark.parametrize("mesh", list(MESHES))
def test_preempted_and_killed_run_matches_uninterrupted(tmp_path, env, mesh):
  overrides = MESHES[mesh]
  straight = str(tmp_path / "straight")
  run(env, straight, *overrides)
  cut = str(tmp_path / "cut")
  # Every kind of interruption on the default mesh; on the other, the one that loses the most
  # (SIGKILL mid-RL: it resumes from a checkpoint written on that mesh).
  full = mesh == "fsdp8"
  if full:
    term = interrupt_when(env, cut, overrides, "sft/checkpoints/1", signal.SIGTERM)
    assert term.returncode == 0 and "SIGTERM: saved the sft checkpoint" in term.stderr, \
        term.stderr
    assert 1 <= max(steps_of(cut, "sft")) < 4 and not steps_of(cut, "rl")
    # The next checkpoint: the SIGTERM run may have reached step 3 before it stopped.
    kill = interrupt_when(env, cut, overrides, f"sft/checkpoints/{max(steps_of(cut, 'sft')) + 1}",
                          signal.SIGKILL)
    assert kill.returncode == -signal.SIGKILL and not steps_of(cut, "rl")
    # Ctrl-C saves too. The SIGKILL left the workdir lock behind: it is taken over.
    sigint = interrupt_when(env, cut, overrides, "rl/checkpoints/1", signal.SIGINT)
    assert sigint.returncode == 0, sigint.stderr
    assert "SIGINT: saved the rl checkpoint" in sigint.stderr, sigint.stderr
    assert "taking over the lock of pid" in sigint.stderr
    assert max(steps_of(cut, "rl")) < 4
  else:  # SIGKILL mid-RL on the default mesh: tests/train/test_multiprocess.py (two processes)
    kill = interrupt_when(env, cut, overrides, "rl/checkpoints/3", signal.SIGKILL)
    assert kill.returncode == -signal.SIGKILL
    assert len(records(cut, "rl")) < 4
  run(env, cut, *overrides)

  for stage, n in (("sft", 4), ("rl", 4), ("eval", 2)):
    want, got = records(straight, stage), records(cut, stage)
    assert len(got) == n and [r["step"] for r in got] == [r["step"] for r in want], stage
    for a, b in zip(want, got):
      assert deterministic(a) == deterministic(b), (stage, a["step"])
  with open(os.path.join(cut, "eval_table.md")) as f, \
       open(os.path.join(straight, "eval_table.md")) as g:
    assert f.read() == g.read()
  rl_param_norm = check_checkpoint_shardings(cut, overrides)
  if not full:
    return

  # `--mode=eval` after RL scores the RL checkpoint: its parameters and its after-RL evaluation.
  proc = run(env, cut, *overrides, "--mode=eval")
  assert f"eval: scoring rl step 4 ({os.path.join(cut, 'rl', 'checkpoints', '4')})" in proc.stdout
  with open(os.path.join(cut, "eval", "rl_4.json")) as f, \
       open(os.path.join(cut, "eval_summary.json")) as g:
    evaluated, summary = json.load(f), json.load(g)
  assert evaluated["weights"]["param_norm"] == pytest.approx(rl_param_norm, rel=1e-6)
  assert evaluated["results"]["overall"] == summary["after_rl"]["overall"]

  # Another run starting from this one's SFT weights (`model.init`) evaluates them as they are.
  init = str(tmp_path / "init")
  run(env, init, *overrides, "--mode=rl", "--config.rl.steps=1",
      f"--config.model.init={os.path.join(cut, 'sft', 'checkpoints')}")
  assert deterministic(records(init, "eval")[0]) == deterministic(records(straight, "eval")[0])


def check_checkpoint_shardings(workdir, overrides):
  """Restores the run's newest SFT and RL checkpoints in this process (8 devices) with the run's
  mesh, checks every leaf against the rule table; returns the RL parameters' norm."""
  import jax
  import numpy as np
  from configs import test as test_config
  from openvlthinker.train import loop
  from openvlthinker.train.context import build_context
  from openvlthinker.train.rl_stage import RLStage
  from openvlthinker.train.sft import sft_optimizer
  from openvlthinker.train.state import create_train_state

  config = test_config.get_config()
  for o in overrides:
    *path, name = o.removeprefix("--config.").split("=")[0].split(".")
    section = config
    for part in path:
      section = section[part]
    value = o.split("=")[1]
    section[name] = value == "True" if isinstance(section[name], bool) else int(value)
  ctx = build_context(config, workdir)
  assert ctx.sharder.mesh.devices.size == 8
  stage = RLStage(ctx, metrics_writer=None)
  for name, tx, extra in (("sft", sft_optimizer(config.sft), None),
                          ("rl", stage.tx, stage.reward.init_stats())):
    template, _ = create_train_state(ctx.initial_params, tx, ctx.sharder, extra=extra)
    step, state, _ = loop.StageCheckpoints(workdir, name, 2).restore(template)
    assert step == 4 and int(state.step) == 4 * (1 if name == "sft" else 2)
    assert_rule_table_shardings(state, ctx.sharder)
  # In numpy (float64): an independent sum, and jax's eager ops mix up the meshes of two tests.
  return math.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                       for x in jax.tree.leaves(state.params)))  # the RL state's


def assert_rule_table_shardings(state, sharder):
  """Every parameter by its logical axes, every AdamW moment like its parameter, scalars
  replicated: all on the 8 devices of the mesh, none on device 0 alone."""
  import jax
  from openvlthinker import sharding

  want_params = sharding.state_shardings(state.params, sharder)
  params = jax.tree.leaves(state.params)
  for leaf, want in zip(params, jax.tree.leaves(want_params)):
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (leaf.sharding, want)
  assert any(not s.is_fully_replicated for s in (p.sharding for p in params))
  moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
  assert len(moments) == 2 * len(params)  # mu and nu
  shapes = {}
  for leaf, want in zip(params, jax.tree.leaves(want_params)):
    shapes.setdefault(leaf.shape, []).append(want)
  for m in moments:
    assert any(m.sharding.is_equivalent_to(w, m.ndim) for w in shapes[m.shape]), m.sharding
  for leaf in jax.tree.leaves(state):
    assert len(leaf.sharding.device_set) == 8, leaf.sharding
  assert state.step.sharding.is_fully_replicated


@pytest.mark.slow
def test_nan_loss_step_is_skipped_and_counted(tmp_path, env):
  workdir = str(tmp_path / "nan")
  # Optimizer step 1 is the second minibatch update of RL step 1 (2 updates per rollout).
  # Shaping on, so the length reward and the entropy term run end to end too.
  run(env, workdir, *MESHES["fsdp4_tensor2"], "--config.sft.steps=2", "--config.rl.steps=2",
      "--config.debug.nan_loss_at_rl_step=1", "--config.rl.length.enabled=True",
      "--config.rl.entropy.enabled=True", "--config.rl.entropy.estimator=sampled_token")
  rl = records(workdir, "rl")
  assert all("entropy_loss" in r and any(k.startswith("length_reward/") for k in r) for r in rl)
  assert rl[0]["skipped_step"] == 1.0 and rl[1]["skipped_step"] == 0.0
  assert rl[-1]["skipped_steps_total"] == 1
  for r in rl:
    assert math.isfinite(r["param_norm"]) and r["param_norm"] > 0
  assert math.isfinite(rl[1]["policy_loss"])
