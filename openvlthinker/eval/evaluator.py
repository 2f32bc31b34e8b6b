"""Evaluation of a policy on fixed sets of problems: the suite's held-out split and JSON sets.

An `Evaluator` holds one set, featurised once and batched by prompt bucket (every batch has the
same number of prompts, padded with repeats, so each bucket compiles once). `sample(params, rng)`
decodes K samples per problem with the training sampler (greedy, or at the configured temperature
and top-p), scores them with the training scorer, and returns `Samples`; `__call__` reduces them to
per-task means (accuracy, overall reward without the length term, format rate, mean response
length, unparsable rate), what the RL stage's report and the sweep tables compare.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Sequence

import numpy as np

from openvlthinker import multihost, taxonomy
from openvlthinker.data import json_source, pipeline
from openvlthinker.data import tokenizer as tokenizer_lib
from openvlthinker.eval import metrics
from openvlthinker.eval.sets import SUITE_SET, Decoding, EvalSet, parse_sets
from openvlthinker.eval.sources import suite_heldout
from openvlthinker.rl import rewards, scoring
from openvlthinker.sampler import Sampler, SamplerConfig
from openvlthinker.tasks.base import Example

METRICS = ("accuracy", "overall", "format", "length", "unparsable")


@dataclasses.dataclass
class Samples:
  """What an evaluation of one set produced: P problems × K samples.

  problems: P dicts (uid, task_type, problem_type, answer, options); texts: [P][K] responses;
  parts: float64[P, K] arrays of METRICS; task_ids int32[P]; dropped: {reason: count} of the
  set's records that could not be evaluated (missing or undecodable image, unknown type, prompt
  longer than the buckets, ...).
  """
  name: str
  problems: list[dict]
  texts: list[list[str]]
  parts: dict[str, np.ndarray]
  task_ids: np.ndarray
  dropped: dict[str, int]


class Evaluator:
  """One evaluation set. `sample(params, rng) -> Samples`; `__call__(params, rng) ->
  {metric: float[num_tasks]}` (`per_task`)."""

  def __init__(self, graphdef, source: Sequence[Example | json_source.BadRecord],
               data_config: pipeline.DataConfig, tokenizer, *, batch_size: int,
               max_new_tokens: int, sharder, description: str = "a custom source",
               decoding: Decoding = Decoding(), name: str = SUITE_SET,
               skip_unusable: bool = False, skipped: Sequence[str] = ()):
    """batch_size: rows (prompts × num_samples) per sampler call. skip_unusable: count the
    problems that cannot be featurised instead of raising; skipped: reasons of records the
    source already left out (counted in `dropped`)."""
    featurize = pipeline.RlFeatures(data_config, tokenizer)
    items = [featurize(example) for example in source]
    dropped = [it for it in items if isinstance(it, pipeline.Dropped)]
    if dropped and not skip_unusable:
      first = dropped[0]
      raise ValueError(f"{pipeline.DROP_FIELDS.get(first.reason, 'data')}: {len(dropped)} of the "
                       f"{len(items)} evaluation problems cannot be used (first: {first.uid!r}, "
                       f"{first.reason}; the largest prompt bucket is "
                       f"{data_config.prompt_buckets[-1]})")
    self.dropped = dict(collections.Counter([d.reason for d in dropped] + list(skipped)))
    self.items = [it for it in items if not isinstance(it, pipeline.Dropped)]
    if not self.items:
      raise ValueError(f"eval set {name}: none of its {len(items) + len(skipped)} problems can be "
                       f"evaluated ({self.dropped})")
    self.name, self.description, self.decoding = name, description, decoding
    self.tokenizer = tokenizer
    # Every process takes an equal block of each batch's prompts.
    prompts = -(-max(1, batch_size // decoding.num_samples) // multihost.count()) * multihost.count()
    self.batches = _bucketed_batches(self.items, prompts, tuple(data_config.prompt_buckets))
    self.sampler = Sampler(graphdef, SamplerConfig(
        max_new_tokens=max_new_tokens, greedy=decoding.greedy,
        temperature=decoding.temperature or 1.0, top_p=decoding.top_p,
        **tokenizer_lib.sampler_ids(tokenizer), prompt_buckets=tuple(data_config.prompt_buckets)),
        sharder)

  def sample(self, params, rng) -> Samples:
    """K samples of every problem. Problem i draws from its own random stream (prompt id i), so
    its samples do not depend on how the set is batched."""
    p, k = len(self.items), self.decoding.num_samples
    parts = {m: np.zeros((p, k), np.float64) for m in METRICS}
    texts: list[list[str]] = [[] for _ in range(p)]
    for index, valid, batch in self.batches:
      # Each process samples its block of the batch's prompts; every process scores all rows.
      mine = multihost.block(len(index))
      out = self.sampler(params, batch["prompt_tokens"][mine], batch["prompt_mask"][mine],
                         batch["images"][mine], rng, group_size=k, prompt_ids=index[mine])
      lengths = multihost.all_rows(out.lengths)
      decoded = scoring.decode_responses(self.tokenizer, multihost.all_rows(out.tokens), lengths)
      rows = np.repeat(np.arange(len(index)), k)  # prompt-major rows, b = prompt · K + sample
      scores = scoring.score_rows(decoded, batch, rows)
      scores["length"] = lengths
      for m in METRICS:
        parts[m][index[valid]] = np.asarray(scores[m], np.float64).reshape(-1, k)[valid]
      for j in np.flatnonzero(valid):
        texts[index[j]] = decoded[j * k:(j + 1) * k]
    problems = [{key: it[key] for key in ("uid", "task_type", "problem_type", "answer",
                                          "options")} for it in self.items]
    return Samples(self.name, problems, texts, parts,
                   np.asarray([it["task_id"] for it in self.items], np.int32), dict(self.dropped))

  def __call__(self, params, rng) -> dict[str, np.ndarray]:
    return per_task([self.sample(params, rng)])


def per_task(all_samples: Sequence[Samples]) -> dict[str, np.ndarray]:
  """{metric: float[num_tasks]} means over every sample of every given set, per task type (NaN
  where a task is absent; "count" the samples), and "accuracy_se": the standard error of each
  task's mean accuracy, over its problems (each problem's accuracy averaged over its K samples,
  so K samples of one problem count once)."""
  k = all_samples[0].parts["accuracy"].shape[1]
  parts = {m: np.concatenate([s.parts[m].reshape(-1) for s in all_samples])
           for m in all_samples[0].parts}
  task_ids = np.concatenate([np.repeat(s.task_ids, k) for s in all_samples])
  out = scoring.per_task_means(parts, task_ids, taxonomy.NUM_TASKS)
  problem_acc = np.concatenate([s.parts["accuracy"].mean(axis=1) for s in all_samples])
  problem_task = np.concatenate([s.task_ids for s in all_samples])
  out["accuracy_se"] = np.asarray([metrics.standard_error(problem_acc[problem_task == t])
                                   for t in range(taxonomy.NUM_TASKS)])
  return out


def _bucketed_batches(items: Sequence[dict], prompts: int, buckets: tuple[int, ...]
                      ) -> list[tuple[np.ndarray, np.ndarray, dict]]:
  """[(problem index int32[P], valid bool[P], collated batch)]: problems grouped by the smallest
  bucket holding their prompt, `prompts` to a batch, the last one of a bucket padded by repeating
  its first problem (valid False)."""
  bucket_of = [pipeline.prompt_bucket(len(it["prompt"]), buckets) for it in items]
  out = []
  for bucket in sorted(set(bucket_of)):
    members = [i for i, b in enumerate(bucket_of) if b == bucket]
    for start in range(0, len(members), prompts):
      chunk = members[start:start + prompts]
      index = np.asarray(chunk + [chunk[0]] * (prompts - len(chunk)), np.int32)
      valid = np.arange(prompts) < len(chunk)
      out.append((index, valid, pipeline.collate_rl([items[i] for i in index], 0, buckets)))
  return out


def eval_tasks(mixture) -> tuple[str, ...]:
  """The task types a run trains on (positive mixture weight), in taxonomy order."""
  weights = {taxonomy.canonical_task_type(t): w for t, w in dict(mixture).items()}
  return tuple(t for t in taxonomy.TASK_TYPES if weights.get(t, 0) > 0)


def decoding_from_config(e) -> Decoding:
  """The `config.eval` section's decoding settings."""
  return Decoding(num_samples=e.num_samples, temperature=e.temperature, top_p=e.top_p,
                  pass_threshold=e.pass_threshold)


