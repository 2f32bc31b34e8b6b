"""What an RL step and an evaluation log: flat {name: float} dicts, per task as `name/<task>`.

The reward figures are the training reward (`train.reward`) over every sampled response, filtered
or not, so what is logged is what is trained; entropy and advantage figures are over the rows that
train (valid rows).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from openvlthinker import taxonomy
from openvlthinker.rl.scoring import per_task_means
from openvlthinker.train.batch import RowSummary

T = taxonomy.TASK_TYPES
EVAL_KEYS = ("accuracy", "overall", "format", "length", "unparsable")


def per_task(prefix: str, values: np.ndarray) -> dict[str, float]:
  """float[T] → {prefix/task: value} for the tasks present (finite values)."""
  return {f"{prefix}/{task}": float(v) for task, v in zip(T, values) if np.isfinite(v)}


def eval_metrics(results: dict[str, np.ndarray]) -> dict[str, float]:
  out = {}
  for key in EVAL_KEYS:
    out.update(per_task(key, results[key]))
    out[f"{key}/mean"] = float(np.nanmean(results[key]))
  return out


def reduce_updates(updates: Sequence[dict[str, np.ndarray]], batch: RowSummary
                   ) -> dict[str, float]:
  """The metrics of the step's minibatch updates → one value each (skips summed, the rest
  averaged; per-task advantage statistics keyed by task id, NaN for tasks with no valid row)."""
  out = {}
  present = np.bincount(batch.task_ids[batch.valid], minlength=len(T)) > 0
  for key in updates[0]:
    values = np.stack([np.asarray(m[key]) for m in updates])
    if key == "skipped_step":
      out[key] = float(values.sum())
    elif key in ("task_adv_mean", "task_adv_std"):
      out.update(per_task(key.replace("task_", ""), np.where(present, values.mean(0), np.nan)))
    else:
      out[key] = float(values.mean())
  return out


def task_balance_metrics(norms: np.ndarray, task_ids: np.ndarray) -> dict[str, float]:
  """Each task's policy-gradient norm ‖g_τ‖ (float[T], `rl.make_task_gradient_norms`) and its
  share ‖g_τ‖ / Σ_τ' ‖g_τ'‖ over the tasks with valid rows in the minibatch (`task_ids`): G²RPO
  claims comparable shares whatever a task's reward topology. Absent tasks are left out."""
  present = np.bincount(task_ids, minlength=len(T)) > 0
  norms = np.where(present, np.asarray(norms, np.float64), np.nan)
  total = np.nansum(norms)
  return {**per_task("grad_norm_task", norms),
          **per_task("grad_share", norms / total if total > 0 else np.full(len(T), np.nan))}


def rollout_metrics(batch: RowSummary, sampled: dict[str, np.ndarray],
                    length_shaping: bool) -> dict[str, float]:
  """Reward parts over every sampled response; entropy, lengths and the length term per task
  (`batch`: the rollout's rows, all processes')."""
  out = {}
  means = per_task_means(sampled, sampled["task_ids"], len(T))
  for key, name in (("reward", "reward"), ("accuracy", "reward_accuracy"),
                    ("format", "reward_format")):
    out.update(per_task(name, means[key]))
    out[f"{name}/mean"] = float(np.mean(sampled[key]))
  out["unparsable_frac"] = float(np.mean(sampled["unparsable"]))
  if length_shaping:
    out.update(per_task("length_reward", per_task_means(
        {"r": batch.length_reward}, batch.task_ids, len(T), batch.valid)["r"]))
  if batch.overlong_penalty is not None and np.any(batch.overlong_penalty != 0):
    out["overlong_penalty/mean"] = float(np.mean(batch.overlong_penalty[batch.valid]))
  out.update(per_task("entropy", per_task_means(
      {"h": batch.token_entropy}, batch.task_ids, len(T), batch.valid)["h"]))
  out.update(per_task("length", per_task_means(
      {"l": batch.lengths.astype(np.float64)}, batch.task_ids, len(T))["l"]))
  return out
