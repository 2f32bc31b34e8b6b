"""The ablation runner: 2 estimators × 2 seeds on the test config, table and plot written."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from openvlthinker import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = "configs/ablation.py:base=test,estimators=g2rpo+grpo,seeds=0+1,shaping=off"


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
  proc = subprocess.run([sys.executable, "-m", "openvlthinker.sweep", f"--config={SPEC}",
                         f"--workdir={workdir}"], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # SFT ran once per seed and is shared by that seed's runs.
  assert sorted(d for d in os.listdir(workdir) if d.startswith("sft_")) == ["sft_seed0",
                                                                          "sft_seed1"]
  assert os.path.realpath(os.path.join(workdir, "grpo_shaping-off_seed1", "sft")) == \
      os.path.join(workdir, "sft_seed1", "sft")
  text = open(os.path.join(workdir, "ablation.md")).read()
  assert "| g2rpo_shaping-off |" in text and "| grpo_shaping-off |" in text
  assert os.path.getsize(os.path.join(workdir, "ablation.png")) > 0
  # The table's numbers are the runs' own held-out evaluations.
  after = [json.load(open(os.path.join(workdir, f"grpo_shaping-off_seed{s}",
                                       "eval_summary.json")))["after_rl"]["overall"]
           for s in (0, 1)]
  mean = np.nanmean(np.asarray(after, float), axis=0)
  row = next(l for l in text.splitlines() if l.startswith("| grpo_shaping-off |"))
  cells = [c.strip() for c in row.strip("|").split("|")][1:]
  assert float(cells[0].split(" ± ")[0]) == pytest.approx(mean[0], abs=6e-4)
