"""Faults a user meets through the entry point, on the suite's 8 fake devices: what gets evaluated
when nothing was trained, a filter that keeps nothing, a second run on a busy workdir."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAST = ("--config.eval.num_per_task=1", "--config.eval.every=100")


@pytest.fixture(scope="module")
def env(cli_env):
  return cli_env  # one compilation cache for every CLI run of the suite


def command(workdir, *overrides):
  return [sys.executable, "-m", "openvlthinker.main", "--config=configs/test.py",
          f"--workdir={workdir}", *FAST, *overrides]


def main(env, workdir, *overrides):
  return subprocess.run(command(workdir, *overrides), cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)


def error_lines(proc):
  return [l for l in proc.stderr.splitlines() if l.startswith("error:")]


def test_eval_and_rl_with_no_checkpoint_say_they_use_random_weights(tmp_path, env):
  workdir = str(tmp_path / "empty")
  proc = main(env, workdir, "--mode=eval")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "warning: eval: scoring the RANDOM initial weights" in proc.stderr
  assert "eval set: the procedural suite's held-out split" in proc.stdout
  with open(os.path.join(workdir, "eval", "random.json")) as f:
    assert json.load(f)["weights"]["stage"] == "random"
  # A step that does not exist is a one-line error naming the field.
  proc = main(env, workdir, "--mode=eval", "--config.eval.checkpoint=rl:3")
  assert proc.returncode == 2 and error_lines(proc)[0].startswith("error: eval.checkpoint")

  proc = main(env, workdir, "--mode=rl", "--config.rl.steps=1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "RL starts from the RANDOM initial weights" in proc.stderr


def test_filter_that_keeps_nothing_warns_then_stops(tmp_path, env):
  workdir = str(tmp_path / "filter")
  # A random policy solves nothing: no group's accuracy lies in (0.5, 1).
  proc = main(env, workdir, "--mode=rl", "--config.sft.steps=0", "--config.rl.steps=4",
              "--config.rl.filter.enabled=True", "--config.rl.filter.low=0.5",
              "--config.rl.filter.max_tries=1", "--config.rl.filter.max_empty_steps=2")
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert error_lines(proc) == [l for l in proc.stderr.splitlines()
                               if l.startswith("error: rl.filter: 2 steps in a row kept no group")]
  assert proc.stderr.count("so this step trains on nothing") == 2
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rl = [r for r in map(json.loads, f) if r["stage"] == "rl"]
  assert [r["step"] for r in rl] == [1] and rl[0]["empty_step"] == 1.0
  assert rl[0]["groups_kept"] == 0 and "policy_loss" not in rl[0]  # no update ran


def test_second_run_on_a_busy_workdir_stops_and_a_stale_lock_is_taken_over(tmp_path, env):
  workdir = str(tmp_path / "busy")
  first = subprocess.Popen(command(workdir, "--mode=sft", "--config.sft.steps=400"), cwd=ROOT,
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 300
    while not os.path.isdir(os.path.join(workdir, "sft", "checkpoints", "1")):
      assert first.poll() is None and time.time() < deadline, first.stderr.read()
      time.sleep(0.2)
    # Paused, it still holds the lock but takes no CPU from the runs below (and deletes no
    # checkpoint the evaluation reads).
    first.send_signal(signal.SIGSTOP)
    second = main(env, workdir, "--mode=sft", "--config.sft.steps=400")
    assert second.returncode == 2, second.stderr[-3000:]
    [line] = error_lines(second)
    assert f"is in use by pid {first.pid} on this host" in line, line
    # An evaluation only reads checkpoints: it may run beside the training run.
    evaluation = main(env, workdir, "--mode=eval")
    assert evaluation.returncode == 0, evaluation.stderr[:3000]
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
  with open(os.path.join(workdir, ".lock")) as f:
    assert json.load(f)["pid"] == first.pid  # SIGKILL left it behind
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = f.readlines()
  assert all(json.loads(l)["stage"] == "sft" for l in lines)  # nothing from the second run
  proc = main(env, workdir, "--mode=sft", "--config.sft.steps=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"taking over the lock of pid {first.pid}, which is gone" in proc.stderr
  assert not os.path.exists(os.path.join(workdir, ".lock"))  # released on exit


def write_json_dataset(directory, n: int, bad: tuple[int, ...]) -> str:
  """data.jsonl of n chart_figure_qa records with one image each; the images of `bad` are random
  bytes that no decoder reads."""
  from PIL import Image
  import numpy as np
  os.makedirs(os.path.join(directory, "imgs"))
  with open(os.path.join(directory, "data.jsonl"), "w") as f:
    for k in range(n):
      image = os.path.join(directory, "imgs", f"{k}.png")
      if k in bad:
        with open(image, "wb") as g:
          g.write(np.random.default_rng(k).bytes(300))
      else:
        Image.fromarray(np.full((64, 64, 3), k % 256, np.uint8)).save(image)
      f.write(json.dumps({
          "problem_id": k, "problem": "<image> How many bars?", "problem_type": "numerical",
          "task_type": "chart_figure_qa", "answer": f"<answer>{k % 7}</answer>",
          "images": [f"imgs/{k}.png"],
          "reasoning": f"<thinking>count</thinking><answer>{k % 7}</answer>"}) + "\n")
  return os.path.join(directory, "data.jsonl")


def test_json_run_with_undecodable_images_completes_and_counts_them(tmp_path, env):
  # 1 % of the images do not decode; 13 SFT batches of 8 read the whole first epoch of 100.
  path = write_json_dataset(str(tmp_path), 100, bad=(42,))
  others = [f"--config.data.mixture.{t}=0" for t in
            ("spatial_grounding", "spatial_reasoning", "general_vqa", "math_reasoning", "ocr")]
  workdir = str(tmp_path / "json")
  proc = main(env, workdir, "--config.data.source=json", f"--config.data.path={path}",
              "--config.data.skip_bad_records=True", *others, "--config.sft.steps=13",
              "--config.rl.steps=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "data.jsonl:43 (problem_id 42)" in proc.stderr and "imgs/42.png" in proc.stderr
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    sft = [r for r in map(json.loads, f) if r["stage"] == "sft"]
  assert len(sft) == 13 and sum(r["records_dropped"] for r in sft) >= 1
  # Evaluated on the suite's held-out problems of the one task it trains on, and it says so.
  assert "chart_figure_qa (not data.path=" in proc.stdout
  table = proc.stdout[proc.stdout.index("Held-out overall reward"):]
  assert "| chart_figure_qa |" in table and "| ocr |" not in table
