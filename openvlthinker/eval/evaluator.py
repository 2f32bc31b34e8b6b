"""Greedy per-task evaluation of a policy on a source of problems (`eval.sources`).

Reports per task: accuracy, overall reward (without the length term), format rate, mean response
length, unparsable rate. The problems are featurised and batched once; each call decodes them all.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from openvlthinker import taxonomy
from openvlthinker.data import pipeline
from openvlthinker.data import tokenizer as tokenizer_lib
from openvlthinker.eval.sources import suite_heldout
from openvlthinker.rl import scoring
from openvlthinker.sampler import Sampler, SamplerConfig
from openvlthinker.tasks.base import Example

METRICS = ("accuracy", "overall", "format", "length", "unparsable")


class Evaluator:
  """Greedy decoding over a fixed held-out set; `__call__(params) -> {metric: float[num_tasks]}`."""

  def __init__(self, graphdef, source: Sequence[Example], data_config: pipeline.DataConfig,
               tokenizer, *, batch_size: int, max_new_tokens: int, sharder,
               description: str = "a custom source"):
    featurize = pipeline.RlFeatures(data_config, tokenizer)
    items = [featurize(example) for example in source]
    dropped = [it for it in items if isinstance(it, pipeline.Dropped)]
    if dropped:
      first = dropped[0]
      raise ValueError(f"{pipeline.DROP_FIELDS.get(first.reason, 'data')}: {len(dropped)} of the "
                       f"{len(items)} evaluation problems cannot be used (first: {first.uid!r}, "
                       f"{first.reason}; the largest prompt bucket is "
                       f"{data_config.prompt_buckets[-1]})")
    self.description = description  # which problems, for the reports
    self.batches = [pipeline.collate_rl(items[i:i + batch_size], 0, data_config.prompt_buckets)
                    for i in range(0, len(items), batch_size)]
    self.tokenizer = tokenizer
    self.sampler = Sampler(graphdef, SamplerConfig(
        max_new_tokens=max_new_tokens, greedy=True, **tokenizer_lib.sampler_ids(tokenizer),
        prompt_buckets=tuple(data_config.prompt_buckets)), sharder)

  def __call__(self, params, rng) -> dict[str, np.ndarray]:
    parts = {k: [] for k in METRICS}
    task_ids = []
    for batch in self.batches:
      out = self.sampler(params, batch["prompt_tokens"], batch["prompt_mask"], batch["images"],
                         rng, group_size=1)
      lengths = np.asarray(out.lengths)
      texts = scoring.decode_responses(self.tokenizer, np.asarray(out.tokens), lengths)
      scores = scoring.score_rows(texts, batch, np.arange(len(texts)))
      for k in ("accuracy", "overall", "format", "unparsable"):
        parts[k].append(scores[k])
      parts["length"].append(lengths)
      task_ids.append(batch["task_ids"])
    task_ids = np.concatenate(task_ids)
    values = {k: np.concatenate(v).astype(np.float64) for k, v in parts.items()}
    return scoring.per_task_means(values, task_ids, taxonomy.NUM_TASKS)


def eval_tasks(mixture) -> tuple[str, ...]:
  """The task types a run trains on (positive mixture weight), in taxonomy order."""
  weights = {taxonomy.canonical_task_type(t): w for t, w in dict(mixture).items()}
  return tuple(t for t in taxonomy.TASK_TYPES if weights.get(t, 0) > 0)


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
  if c.data.source != "suite":  # Evaluation sets from files come with #10; say what this is.
    description += f" (not data.path={c.data.path}: this run trains on data.source={c.data.source})"
  return Evaluator(ctx.graphdef, source, data_config, ctx.tokenizer,
                   batch_size=c.eval.batch_size, max_new_tokens=c.eval.max_new_tokens,
                   sharder=ctx.sharder, description=description)


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
