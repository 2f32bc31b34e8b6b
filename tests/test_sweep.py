"""The ablation runner: 2 estimators on the test config end to end (table and plot written), and
the seed-averaged table and resume logic on finished runs of 2 seeds."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from openvlthinker import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = "configs/ablation.py:base=test,estimators=g2rpo+grpo,seeds=0+1,shaping=off"
SPEC_ONE_SEED = "configs/ablation.py:base=test,estimators=g2rpo+grpo,seeds=0,shaping=off"


def test_sweep_lists_runs_seed_major():
  runs = sweep.load_sweep(os.path.join(ROOT, SPEC))
  assert [n for n, _ in runs] == ["g2rpo_shaping-off_seed0", "grpo_shaping-off_seed0",
                                  "g2rpo_shaping-off_seed1", "grpo_shaping-off_seed1"]
  assert runs[1][1] == {"seed": 0, "rl.advantage": "grpo", "rl.length.enabled": False,
                        "rl.entropy.enabled": False}


def test_bad_sweep_arg_names_the_key():
  with pytest.raises(ValueError, match="estimatorz"):
    sweep.load_sweep(os.path.join(ROOT, "configs/ablation.py:estimatorz=grpo"))


@pytest.mark.slow
def test_ablation_runner_on_test_config(tmp_path, cli_env):
  env = cli_env  # 8 devices; the suite's shared compilation cache
  workdir = str(tmp_path / "sweep")
  proc = subprocess.run([sys.executable, "-m", "openvlthinker.sweep", f"--config={SPEC_ONE_SEED}",
                         f"--workdir={workdir}"], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # SFT ran once for the seed and is shared by its runs.
  assert sorted(d for d in os.listdir(workdir) if d.startswith("sft_")) == ["sft_seed0"]
  assert os.path.realpath(os.path.join(workdir, "grpo_shaping-off_seed0", "sft")) == \
      os.path.join(workdir, "sft_seed0", "sft")
  text = open(os.path.join(workdir, "ablation.md")).read()
  assert "| g2rpo_shaping-off |" in text and "| grpo_shaping-off |" in text
  assert os.path.getsize(os.path.join(workdir, "ablation.png")) > 0
  # The table's numbers are the runs' own held-out evaluations.
  after = json.load(open(os.path.join(workdir, "grpo_shaping-off_seed0",
                                      "eval_summary.json")))["after_rl"]["overall"]
  row = next(l for l in text.splitlines() if l.startswith("| grpo_shaping-off |"))
  cells = [c.strip() for c in row.strip("|").split("|")][1:]
  assert float(cells[0].split(" ± ")[0]) == pytest.approx(np.nan_to_num(after[0]), abs=6e-4)


def test_finished_runs_are_not_rerun_and_the_table_averages_seeds(tmp_path, monkeypatch):
  """Two seeds of finished runs (their eval summaries written here): nothing is launched, and the
  table's cells are the mean ± std over seeds of each task's held-out reward."""
  launched = []
  monkeypatch.setattr(sweep.subprocess, "run", lambda *a, **k: launched.append(a))
  rng = np.random.default_rng(0)
  workdir = str(tmp_path)
  written = {}
  for name, _ in sweep.load_sweep(os.path.join(ROOT, SPEC)):
    os.makedirs(os.path.join(workdir, name))
    summary = {"before_rl": {"overall": rng.random(6).tolist()},
               "after_rl": {"overall": rng.random(6).tolist()}}
    written[name] = summary
    with open(os.path.join(workdir, name, "eval_summary.json"), "w") as f:
      json.dump(summary, f)
  runs = sweep.run_all(os.path.join(ROOT, SPEC), workdir)
  assert not launched
  text = sweep.table(sweep.summarize(workdir, runs))
  assert "mean ± std over 2 seeds" in text
  after = np.array([written[f"grpo_shaping-off_seed{s}"]["after_rl"]["overall"] for s in (0, 1)])
  row = next(l for l in text.splitlines() if l.startswith("| grpo_shaping-off |"))
  cells = [c.strip() for c in row.strip("|").split("|")][1:]
  for t in range(6):
    mean, std = (float(x) for x in cells[t].split(" ± "))
    assert mean == pytest.approx(after[:, t].mean(), abs=6e-4)
    assert std == pytest.approx(after[:, t].std(), abs=6e-4)
  mean_cell = float(cells[6].split(" ± ")[0])
  assert mean_cell == pytest.approx(after.mean(1).mean(), abs=6e-4)
