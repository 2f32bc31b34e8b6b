"""`--mode=eval` on JSON sets, through the entry point on 8 devices (RL's evaluation points on a JSON
set: tests/models/hf/test_hf_run.py)."""
import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import eval_data  # noqa: E402  pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(env, workdir, *overrides):
  return subprocess.run([sys.executable, "-m", "openvlthinker.main", "--config=configs/test.py",
                         f"--workdir={workdir}", *overrides], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_eval_mode_writes_each_sets_problems_and_summary(tmp_path, cli_env):
  demo = eval_data.write_set(str(tmp_path), "demo")
  broken = eval_data.write_set(str(tmp_path), "broken", per_kind=1, bad=True)
  sets = [f"--config.eval.sets=demo:{demo},broken:{broken}", "--config.eval.suite=False",
          "--config.eval.num_samples=2", "--config.eval.temperature=1.0"]
  workdir = str(tmp_path / "run")
  # data.source=json and no data.path: evaluating needs no training data.
  proc = main(cli_env, workdir, "--mode=eval", "--config.data.source=json", *sets)
  assert proc.returncode == 0, proc.stderr[-3000:]
  point = os.path.join(workdir, "eval", "random")  # no checkpoint, no model.init: said loudly
  assert "RANDOM" in proc.stderr
  rows = [json.loads(l) for l in open(os.path.join(point, "demo.jsonl"))]
  assert len(rows) == 14 and {r["problem_type"] for r in rows} == {k[1] for k in eval_data.KINDS}
  assert all(len(r["responses"]) == len(r["accuracy"]) == 2 for r in rows)
  summary = json.load(open(os.path.join(point, "summary.json")))
  assert summary["decoding"]["num_samples"] == 2
  assert summary["sets"]["broken"]["problems"] == 7
  assert summary["sets"]["broken"]["dropped"] == {"missing_image": 1, "bad_image": 1,
                                                  "unknown_type": 1}
  assert "| **broken** | 7 | 1 bad_image, 1 missing_image, 1 unknown_type |" in proc.stdout
  assert os.path.isfile(os.path.join(point, "summary.md"))
  assert "broken.jsonl:8 (problem_id missing): image file not found" in proc.stderr  # named
