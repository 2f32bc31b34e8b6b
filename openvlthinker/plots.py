"""PNG plots of a run: per-task RL curves (the rollouts' accuracy from metrics.jsonl, smoothed over
its raw values, with the held-out accuracy and its 95 % intervals from eval/rl_*/), length and
entropy per task, evaluation bars, and each evaluation set's accuracy over RL steps.

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


def _smooth(y: np.ndarray, width: int | None = None) -> np.ndarray:
  """A trailing mean over `width` points (fewer at the start). The default, max(5, n // 12),
  follows the run's length: a long run's per-step noise needs a wider window to show a trend."""
  width = width or max(5, len(y) // 12)
  c = np.cumsum(np.insert(y, 0, 0.0))
  n = np.minimum(np.arange(1, len(y) + 1), width)
  return (c[1:] - c[np.arange(len(y)) + 1 - n]) / n


def _raw_and_smoothed(ax, pts: np.ndarray, color: str, label: str | None = None) -> list:
  """Raw values faint, their `_smooth` on top; returns the smoothed line (for a legend)."""
  ax.plot(pts[:, 0], pts[:, 1], color=color, alpha=0.25, lw=0.8)
  return ax.plot(pts[:, 0], _smooth(pts[:, 1]), color=color, lw=1.6, label=label)


def plot_rl_curves(records, path: str, heldout: dict[str, np.ndarray] | None = None) -> None:
  """One panel per task type, accuracy over RL steps on one [0, 1] axis: the rollouts' accuracy
  (`reward_accuracy/<task>` of the "rl" records; raw faint, smoothed on top) and the held-out
  accuracy with its 95 % intervals (heldout: {task: float[n, 3] rows (step, mean@K,
  half-width)}, `eval.report.task_history`). Accuracy, not the overall reward, because the
  held-out summaries carry accuracy per task and the reward adds format and shaping terms."""
  heldout = heldout or {}
  fig = Figure(figsize=(12, 6.6))
  axes = np.asarray(fig.subplots(2, 3, squeeze=False)).ravel()
  handles = {}
  for ax, task in zip(axes, taxonomy.TASK_TYPES):
    pts = _series(records, "rl", f"reward_accuracy/{task}")
    if len(pts):
      handles["rollout accuracy (smoothed; raw faint)"], = _raw_and_smoothed(ax, pts, "C0")
    rows = heldout.get(task, np.zeros((0, 3)))
    if len(rows):
      handles["held-out accuracy (mean@K ± 95 %)"] = ax.errorbar(
          rows[:, 0], rows[:, 1], yerr=rows[:, 2], color="C3", marker="o", ms=4, lw=1.2,
          capsize=3)
    if not len(pts) and not len(rows):
      ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, alpha=0.6)
    ax.set_title(task, fontsize=10)
    ax.set_xlabel("RL step")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
  for ax in axes[taxonomy.NUM_TASKS:]:  # a taxonomy of fewer than six tasks
    ax.set_visible(False)
  if handles:  # once for the figure: every panel draws the same two series
    fig.legend(list(handles.values()), list(handles), loc="upper center", ncol=2, fontsize=9)
  fig.tight_layout(rect=(0, 0, 1, 0.95))
  fig.savefig(path, dpi=110)


def plot_length_entropy(records, path: str) -> None:
  """Response length and token entropy of each task over RL steps: one line per task, raw values
  faint and smoothed on top."""
  panels = (("length", "response length (tokens)"), ("entropy", "token entropy (nats)"))
  fig = Figure(figsize=(11, 3.8))
  axes = fig.subplots(1, len(panels))
  for ax, (prefix, title) in zip(axes, panels):
    for i, task in enumerate(taxonomy.TASK_TYPES):
      pts = _series(records, "rl", f"{prefix}/{task}")
      if len(pts):
        _raw_and_smoothed(ax, pts, f"C{i}", label=task)
    ax.set_title(title)
    ax.set_xlabel("RL step")
    ax.grid(alpha=0.3)
  if axes[0].get_legend_handles_labels()[0]:
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
          _raw_and_smoothed(ax, pts, colors[task], label=task)
      ax.set_title(f"{name}: {title}", fontsize=9)
      ax.set_xlabel("RL step")
      ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110, format="png")  # a path or a binary file


def write_plots(workdir: str, evals: dict[str, dict[str, np.ndarray]],
                heldout: dict[str, np.ndarray] | None = None) -> list[str]:
  """The run's figures in `workdir`: rl_curves.png (per task: rollout accuracy and the `heldout`
  history of `plot_rl_curves`), rl_length_entropy.png, eval_per_task.png (`evals`) and, when
  logged, task_balance.png; returns their paths."""
  records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  paths = [os.path.join(workdir, name) for name in
           ("rl_curves.png", "rl_length_entropy.png", "eval_per_task.png")]
  plot_rl_curves(records, paths[0], heldout)
  plot_length_entropy(records, paths[1])
  plot_eval_bars(evals, paths[2])
  if any(k.startswith("grad_norm_task/") for r in records for k in r):  # rl.task_balance_every
    paths.append(os.path.join(workdir, "task_balance.png"))
    plot_task_balance({"this run": records}, paths[-1])
  return paths
