"""Checks a run makes before anything compiles, on the data it will read.

Config validation cannot know whether the prompts fit `data.prompt_buckets` or the SFT examples
fit `data.seq_len`: that depends on the records. Without this the RL stage of `--mode=all` finds
out only after SFT has run. The first records of the training mixture go through the pipeline's own
featurizers (the rules stay in `data.pipeline`); if none fit, the run stops with a one-line error
naming the field, and if most do not, it warns. The evaluation is built here too (it rejects
held-out problems that do not fit, reads the evaluation sets) and handed to the RL stage.
"""
from __future__ import annotations

import collections
import sys

from openvlthinker.eval.evaluation import Evaluation
from openvlthinker.data import pipeline, sources

PROBE_RECORDS = 64
def _probe(name: str, featurize, config: pipeline.DataConfig, source) -> None:
  mixed, _ = sources.mixed_dataset(source.by_task(), config.mixture, config.seed)
  items = [featurize(mixed[i]) for i in range(PROBE_RECORDS)]
  drops = collections.Counter(it.reason for it in items if isinstance(it, pipeline.Dropped))
  if not drops:
    return
  reason = drops.most_common(1)[0][0]
  field = pipeline.DROP_FIELDS.get(reason, "data")
  detail = (f"{sum(drops.values())} of the first {PROBE_RECORDS} {name} records do not fit "
            f"({dict(drops)})")
  if sum(drops.values()) == PROBE_RECORDS:
    raise ValueError(f"{field}: {detail}; the {name} stage would have nothing to train on")
  if 2 * sum(drops.values()) > PROBE_RECORDS:
    print(f"warning: {field}: {detail}; they are dropped and counted (records_dropped)",
          file=sys.stderr, flush=True)


def check(ctx, mode: str) -> Evaluation | None:
  """Probes the data the stages of `mode` will read; returns the RL stage's evaluation (every
  evaluation set read and featurised: a bad set stops the run here)."""
  c = ctx.config
  sft_config = ctx.data_config(c.data.batch_size)
  # One read of the data file for both probes (the stages differ only in batch size).
  source = pipeline.make_source(sft_config)
  if mode in ("sft", "all") and c.sft.steps:
    _probe("sft", pipeline.SftFeatures(sft_config, ctx.tokenizer), sft_config, source)
  if mode in ("rl", "all"):
    from openvlthinker.train.rl_stage import check_layout  # pylint: disable=g-import-not-at-top
    check_layout(c, ctx.data_shards)
    config = ctx.data_config(c.rl.prompts_per_step)
    if c.rl.steps:
      _probe("rl", pipeline.RlFeatures(config, ctx.tokenizer), config, source)
    return Evaluation.from_context(ctx)
  return None
