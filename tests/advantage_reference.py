"""Independent numpy (float64) references of the advantage estimators, shared by the tests of
`rl/advantages.py` and of the RL step's wiring: plain loops over groups and tasks, scipy's ndtri."""
import numpy as np
from scipy.special import ndtri


def ref_q(x) -> np.ndarray:
  """Q of REFERENCE §3 over one segment: sort, Φ⁻¹((k - 0.5)/N), average over exact ties."""
  x = np.asarray(x, np.float64)
  n = len(x)
  out = np.zeros(n)
  if n <= 1:
    return out
  order = np.argsort(x, kind="stable")
  q, xs, start = ndtri((np.arange(1, n + 1) - 0.5) / n), x[order], 0
  for end in range(1, n + 1):
    if end == n or xs[end] != xs[start]:
      out[order[start:end]] = q[start:end].mean()
      start = end
  return out


def per_segment(fn, values, ids, valid) -> np.ndarray:
  """fn applied to the valid rows of each id; 0 elsewhere."""
  values, ids, valid = np.asarray(values), np.asarray(ids), np.asarray(valid, bool)
  out = np.zeros(len(values))
  for s in np.unique(ids[valid]):
    rows = np.flatnonzero(valid & (ids == s))
    out[rows] = fn(values[rows])
  return out


def ref_g2rpo(rewards, groups, tasks, valid, decimals: int = 9) -> np.ndarray:
  """Q within each group, then Q of those within each task. Stage-1 values equal in exact
  arithmetic are ties in stage 2: float64 noise is rounded away at `decimals`."""
  stage1 = np.round(per_segment(ref_q, rewards, groups, valid), decimals)
  return per_segment(ref_q, stage1, tasks, valid)


def ref_grpo(x) -> np.ndarray:
  return np.zeros(len(x)) if len(x) < 2 else (x - x.mean()) / (x.std(ddof=1) + 1e-6)


def ref_drgrpo(x) -> np.ndarray:
  return x - x.mean()


def ref_rloo(x) -> np.ndarray:
  """r minus the mean of the group's other responses."""
  n = len(x)
  return np.zeros(n) if n < 2 else x - (x.sum() - x) / (n - 1)


def ref_gdpo_summed(groups, valid, *, parts) -> np.ndarray:
  """GDPO's first stage: GRPO of each reward part per group, summed per row."""
  return sum(per_segment(ref_grpo, np.asarray(parts, np.float64)[:, k], groups, valid)
             for k in range(np.shape(parts)[1]))


def ref_gdpo(rewards, groups, tasks, valid, *, parts, lengths) -> np.ndarray:
  """GRPO of each reward part per group, summed, whitened over the valid tokens (length-weighted
  mean and population std, + 1e-6)."""
  del rewards, tasks
  summed = ref_gdpo_summed(groups, valid, parts=parts)
  w = np.where(valid, np.asarray(lengths, np.float64), 0.0)
  total = max(w.sum(), 1.0)
  mean = (w * summed).sum() / total
  std = np.sqrt((w * (summed - mean) ** 2).sum() / total)
  return np.where(valid, (summed - mean) / (std + 1e-6), 0.0)


def ref_gs_gdpo(rewards, groups, tasks, valid, *, parts, lengths, decimals: int = 9) -> np.ndarray:
  """Q of each reward part per group, summed, then Q per task (float64 noise rounded away)."""
  del lengths
  summed = sum(per_segment(ref_q, np.asarray(parts, np.float64)[:, k], groups, valid)
               for k in range(np.shape(parts)[1]))
  return per_segment(ref_q, np.round(summed, decimals), tasks, valid)


# Estimator name → fn(rewards, group_ids, task_ids, valid[, *, parts, lengths]) -> float64[B]
# (the keywords for the estimators of the reward's parts).
REFERENCES = {
    "gdpo": ref_gdpo,
    "gs_gdpo": ref_gs_gdpo,
    "g2rpo": ref_g2rpo,
    "g2rpo_group": lambda r, g, t, v: per_segment(ref_q, r, g, v),
    "grpo": lambda r, g, t, v: per_segment(ref_grpo, r, g, v),
    "drgrpo": lambda r, g, t, v: per_segment(ref_drgrpo, r, g, v),
    "rloo": lambda r, g, t, v: per_segment(ref_rloo, r, g, v),
}
