"""Checkpoint faults through the entry point, on the 8 fake devices the suite uses: one SFT run
(4 steps, a checkpoint every 2), then

- its newest checkpoint (step 4) damaged, the same command rerun: it warns in one line, moves the
  step aside (kept, renamed), resumes from step 2 and finishes with a fresh step 4 and the metrics
  of the first run, with no "Event loop is closed" noise;
- rerun once more: nothing to do (exit 0, no step trained, no checkpoint written);
- rerun with another model width: exits non-zero naming the checkpoint and a leaf that "does not
  match the config", and moves nothing.
"""
import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = ("--mode=sft", "--config.sft.steps=4", "--config.checkpoint.every=2")
TIMING_KEYS = ("_s", "tokens_per_s")


def run(env, workdir, *overrides):
  return subprocess.run([sys.executable, "-m", "openvlthinker.main", "--config=configs/test.py",
                         f"--workdir={workdir}", *STEPS, *overrides], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return f.read()


def deterministic(text):
  return [{k: v for k, v in row.items() if not k.endswith(TIMING_KEYS)}
          for row in map(json.loads, text.splitlines())]


def damage(step_dir):
  """Truncates the largest array file of a step to half its size, as a full disk would."""
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
           if os.path.isfile(f) and "/d/" in f]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)


@pytest.mark.slow
def test_a_damaged_or_mismatched_checkpoint_through_the_cli(tmp_path, cli_env):
  env = cli_env
  assert "device_count=8" in os.environ["XLA_FLAGS"]
  workdir = str(tmp_path / "w")
  checkpoints = os.path.join(workdir, "sft", "checkpoints")
  first = run(env, workdir)
  assert first.returncode == 0, first.stderr[-3000:]
  assert sorted(os.listdir(checkpoints)) == ["2", "4"]
  original = metrics(workdir)

  damage(os.path.join(checkpoints, "4"))
  second = run(env, workdir)
  assert second.returncode == 0, second.stderr[-3000:]
  assert (f"warning: checkpoint {checkpoints}/4 is unreadable" in second.stderr
          and f"moved it to {checkpoints}/4.damaged" in second.stderr)
  assert "Event loop is closed" not in second.stderr and len(second.stderr.splitlines()) == 1
  assert sorted(os.listdir(checkpoints)) == ["2", "4", "4.damaged"]
  assert os.path.isdir(os.path.join(checkpoints, "4.damaged", "state"))  # Kept, not deleted.
  assert deterministic(metrics(workdir)) == deterministic(original)  # Steps 3 and 4 again.

  step_4 = os.path.join(checkpoints, "4")
  saved, resumed = os.stat(step_4).st_mtime_ns, metrics(workdir)
  third = run(env, workdir)
  assert third.returncode == 0 and not third.stderr, third.stderr[-3000:]
  assert metrics(workdir) == resumed and os.stat(step_4).st_mtime_ns == saved  # Nothing trained.

  wider = run(env, workdir, "--config.model.width=96")
  assert wider.returncode != 0
  lines = [l for l in wider.stderr.splitlines() if "does not match the config" in l]
  assert lines and f"checkpoint {checkpoints}/4 does not match the config: " in lines[-1], (
      wider.stderr[-3000:])
  assert "params.decoder." in lines[-1] and "[96," in lines[-1]
  assert sorted(os.listdir(checkpoints)) == ["2", "4", "4.damaged"]
  assert metrics(workdir) == resumed
