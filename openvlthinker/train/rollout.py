"""RL rollouts: sample G responses per prompt, score them on the host, filter groups.

Dynamic filtering (REFERENCE §4) keeps a group only when its mean accuracy lies strictly between
`low` and `high`, drawing further prompt batches (at most `max_tries` in all) until P groups are
kept. Shapes stay static: if the tries run out, the remaining slots are filled with filtered groups
marked invalid (they get no advantage and no loss). Rows are prompt-major: row b = p·G + g.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Iterator

import jax
import numpy as np

from openvlthinker.sampler import Sampler
from openvlthinker.train import scoring

SCORE_KEYS = ("format", "accuracy", "structure", "overall", "unparsable")
HOST_KEYS = ("answer", "problem_type", "task_type", "uid", "options", "meta")


@dataclasses.dataclass
class Rollout:
  """P·G scored responses on the host (numpy), ready for the update."""
  arrays: dict[str, np.ndarray]   # device-bound, leading axis B (see `collect`)
  scores: dict[str, np.ndarray]   # float32[B] each, SCORE_KEYS
  valid: np.ndarray               # bool[B]: row takes part in advantages and loss
  response_start: int
  texts: list[str]
  problem_types: np.ndarray       # str[B]
  stats: dict[str, float]
  sampled_scores: dict[str, np.ndarray]  # every response sampled, filtered or not
  sampled_task_ids: np.ndarray


def _left_pad(x: np.ndarray, width: int, value) -> np.ndarray:
  pad = width - x.shape[1]
  if pad == 0:
    return x
  return np.concatenate([np.full((x.shape[0], pad) + x.shape[2:], value, x.dtype), x], axis=1)


def _sample_once(sampler: Sampler, params, batch: dict, rng, group_size: int, tokenizer,
                 timings: dict[str, float], use_images: bool):
  start = time.perf_counter()
  images = batch["images"] if use_images else None
  out = jax.device_get(sampler(params, batch["prompt_tokens"], batch["prompt_mask"], images, rng,
                               group_size=group_size))
  timings["sampling_s"] += time.perf_counter() - start
  timings["generated_tokens"] += int(np.asarray(out.lengths).sum())
  start = time.perf_counter()
  texts = scoring.decode_responses(tokenizer, out.tokens, out.lengths)
  scores = scoring.score_rows(texts, batch, out.prompt_index)
  timings["scoring_s"] += time.perf_counter() - start
  pidx = np.asarray(out.prompt_index)
  arrays = {
      "sequence_tokens": np.asarray(out.sequence_tokens),
      "sequence_positions": np.asarray(out.sequence_positions),
      "sequence_mask": np.asarray(out.sequence_mask),
      "prefix_mask": np.asarray(out.prefix_mask),
      "tokens": np.asarray(out.tokens), "old_logprobs": np.asarray(out.logprobs),
      "entropies": np.asarray(out.entropies), "response_mask": np.asarray(out.response_mask),
      "lengths": np.asarray(out.lengths), "task_ids": np.asarray(batch["task_ids"])[pidx],
  }
  if use_images:
    arrays["images"] = np.asarray(batch["images"])[pidx]
  host = {k: np.asarray(batch[k])[pidx] for k in HOST_KEYS}
  return arrays, scores, texts, host, out.response_start


def collect(sampler: Sampler, params, data_iter: Iterator[dict], tokenizer, rng, *,
            prompts: int, group_size: int, filter_groups: bool, low: float, high: float,
            max_tries: int, use_images: bool = True) -> Rollout:
  """Samples and scores until `prompts` groups pass the filter (or `max_tries` batches are used)."""
  g = group_size
  kept: list[tuple] = []       # (arrays, scores, texts, host, response_start, row indices)
  rejected: list[tuple] = []
  num_kept = tries = sampled_groups = dropped_records = 0
  all_scores = {k: [] for k in SCORE_KEYS}
  all_tasks = []
  timings = {"sampling_s": 0.0, "scoring_s": 0.0, "generated_tokens": 0}
  while num_kept < prompts and tries < max_tries:
    batch = next(data_iter)
    dropped_records += int(batch.get("num_dropped", 0))
    arrays, scores, texts, host, start = _sample_once(
        sampler, params, batch, jax.random.fold_in(rng, tries), g, tokenizer, timings, use_images)
    tries += 1
    p = len(batch["prompt_tokens"])
    sampled_groups += p
    for k in SCORE_KEYS:
      all_scores[k].append(scores[k])
    all_tasks.append(arrays["task_ids"])
    group_acc = scores["accuracy"].reshape(p, g).mean(axis=1)
    passing = (group_acc > low) & (group_acc < high) if filter_groups else np.ones(p, bool)
    take = np.flatnonzero(passing)[:prompts - num_kept]
    rows = (take[:, None] * g + np.arange(g)).reshape(-1)
    kept.append((arrays, scores, texts, host, start, rows))
    num_kept += len(take)
    rest = np.flatnonzero(~passing)
    rejected.append((arrays, scores, texts, host, start, (rest[:, None] * g + np.arange(g))
                     .reshape(-1)))
  short = prompts - num_kept
  parts = [(a, s, t, h, st, r, True) for a, s, t, h, st, r in kept]
  for a, s, t, h, st, r in rejected:  # Fill the static batch with invalid rows.
    if short <= 0:
      break
    r = r[:short * g]
    short -= len(r) // g
    parts.append((a, s, t, h, st, r, False))
  width = max(p[4] for p in parts)
  arrays: dict[str, list] = {}
  for a, _, _, _, _, rows, _ in parts:
    for k, v in a.items():
      arrays.setdefault(k, []).append(v[rows])
  # Sequences from batches of different prompt buckets: left-pad the prompt side to one width.
  for k, pad in (("sequence_tokens", 0), ("sequence_positions", 0), ("sequence_mask", False),
                 ("prefix_mask", False)):
    arrays[k] = [_left_pad(v, width + arrays["tokens"][0].shape[1], pad) for v in arrays[k]]
  merged = {k: np.concatenate(v) for k, v in arrays.items()}
  scores = {k: np.concatenate([s[k][rows] for _, s, _, _, _, rows, _ in parts]) for k in SCORE_KEYS}
  texts = [t[i] for _, _, t, _, _, rows, _ in parts for i in rows]
  problem_types = np.concatenate([h["problem_type"][rows] for _, _, _, h, _, rows, _ in parts])
  valid = np.concatenate([np.full(len(rows), ok) for *_, rows, ok in parts])
  if len(valid) != prompts * g:
    raise RuntimeError(f"rollout: assembled {len(valid)} rows, expected {prompts * g}")
  sampled = {k: np.concatenate(v) for k, v in all_scores.items()}
  stats = {"rollout_tries": tries, "groups_sampled": sampled_groups,
           "groups_kept": num_kept, "groups_invalid": prompts - num_kept,
           "records_dropped": dropped_records, **timings}
  return Rollout(arrays=merged, scores=scores, valid=valid, response_start=width, texts=texts,
                 problem_types=problem_types, stats=stats, sampled_scores=sampled,
                 sampled_task_ids=np.concatenate(all_tasks))
