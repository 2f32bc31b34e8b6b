"""PNG plots of a run: per-task RL curves (from metrics.jsonl), evaluation bars, and each evaluation
set's accuracy over RL steps.

Figures are `matplotlib.figure.Figure`s drawn straight to files, never through pyplot's global
state: a training run started from a notebook keeps the notebook's own backend and figures.
"""
from __future__ import annotations

import os

import numpy as np
from matplotlib.figure import Figure

from openvlthinker import taxonomy
from openvlthinker.metrics import read_jsonl


def _series(records, stage, key):
  pts = [(r["step"], r[key]) for r in records if r.get("stage") == stage and r.get(key) is not None]
  return np.asarray(pts, np.float64).reshape(-1, 2)


def plot_rl_curves(records, path: str) -> None:
  """Per-task reward, length and entropy over RL steps, one panel each."""
  panels = (("reward", "reward (overall)"), ("length", "response length (tokens)"),
            ("entropy", "token entropy (nats)"))
  fig = Figure(figsize=(5 * len(panels), 3.6))
  axes = fig.subplots(1, len(panels))
  for ax, (prefix, title) in zip(axes, panels):
    for task in taxonomy.TASK_TYPES:
      pts = _series(records, "rl", f"{prefix}/{task}")
      if len(pts):
        ax.plot(pts[:, 0], pts[:, 1], label=task, lw=1.2)
    ax.set_title(title)
    ax.set_xlabel("RL step")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def plot_eval_bars(evals: dict[str, dict[str, np.ndarray]], path: str,
                   metric: str = "overall") -> None:
  """Held-out `metric` per task for each named evaluation (e.g. before and after RL)."""
  names = list(evals)
  x = np.arange(taxonomy.NUM_TASKS)
  width = 0.8 / max(len(names), 1)
  fig = Figure(figsize=(9, 3.6))
  ax = fig.subplots()
  for i, name in enumerate(names):
    ax.bar(x + i * width, np.nan_to_num(evals[name][metric]), width, label=name)
  ax.set_xticks(x + width * (len(names) - 1) / 2, taxonomy.TASK_TYPES, rotation=15, fontsize=8)
  ax.set_ylabel(f"held-out {metric} reward")
  ax.legend()
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def plot_set_accuracy(series: dict[str, np.ndarray], path: str) -> None:
  """Accuracy (mean@K with its 95 % band) of each evaluation set over RL steps; series:
  {set: float[n, 3] rows (step, mean, half-width)} (`eval.report.history`)."""
  fig = Figure(figsize=(6, 3.6))
  ax = fig.subplots()
  for name, rows in series.items():
    ax.plot(rows[:, 0], rows[:, 1], marker="o", lw=1.2, label=name)
    ax.fill_between(rows[:, 0], rows[:, 1] - rows[:, 2], rows[:, 1] + rows[:, 2], alpha=0.15)
  ax.set_xlabel("RL step")
  ax.set_ylabel("accuracy (mean@K)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def _smooth(y: np.ndarray, width: int = 5) -> np.ndarray:
  """A trailing mean over `width` points (fewer at the start)."""
  c = np.cumsum(np.insert(y, 0, 0.0))
  n = np.minimum(np.arange(1, len(y) + 1), width)
  return (c[1:] - c[np.arange(len(y)) + 1 - n]) / n


def plot_task_balance(runs: dict[str, list[dict]], path) -> None:
  """Per task, for each run (an estimator, say): the std of its advantages over RL steps and its
  share of the policy-gradient norm (`grad_share/<task>`, logged every rl.task_balance_every
  steps); raw values faint, smoothed on top. G²RPO maps every task's advantages onto N(0, 1);
  GRPO's scale follows each task's reward topology."""
  panels = (("adv_std", "advantage std"), ("grad_share", "share of the policy-gradient norm"))
  fig = Figure(figsize=(5.2 * len(runs), 3.2 * len(panels)))
  axes = np.asarray(fig.subplots(len(panels), len(runs), squeeze=False))
  colors = {t: f"C{i}" for i, t in enumerate(taxonomy.TASK_TYPES)}
  for col, (name, records) in enumerate(runs.items()):
    for row, (prefix, title) in enumerate(panels):
      ax = axes[row, col]
      for task in taxonomy.TASK_TYPES:
        pts = _series(records, "rl", f"{prefix}/{task}")
        if len(pts):
          ax.plot(pts[:, 0], pts[:, 1], color=colors[task], alpha=0.2, lw=0.8)
          ax.plot(pts[:, 0], _smooth(pts[:, 1]), color=colors[task], lw=1.6, label=task)
      ax.set_title(f"{name}: {title}", fontsize=9)
      ax.set_xlabel("RL step")
      ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110, format="png")  # a path or a binary file


def write_plots(workdir: str, evals: dict[str, dict[str, np.ndarray]]) -> list[str]:
  records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  paths = [os.path.join(workdir, "rl_curves.png"), os.path.join(workdir, "eval_per_task.png")]
  plot_rl_curves(records, paths[0])
  plot_eval_bars(evals, paths[1])
  if any(k.startswith("grad_norm_task/") for r in records for k in r):  # rl.task_balance_every
    paths.append(os.path.join(workdir, "task_balance.png"))
    plot_task_balance({"this run": records}, paths[-1])
  return paths
