"""Sampled-evaluation statistics: mean@K, unbiased pass@k, and their 95 % intervals.

With K samples per problem, mean@K is the expected accuracy of one sample (the mean over problems
of each problem's mean accuracy over its K samples); pass@k (k ≤ K) is the probability that at
least one of k samples passes, estimated without bias from the K as 1 − C(K − c, k) / C(K, k) for a
problem with c passing samples (Chen et al., 2021). Both are means over problems of a per-problem
value, so their 95 % interval is the normal approximation mean ± 1.96 · s / √P (s the sample
standard deviation of the per-problem values; 0 when P = 1).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

Z_95 = 1.959963984540054


def pass_at_k(n: int, c: np.ndarray, k: int) -> np.ndarray:
  """Unbiased pass@k of problems with c int[P] passing samples out of n each → float64[P]."""
  c = np.asarray(c, np.int64)
  if not 1 <= k <= n:
    raise ValueError(f"pass@k: expected 1 <= k <= n={n}, got k={k}")
  if np.any((c < 0) | (c > n)):
    raise ValueError(f"pass@k: passing counts must lie in [0, {n}]")
  # 1 - prod_{i = n-c+1}^{n} (1 - k / i): the ratio of binomials without overflowing them.
  out = np.ones(c.shape, np.float64)
  for idx in np.ndindex(c.shape):
    if n - c[idx] >= k:
      i = np.arange(n - c[idx] + 1, n + 1, dtype=np.float64)
      out[idx] = 1.0 - np.prod(1.0 - k / i)
  return out


def standard_error(values: np.ndarray) -> float:
  """s / √P of per-problem values float[P] (s with ddof 1); NaN when P < 2."""
  values = np.asarray(values, np.float64)
  if values.size < 2:
    return float("nan")
  return float(values.std(ddof=1) / np.sqrt(values.size))


def interval(values: np.ndarray) -> tuple[float, float]:
  """(mean, half-width of the 95 % normal interval) of per-problem values float[P]."""
  values = np.asarray(values, np.float64)
  if values.size == 0:
    return float("nan"), float("nan")
  half = Z_95 * standard_error(values) if values.size > 1 else 0.0
  return float(values.mean()), float(half)


def default_ks(num_samples: int) -> tuple[int, ...]:
  """The k reported for K samples: 1, the powers of two below K, and K."""
  ks = {1, num_samples}
  k = 2
  while k < num_samples:
    ks.add(k)
    k *= 2
  return tuple(sorted(ks))


def summarize(accuracy: np.ndarray, passed: np.ndarray, ks: Sequence[int] | None = None
              ) -> dict[str, float]:
  """accuracy float[P, K] and passed bool[P, K] of P problems' K samples →
  {"problems", "samples", "mean@K", "mean@K_ci", "pass@k", "pass@k_ci" for each k}."""
  accuracy = np.asarray(accuracy, np.float64)
  passed = np.asarray(passed, bool)
  if accuracy.ndim != 2 or passed.shape != accuracy.shape:
    raise ValueError(f"summarize: expected accuracy and passed of one shape [P, K], got "
                     f"{accuracy.shape} and {passed.shape}")
  p, k_all = accuracy.shape
  out: dict[str, float] = {"problems": p, "samples": k_all}
  mean, half = interval(accuracy.mean(axis=1)) if p else (float("nan"), float("nan"))
  out[f"mean@{k_all}"], out[f"mean@{k_all}_ci"] = mean, half
  counts = passed.sum(axis=1)
  for k in ks or default_ks(k_all):
    per_problem = pass_at_k(k_all, counts, k) if p else np.zeros(0)
    out[f"pass@{k}"], out[f"pass@{k}_ci"] = interval(per_problem)
  return out


def summarize_groups(accuracy: np.ndarray, passed: np.ndarray, labels: Sequence[str],
                     ks: Sequence[int] | None = None) -> dict[str, dict[str, float]]:
  """`summarize` of the problems of each label (labels str[P]), in first-seen order."""
  labels = np.asarray(labels, dtype=object)
  return {name: summarize(accuracy[labels == name], passed[labels == name], ks)
          for name in dict.fromkeys(labels.tolist())}