def build_evaluator(ctx) -> Evaluator:
  """The run's evaluator (`config.eval`) on the suite's held-out split of the tasks it trains on,
  from a train Context."""
  c = ctx.config
  data_config = ctx.data_config(c.eval.batch_size, "eval")
  tasks = eval_tasks(c.data.mixture)
  source = suite_heldout(c.eval.num_per_task, data_config.image_size, data_config.difficulty,
                         tasks)
  description = (f"the procedural suite's held-out split, {c.eval.num_per_task} problems per "
                 f"task of {', '.join(tasks)}")
  if c.data.source != "suite" and not c.eval.sets:
    description += (f" (not data.path={c.data.path}: this run trains on data.source="
                    f"{c.data.source}; name held-out files in eval.sets)")
  return Evaluator(ctx.graphdef, source, data_config, ctx.tokenizer,
                   batch_size=c.eval.batch_size, max_new_tokens=c.eval.max_new_tokens,
                   sharder=ctx.sharder, description=description,
                   decoding=decoding_from_config(c.eval))


def build_set_evaluator(ctx, spec: EvalSet) -> Evaluator:
  """An evaluator on one JSON set. Its bad records (a missing or undecodable image, an unknown
  problem or task type, an answer no response could match, a prompt too long for the buckets)
  are counted per reason and left out; the rest is evaluated."""
  c = ctx.config
  data_config = ctx.data_config(c.eval.batch_size, "eval")
  source = json_source.JsonSource(spec.path, spec.image_root, skip_bad_records=True,
                                  max_image_pixels=data_config.max_image_pixels)
  skipped = [json_source.skip_kind(why).replace(" ", "_") for _, why in source.skipped]
  return Evaluator(ctx.graphdef, [source[i] for i in range(len(source))], data_config,
                   ctx.tokenizer, batch_size=c.eval.batch_size,
                   max_new_tokens=c.eval.max_new_tokens, sharder=ctx.sharder,
                   description=f"{spec.name} ({spec.path})", decoding=decoding_from_config(c.eval),
                   name=spec.name, skip_unusable=True, skipped=skipped)


def build_evaluators(ctx) -> list[Evaluator]:
  """Every evaluator of `config.eval`: the suite's held-out split first (when `eval.suite`), then
  each of `eval.sets` in order."""
  c = ctx.config
  out = [build_evaluator(ctx)] if c.eval.suite else []
  for spec in parse_sets(c.eval.sets, c.eval.image_roots):
    out.append(build_set_evaluator(ctx, spec))
  return out


def format_table(results: dict[str, dict[str, np.ndarray]], metric: str = "overall") -> str:
  """Markdown table: one row per task, one column per named evaluation (e.g. sft, rl)."""
  names = list(results)
  lines = ["| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
  for t, task in enumerate(taxonomy.TASK_TYPES):
    cells = [results[n][metric][t] for n in names]
    if all(np.isnan(c) for c in cells):
      continue
    lines.append(f"| {task} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
  means = [np.nanmean(results[n][metric]) for n in names]
  lines.append("| **mean** | " + " | ".join(f"**{m:.3f}**" for m in means) + " |")
  return "\n".join(lines)


def parsed_answer(text: str) -> str:
  """The `<answer>` content a response's score was computed from ('' when it has none)."""
  return (rewards.extract_answer(text) or "")[:200]
