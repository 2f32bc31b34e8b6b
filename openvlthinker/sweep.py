"""Local sweep runner: executes a config's `get_sweep(arg)` runs one after another, then writes a
comparison table (markdown) and plot of the held-out evaluation after RL.

  python -m openvlthinker.sweep --config=configs/ablation.py:base=test,seeds=0+1 --workdir=DIR

Runs of one seed share the SFT stage (trained once, linked into each run), a finished run is not
rerun, and an interrupted sweep continues where it stopped.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
from absl import app, flags

from openvlthinker import taxonomy

_CONFIG = flags.DEFINE_string("config", None, "Sweep config file[:arg], e.g. configs/ablation.py:base=test")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory holding one subdirectory per run.")


def load_sweep(spec: str):
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("sweep_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"--config: {path} has no get_sweep(arg)")
  return module.get_sweep(arg or None)


def _overrides(values: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in values.items()]


def run_all(spec: str, workdir: str) -> list[tuple[str, dict]]:
  """Runs every run of the sweep (skipping finished ones); returns [(name, overrides)]."""
  runs = load_sweep(spec)
  for name, values in runs:
    run_dir = os.path.join(workdir, name)
    if os.path.exists(os.path.join(run_dir, "eval_summary.json")):
      continue
    sft_dir = os.path.join(workdir, f"sft_seed{values.get('seed', 0)}")
    base = [sys.executable, "-m", "openvlthinker.main", f"--config={spec}"]
    if not os.path.isdir(os.path.join(sft_dir, "sft")):
      subprocess.run(base + [f"--workdir={sft_dir}", "--mode=sft"] + _overrides(values),
                     check=True)
    os.makedirs(run_dir, exist_ok=True)
    link = os.path.join(run_dir, "sft")
    if not os.path.exists(link):
      os.symlink(os.path.abspath(os.path.join(sft_dir, "sft")), link)
    print(f"[sweep] {name}", flush=True)
    subprocess.run(base + [f"--workdir={run_dir}", "--mode=all"] + _overrides(values),
                   check=True)
  return runs


def summarize(workdir: str, runs) -> dict[str, dict[str, np.ndarray]]:
  """{variant: {"after": float[seeds, T], "before": float[seeds, T]}} of held-out overall reward."""
  out: dict[str, dict[str, list]] = {}
  for name, _ in runs:
    variant = name.rsplit("_seed", 1)[0]
    with open(os.path.join(workdir, name, "eval_summary.json")) as f:
      summary = json.load(f)
    entry = out.setdefault(variant, {"after": [], "before": []})
    entry["after"].append(summary["after_rl"]["overall"])
    entry["before"].append(summary["before_rl"]["overall"])
  return {v: {k: np.asarray(x, np.float64) for k, x in e.items()} for v, e in out.items()}


def table(results) -> str:
  tasks = taxonomy.TASK_TYPES
  head = "| variant | " + " | ".join(tasks) + " | mean | tasks above SFT |"
  lines = [head, "|---|" + "---|" * (len(tasks) + 2)]
  fmt = lambda a: f"{np.mean(a):.3f} ± {np.std(a):.3f}"
  first = next(iter(results.values()))
  lines.append("| SFT (before RL) | " + " | ".join(fmt(first["before"][:, t]) for t in
                                                   range(len(tasks))) +
               f" | {fmt(first['before'].mean(1))} | |")
  for variant, r in results.items():
    above = int(np.sum(r["after"].mean(0) > r["before"].mean(0)))  # means over seeds, per task
    lines.append(f"| {variant} | " + " | ".join(fmt(r["after"][:, t]) for t in range(len(tasks)))
                 + f" | {fmt(r['after'].mean(1))} | {above} of {len(tasks)} |")
  seeds = first["after"].shape[0]
  return (f"Held-out overall reward after RL, mean ± std over {seeds} seeds "
          "(greedy decoding):\n\n" + "\n".join(lines) + "\n")


def plot(results, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  tasks = taxonomy.TASK_TYPES
  x = np.arange(len(tasks))
  width = 0.8 / (len(results) + 1)
  fig, ax = plt.subplots(figsize=(10, 3.8))
  first = next(iter(results.values()))
  ax.bar(x, first["before"].mean(0), width, label="SFT", color="0.7")
  for i, (variant, r) in enumerate(results.items(), 1):
    ax.bar(x + i * width, r["after"].mean(0), width, yerr=r["after"].std(0), capsize=2,
           label=variant)
  ax.set_xticks(x + width * len(results) / 2, tasks, rotation=15, fontsize=8)
  ax.set_ylabel("held-out overall reward")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  if not _CONFIG.value or not _WORKDIR.value:
    raise app.UsageError("--config and --workdir are required")
  del argv
  runs = run_all(_CONFIG.value, _WORKDIR.value)
  results = summarize(_WORKDIR.value, runs)
  text = table(results)
  with open(os.path.join(_WORKDIR.value, "ablation.md"), "w") as f:
    f.write(text)
  plot(results, os.path.join(_WORKDIR.value, "ablation.png"))
  print(text)


if __name__ == "__main__":
  app.run(main)
