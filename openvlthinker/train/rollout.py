"""RL rollouts: sample G responses per prompt, score them on the host, filter groups.

Dynamic filtering (REFERENCE §4) keeps a group only when its mean accuracy lies strictly between
`low` and `high`, drawing further prompt batches (at most `max_tries` in all) until P groups are
kept. Shapes stay static: if the tries run out, the remaining slots are filled with filtered groups
marked invalid (they get no advantage and no loss). Rows are prompt-major: row b = p·G + g.

With several processes each collects its own rows (its block of the global batch; the sampler
runs on the global batch) and each data shard (`data/shards.py`) fills its own quota of P/S groups,
so the result does not depend on how shards are spread over processes; all processes draw the
same number of batches (a try runs while any shard anywhere is short).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterator

import jax
import numpy as np

from openvlthinker import multihost
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
  """This process's prompt batch → its scored RolloutBatch (this process's rows of the global
  sample) and int32[B] "unparsable"."""
  start = time.perf_counter()
  images = prompts["images"] if use_images else None
  out = sampler(params, prompts["prompt_tokens"], prompts["prompt_mask"], images, rng,
                group_size=group_size)
  out = jax.tree.map(multihost.local_rows, out)  # the rows of this process's prompts
  timings["sampling_s"] += time.perf_counter() - start
  timings["generated_tokens"] += int(out.lengths.sum())
  start = time.perf_counter()
  texts = scoring.decode_responses(tokenizer, out.tokens, out.lengths)
  pidx = np.repeat(np.arange(len(prompts["prompt_tokens"])), group_size)
  scores = scoring.score_rows(texts, prompts, pidx)
  task_ids = np.asarray(prompts["task_ids"], np.int32)[pidx]
  lengths = out.lengths
  parts = reward_fn(scores, lengths, task_ids)
  timings["scoring_s"] += time.perf_counter() - start
  b = len(pidx)
  batch = RolloutBatch(
      sequence_tokens=out.sequence_tokens, sequence_positions=out.sequence_positions,
      sequence_mask=out.sequence_mask, prefix_mask=out.prefix_mask, tokens=out.tokens,
      old_logprobs=out.logprobs, entropies=out.entropies, response_mask=out.response_mask,
      lengths=lengths, images=np.asarray(prompts["images"])[pidx] if use_images else None,
      task_ids=task_ids,
      task_keys=task_key_fn(np.asarray(prompts["problem_type"])[pidx], task_ids),
      advantages=np.zeros(b, np.float32), valid=np.ones(b, bool),
      response_start=out.response_start, **parts)
  return batch, scores["unparsable"]


def collect(sampler: Sampler, params, data_iter: Iterator[dict], tokenizer, rng, *,
            prompts: int, group_size: int, filter_groups: bool, low: float, high: float,
            max_tries: int, reward_fn: RewardFn, task_key_fn: TaskKeyFn,
            use_images: bool = True, shards: int = 1) -> Rollout:
  """Samples and scores until this process's `prompts` groups pass the filter (or `max_tries`
  batches are used). Its batches hold `shards` data shards' prompts in order; each shard keeps
  prompts / shards groups, in its own rows."""
  g = group_size
  quota = prompts // shards
  kept: list[list[RolloutBatch]] = [[] for _ in range(shards)]
  rejected: list[list[RolloutBatch]] = [[] for _ in range(shards)]
  sampled: list[dict] = []
  num_kept = np.zeros(shards, np.int64)
  tries = sampled_groups = dropped_records = 0
  timings = {"sampling_s": 0.0, "scoring_s": 0.0, "generated_tokens": 0}
  group_rows = lambda groups: (groups[:, None] * g + np.arange(g)).reshape(-1)
  while tries < max_tries and multihost.any_process(bool((num_kept < quota).any())):
    prompt_batch = next(data_iter)
    dropped_records += int(prompt_batch["num_dropped"])  # every collated batch carries it
    batch, unparsable = _sample_once(sampler, params, prompt_batch, jax.random.fold_in(rng, tries),
                                     g, tokenizer, reward_fn, task_key_fn, timings, use_images)
    tries += 1
    p = batch.size // g
    sampled_groups += p
    sampled.append({"reward": batch.reward, "accuracy": batch.accuracy, "format": batch.format,
                    "unparsable": unparsable, "task_ids": batch.task_ids})
    group_acc = batch.accuracy.reshape(p, g).mean(axis=1)
    passing = (group_acc > low) & (group_acc < high) if filter_groups else np.ones(p, bool)
    for j, groups in enumerate(np.split(np.arange(p), shards)):
      take = groups[passing[groups]][:quota - num_kept[j]]
      kept[j].append(batch.rows(group_rows(take)))
      num_kept[j] += len(take)
      rejected[j].append(batch.rows(group_rows(groups[~passing[groups]])))
  parts = []
  for j in range(shards):
    parts += kept[j]
    short = quota - num_kept[j]
    for r in rejected[j]:  # Fill the shard's static rows with invalid rows.
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
           "groups_kept": int(num_kept.sum()), "groups_invalid": prompts - int(num_kept.sum()),
           "records_dropped": dropped_records, **timings}
  return Rollout(batch=merged, stats=stats,
                 sampled={k: np.concatenate([s[k] for s in sampled]) for k in sampled[0]})
