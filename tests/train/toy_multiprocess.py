"""One process of the toy RL task (`test_toy_rl.py`) run as a multi-process job, or alone: run by
`test_multiprocess.py` with JAX_NUM_PROCESSES=2 (4 devices each) and with one process (8
devices); both read the toy prompt stream as two data shards, so they train on the same global
batches.

  python tests/train/toy_multiprocess.py OUT.npz padded|packed

Process 0 writes OUT.npz: every parameter after the steps (gathered from all processes), each
step's metrics (`metrics/<name>` float[STEPS]), and first a sample of the initial policy
decoded with compaction (`sample/<field>`: 40 tokens in 4 phases; the toy policy draws its stop
token often, so groups finish early and leave the live batch).
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), HERE]

from openvlthinker import multihost  # noqa: E402

multihost.initialize(False)  # from the environment when it names several processes

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

import jax  # noqa: E402
import numpy as np  # noqa: E402

import test_toy_rl as toy  # noqa: E402
from openvlthinker.data.shards import ShardLayout  # noqa: E402
from openvlthinker.sampler import Sampler, SamplerConfig  # noqa: E402
from openvlthinker.train.loop import flatten_state  # noqa: E402


def local_prompts(seed):
  """This process's rows of the toy stream's global batches (its data shards' prompts)."""
  for batch in toy.prompt_batches(seed):
    mine = multihost.block(toy.P)
    yield {k: v if np.ndim(v) == 0 else v[mine] for k, v in batch.items()}


def compacted_sample(stage, params) -> dict[str, np.ndarray]:
  """The initial policy's responses to 16 toy prompts, 2 per prompt, decoded with compaction
  from this process's prompts; every row, gathered. (16 groups on 8 devices: live buckets of 16
  and 8 groups.)"""
  cfg = SamplerConfig(max_new_tokens=40, stop_tokens=(toy.EOS,), banned_tokens=(toy.IMAGE,),
                      prompt_buckets=(8, 16), decode_phases=4, compact=True)
  sampler = Sampler(stage.ctx.graphdef, cfg, stage.ctx.sharder)
  stream = toy.prompt_batches(seed=2)
  batches = [next(stream) for _ in range(4)]
  mine = multihost.block(4 * toy.P)
  prompts = {k: np.concatenate([b[k] for b in batches])[mine]
             for k in ("prompt_tokens", "prompt_mask", "images")}
  out = sampler(params, prompts["prompt_tokens"], prompts["prompt_mask"], prompts["images"],
                jax.random.key(3), group_size=2)
  return {f"sample/{k}": multihost.all_rows(getattr(out, k))
          for k in ("tokens", "logprobs", "entropies", "lengths", "decoded_row_steps")}


def main(out, kind):
  config = toy.toy_config(packed=kind == "packed")
  stage, params = toy.build_stage(config, ShardLayout.for_processes(shards=2))
  sample = compacted_sample(stage, params)
  state = stage.initial_state(params)
  data = local_prompts(seed=1)
  metrics = []
  for step in range(toy.STEPS):
    state, m = stage.step(state, data, step, params)
    metrics.append(m)
  flat = {f"params/{k}": multihost.all_rows(v) for k, v in flatten_state(state.params).items()}
  keys = sorted(k for k in metrics[0] if not k.endswith(("_s", "tokens_per_s"))
                and all(k in m and np.isscalar(m[k]) for m in metrics))
  flat.update({f"metrics/{k}": np.asarray([m[k] for m in metrics], np.float64) for k in keys})
  flat.update(sample)
  if multihost.is_primary():
    np.savez(out, **flat)
  print(f"process {jax.process_index()} of {jax.process_count()}: done", flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:])
