"""Seconds per RL step (sampling, scoring, update) and tokens/s, at a config's size.

Prints one JSON line: sampling_s, scoring_s, update_s, step_s, tokens_per_s (medians over the
measured steps, after warm-up steps that compile), plus the spread.

  python benchmarks/rl_step.py --config=configs/default.py [--config.rl.group_size=8 ...]
  python benchmarks/rl_step.py --matched   # the size peers were measured at on this machine:
      text model, vocab 1024, width 256, 4 layers, 4 heads (2 KV), head dim 64, MLP 1024,
      8 prompts × 8 responses, 64-token prompts, 64 new tokens, no reference model, no early stop.

With vision enabled, prompts come from the suite's RL pipeline; a text-only model gets random
64-token prompts (scored against the suite's answer format, which they fail: scoring still runs).
"""
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Config file.")
_MATCHED = flags.DEFINE_bool("matched", False, "Use the peer-matched text-only size.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Steps run before timing (they compile).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps.")


def matched(c):
  c.model.update(vocab_size=1024, width=256, num_layers=4, num_heads=4, num_kv_heads=2,
                 head_dim=64, mlp_dim=1024, dtype="float32")
  c.model.vision.enabled = False
  c.rl.update(prompts_per_step=8, group_size=8, updates_per_rollout=1, micro_batch_size=64)
  c.rl.sampler.max_new_tokens = 64
  c.rl.loss.kl_coef = 0.0
  c.rl.filter.enabled = False
  c.data.prompt_buckets = (64,)
  return c


def synthetic_prompts(tokenizer, prompts: int, length: int, seed: int):
  """An endless iterator of random text prompt batches in the RL pipeline's batch format."""
  import numpy as np
  rng = np.random.default_rng(seed)
  low = 16  # Past the special and tag ids.
  while True:
    tokens = rng.integers(low, tokenizer.vocab_size, (prompts, length)).astype(np.int32)
    tokens[:, 0] = tokenizer.bos_id
    yield {"prompt_tokens": tokens, "prompt_mask": np.ones_like(tokens, bool),
           "images": None, "task_ids": np.full(prompts, 1, np.int32),
           "answer": np.full(prompts, "3"), "problem_type": np.full(prompts, "numerical"),
           "task_type": np.full(prompts, "spatial_reasoning"), "uid": np.full(prompts, "x"),
           "options": np.array([()] * prompts + [None], object)[:-1],
           "meta": np.array([{}] * prompts, object),
           "num_dropped": np.int32(0)}


def main(argv):
  del argv
  from openvlthinker import configuration
  from openvlthinker.data import pipeline
  from openvlthinker.metrics import MetricsWriter
  from openvlthinker.train.context import build_context
  from openvlthinker.train.rl_stage import RLStage

  c = configuration.validate(matched(_CONFIG.value) if _MATCHED.value else _CONFIG.value)
  workdir = tempfile.mkdtemp(prefix="rl_step_bench_")
  ctx = build_context(c, workdir)
  stage = RLStage(ctx, MetricsWriter(workdir, tensorboard=False))
  if c.model.vision.enabled:
    data = iter(pipeline.rl_dataset(ctx.data_config(c.rl.prompts_per_step), ctx.tokenizer))
  else:
    data = synthetic_prompts(ctx.tokenizer, c.rl.prompts_per_step, c.data.prompt_buckets[0],
                             c.seed)
  if _MATCHED.value:  # No early stop: every row generates max_new_tokens.
    import dataclasses
    from openvlthinker.sampler import Sampler
    stage.sampler_config = dataclasses.replace(stage.sampler_config, stop_tokens=())
    stage.sampler = Sampler(ctx.graphdef, stage.sampler_config, ctx.sharder)
  state = stage.initial_state(ctx.initial_params)
  rows = []
  for step in range(_WARMUP.value + _STEPS.value):
    state, m = stage.step(state, data, step, ctx.initial_params)
    if step >= _WARMUP.value:
      rows.append(m)
  keys = ("sampling_s", "scoring_s", "update_s", "step_s", "tokens_per_s")
  out = {k: round(statistics.median(r[k] for r in rows), 4) for k in keys}
  out.update({f"{k}_min": round(min(r[k] for r in rows), 4) for k in ("step_s",)})
  out.update({f"{k}_max": round(max(r[k] for r in rows), 4) for k in ("step_s",)})
  out.update(matched=_MATCHED.value, steps=len(rows), rows_per_step=c.rl.prompts_per_step *
             c.rl.group_size, max_new_tokens=c.rl.sampler.max_new_tokens,
             generated_tokens_per_step=statistics.median(r["generated_tokens"] for r in rows))
  print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
