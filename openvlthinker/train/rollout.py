"""RL rollouts: sample G responses per prompt, score them on the host, filter groups.

Dynamic filtering (REFERENCE §4) keeps a group only when its mean accuracy lies strictly between
`low` and `high`, drawing further prompt batches (at most `max_tries` in all) until P groups are
kept. Shapes stay static: if the tries run out, the remaining slots are filled with filtered groups
marked invalid (they get no advantage and no loss). Rows are prompt-major: row b = p·G + g.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterator

import jax
import numpy as np

from openvlthinker.rl import scoring
from openvlthinker.sampler import Sampler
from openvlthinker.train import batch as batch_lib
from openvlthinker.train.batch import RolloutBatch

# (scores, lengths, task_ids) → the reward and its parts, float32[B] each (train.reward).
RewardFn = Callable[[dict, np.ndarray, np.ndarray], dict]
TaskKeyFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclasses.dataclass
class Rollout:
  """P·G scored responses on the host, ready for the update, and what the step logs."""
  batch: RolloutBatch              # numpy fields; advantages still zero
  stats: dict[str, float]          # tries, groups kept, timings, generated tokens
  sampled: dict[str, np.ndarray]   # every response sampled, filtered or not: reward parts,
                                   # "unparsable", "task_ids"


def _sample_once(sampler: Sampler, params, prompts: dict, rng, group_size: int, tokenizer,
                 reward_fn: RewardFn, task_key_fn: TaskKeyFn, timings: dict[str, float],
                 use_images: bool) -> tuple[RolloutBatch, np.ndarray]:
  """One prompt batch → its scored RolloutBatch and int32[B] "unparsable"."""
  start = time.perf_counter()
  images = prompts["images"] if use_images else None
  out = jax.device_get(sampler(params, prompts["prompt_tokens"], prompts["prompt_mask"], images,
                               rng, group_size=group_size))
  timings["sampling_s"] += time.perf_counter() - start
  timings["generated_tokens"] += int(np.asarray(out.lengths).sum())
  start = time.perf_counter()
  texts = scoring.decode_responses(tokenizer, out.tokens, out.lengths)
  pidx = np.asarray(out.prompt_index)
  scores = scoring.score_rows(texts, prompts, pidx)
  task_ids = np.asarray(prompts["task_ids"], np.int32)[pidx]
  lengths = np.asarray(out.lengths)
  parts = reward_fn(scores, lengths, task_ids)
  timings["scoring_s"] += time.perf_counter() - start
  b = len(pidx)
  batch = RolloutBatch(
      sequence_tokens=np.asarray(out.sequence_tokens),
      sequence_positions=jax.tree.map(np.asarray, out.sequence_positions),
      sequence_mask=np.asarray(out.sequence_mask), prefix_mask=np.asarray(out.prefix_mask),
      tokens=np.asarray(out.tokens), old_logprobs=np.asarray(out.logprobs),
      entropies=np.asarray(out.entropies), response_mask=np.asarray(out.response_mask),
      lengths=lengths, images=np.asarray(prompts["images"])[pidx] if use_images else None,
      task_ids=task_ids,
      task_keys=task_key_fn(np.asarray(prompts["problem_type"])[pidx], task_ids),
      advantages=np.zeros(b, np.float32), valid=np.ones(b, bool),
      response_start=out.response_start, **parts)
  return batch, scores["unparsable"]


def collect(sampler: Sampler, params, data_iter: Iterator[dict], tokenizer, rng, *,
            prompts: int, group_size: int, filter_groups: bool, low: float, high: float,
            max_tries: int, reward_fn: RewardFn, task_key_fn: TaskKeyFn,
            use_images: bool = True) -> Rollout:
  """Samples and scores until `prompts` groups pass the filter (or `max_tries` batches are used)."""
  g = group_size
  kept: list[RolloutBatch] = []
  rejected: list[RolloutBatch] = []
  sampled: list[dict] = []
  num_kept = tries = sampled_groups = dropped_records = 0
  timings = {"sampling_s": 0.0, "scoring_s": 0.0, "generated_tokens": 0}
  while num_kept < prompts and tries < max_tries:
    prompt_batch = next(data_iter)
    dropped_records += int(prompt_batch.get("num_dropped", 0))
    batch, unparsable = _sample_once(sampler, params, prompt_batch, jax.random.fold_in(rng, tries),
                                     g, tokenizer, reward_fn, task_key_fn, timings, use_images)
    tries += 1
    p = batch.size // g
    sampled_groups += p
    sampled.append({"reward": batch.reward, "accuracy": batch.accuracy, "format": batch.format,
                    "length_reward": batch.length_reward, "unparsable": unparsable,
                    "task_ids": batch.task_ids})
    group_acc = batch.accuracy.reshape(p, g).mean(axis=1)
    passing = (group_acc > low) & (group_acc < high) if filter_groups else np.ones(p, bool)
    take = np.flatnonzero(passing)[:prompts - num_kept]
    kept.append(batch.rows((take[:, None] * g + np.arange(g)).reshape(-1)))
    num_kept += len(take)
    rest = np.flatnonzero(~passing)
    rejected.append(batch.rows((rest[:, None] * g + np.arange(g)).reshape(-1)))
  short = prompts - num_kept
  parts = list(kept)
  for r in rejected:  # Fill the static batch with invalid rows.
    if short <= 0:
      break
    r = r.rows(slice(0, short * g))
    short -= r.size // g
    parts.append(r.replace(valid=np.zeros(r.size, bool),
                           response_mask=np.zeros_like(r.response_mask)))
  merged = batch_lib.concatenate(parts)  # Empty parts too: they set the prompt width.
  if merged.size != prompts * g:
    raise RuntimeError(f"rollout: assembled {merged.size} rows, expected {prompts * g}")
  stats = {"rollout_tries": tries, "groups_sampled": sampled_groups,
           "groups_kept": num_kept, "groups_invalid": prompts - num_kept,
           "records_dropped": dropped_records, **timings}
  return Rollout(batch=merged, stats=stats,
                 sampled={k: np.concatenate([s[k] for s in sampled]) for k in sampled[0]})
