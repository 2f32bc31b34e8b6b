"""Host-side scoring of sampled responses: decode, score, count the unparsable.

Used by RL rollouts and by evaluation, so both score the same way. Scoring never raises on model
output; responses that do not parse score 0 accuracy and are counted.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from openvlthinker.rl import rewards


def decode_responses(tokenizer, tokens: np.ndarray, lengths: np.ndarray) -> list[str]:
  """int32[B, Lr] response tokens → B strings (each cut at its length; decode stops at eos)."""
  return [tokenizer.decode(row[:n].tolist()) for row, n in zip(np.asarray(tokens),
                                                               np.asarray(lengths))]


def score_rows(texts: Sequence[str], batch: dict, prompt_index: np.ndarray) -> dict[str, np.ndarray]:
  """Scores row b against prompt prompt_index[b] of an RL prompt batch (host fields)."""
  examples = [{"answer": batch["answer"][p], "problem_type": batch["problem_type"][p],
               "options": tuple(batch["options"][p])} for p in np.asarray(prompt_index)]
  return rewards.score_batch(list(texts), examples)


def per_task_means(values: dict[str, np.ndarray], task_ids: np.ndarray, num_tasks: int,
                   valid: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Mean of each float[B] array per task id → float[num_tasks] (NaN for absent tasks)."""
  valid = np.ones(len(task_ids), bool) if valid is None else np.asarray(valid, bool)
  counts = np.bincount(task_ids[valid], minlength=num_tasks).astype(np.float64)
  out = {}
  for key, v in values.items():
    sums = np.bincount(task_ids[valid], weights=np.asarray(v, np.float64)[valid],
                       minlength=num_tasks)
    with np.errstate(invalid="ignore", divide="ignore"):
      out[key] = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
  out["count"] = counts
  return out
