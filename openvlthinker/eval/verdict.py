"""Did RL improve on the SFT model? The run's verdict from its held-out accuracy before and after RL.

RL counts as having learned when the mean held-out accuracy over the task types rises by at least
MIN_MEAN_GAIN, all but at most one task type improve, and no task type falls by more than one
standard error of its estimate before RL (`accuracy_se` of `evaluator.per_task`: over problems).
The run writes the verdict with its numbers in eval_table.md and eval_summary.json.
"""
from __future__ import annotations

import numpy as np

from openvlthinker import taxonomy

MIN_MEAN_GAIN = 0.05    # absolute, on the mean over task types of the held-out accuracy
MAX_NOT_IMPROVED = 1    # task types allowed not to improve (5 of 6 must)


def rl_verdict(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> dict:
  """before, after: {metric: float[num_tasks]} with "accuracy" and "accuracy_se" (NaN for absent
  tasks) → {"mean_accuracy_before", "mean_accuracy_after", "mean_accuracy_change",
  "tasks_evaluated", "tasks_improved", "tasks_lowered_beyond_se": [names], "rl_learned": bool,
  and the criteria}."""
  acc0, acc1 = (np.asarray(r["accuracy"], np.float64) for r in (before, after))
  se = np.asarray(before.get("accuracy_se", np.full(len(acc0), np.nan)), np.float64)
  present = np.isfinite(acc0) & np.isfinite(acc1)
  change = acc1 - acc0
  improved = int(np.sum(present & (change > 1e-9)))
  # A task whose standard error is unknown (one problem) counts as lowered whenever it falls.
  lowered = [taxonomy.TASK_TYPES[t] for t in np.flatnonzero(present)
             if change[t] < -(se[t] if np.isfinite(se[t]) else 0.0) - 1e-12]
  n = int(present.sum())
  mean0 = float(acc0[present].mean()) if n else float("nan")
  mean1 = float(acc1[present].mean()) if n else float("nan")
  learned = bool(n and mean1 - mean0 >= MIN_MEAN_GAIN - 1e-12
                 and improved >= n - MAX_NOT_IMPROVED and not lowered)
  return {"mean_accuracy_before": mean0, "mean_accuracy_after": mean1,
          "mean_accuracy_change": mean1 - mean0, "tasks_evaluated": n,
          "tasks_improved": improved, "tasks_lowered_beyond_se": lowered, "rl_learned": learned,
          "criteria": {"min_mean_gain": MIN_MEAN_GAIN,
                       "min_tasks_improved": max(n - MAX_NOT_IMPROVED, 0),
                       "max_drop": "one standard error of the task's accuracy before RL"}}


def format_verdict(v: dict) -> str:
  """One paragraph for eval_table.md and the run's report."""
  lowered = ", ".join(v["tasks_lowered_beyond_se"]) or "none"
  c = v["criteria"]
  head = "RL learned" if v["rl_learned"] else "RL did not clearly learn"
  return (f"{head}: mean held-out accuracy {v['mean_accuracy_before']:.3f} -> "
          f"{v['mean_accuracy_after']:.3f} ({v['mean_accuracy_change']:+.3f}; criterion "
          f">= +{c['min_mean_gain']:.2f}); {v['tasks_improved']} of {v['tasks_evaluated']} task "
          f"types improved (criterion >= {c['min_tasks_improved']}); lowered by more than one "
          f"standard error: {lowered}.")
