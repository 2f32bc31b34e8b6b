"""Real tokens against computed tokens at the paper's response-length mix: the padded update
against the packed one (`rl.packing`), measured in the same run. Prints one JSON line.

The mix: REFERENCE §6's lengths after ~100 steps (general VQA 1000–1400 tokens, math 600–1100,
chart 800–1000, spatial reasoning 300–600, grounding ~65, OCR 30–50) times --scale (1/16 by
default, so the longest is 88 tokens), an equal number of prompts per task, G responses each with
lengths drawn uniformly in the task's range (seeded): the batch is laid out as the sampler
returns it (48 random prompt tokens right-aligned in a 64-slot bucket, responses of exactly those
lengths), so every run trains on the same tokens. The model is the peer-matched text model of the
other benchmarks (vocab 1024, width 256, 4 layers, float32) on this machine's default device.

Figures: `update_real_token_fraction` (real tokens / token slots the update's forward computes;
prompts count once per packed segment, once per group in the padded shared-prompt forward), for
both paths; `speedup_vs_padded.update` (median of --repeats timed updates after a warm-up call
that compiles, the paths taking turns); and, for the decoding side, `plain_decode_real_fraction`:
response tokens / the row-steps a decode that runs every row until the longest ends computes
(today's sampler; counted, not timed).

  python benchmarks/length_mix.py [--repeats=3] [--scale=0.0625] [--prompts_per_task=4]
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from openvlthinker.models.decoder import DecoderConfig  # noqa: E402
from openvlthinker.models.vlm import VLM, VLMConfig  # noqa: E402
from openvlthinker.rl import losses  # noqa: E402
from openvlthinker.sampler import SamplerConfig  # noqa: E402
from openvlthinker.sharding import Sharder, make_mesh  # noqa: E402
from openvlthinker.train import packing, rl  # noqa: E402
from openvlthinker.train.batch import RolloutBatch  # noqa: E402
from openvlthinker.train.rl_stage import RESPONSE_BUCKET  # noqa: E402
from openvlthinker.train.state import create_train_state  # noqa: E402

# REFERENCE §6, tokens after ~100 steps.
PAPER_LENGTHS = {"general_vqa": (1000, 1400), "math_reasoning": (600, 1100),
                 "chart_figure_qa": (800, 1000), "spatial_reasoning": (300, 600),
                 "spatial_grounding": (65, 65), "ocr": (30, 50)}
PROMPT_TOKENS = 48
# One device (a 1 x 1 x 1 mesh): the machine's own speed, no fake devices.
SHARDER = Sharder(make_mesh((1, 1, 1), jax.devices()[:1]))


def length_schedule(rng, prompts_per_task: int, group_size: int, scale: float) -> np.ndarray:
  """int32[P·G] forced lengths, prompt-major, tasks in turn."""
  rows = []
  for _ in range(prompts_per_task):
    for lo, hi in PAPER_LENGTHS.values():
      lo, hi = max(1, round(lo * scale)), max(1, round(hi * scale))
      rows.append(rng.integers(lo, hi + 1, group_size))
  return np.concatenate(rows).astype(np.int32)


def mixed_batch(model, rng, lengths, g: int, lr: int, lb: int = 64) -> RolloutBatch:
  """A RolloutBatch laid out as the sampler returns it: P prompts of PROMPT_TOKENS random tokens
  right-aligned in `lb` slots, G responses each of the given lengths in `lr` columns."""
  b = len(lengths)
  p = b // g
  prompt = np.zeros((p, lb), np.int32)
  mask = np.zeros((p, lb), bool)
  mask[:, lb - PROMPT_TOKENS:] = True
  prompt[mask] = rng.integers(16, 1024, mask.sum())
  prompt[:, lb - PROMPT_TOKENS] = 1
  positions, next_position = jax.device_get(model.prompt_positions(prompt, mask))
  rep = lambda x: np.repeat(np.asarray(x), g, axis=0)
  response_positions = jax.device_get(model.response_positions(rep(next_position), lr))
  response_mask = np.arange(lr)[None] < lengths[:, None]
  tokens = np.where(response_mask, rng.integers(16, 1024, (b, lr)), 0).astype(np.int32)
  f = np.float32
  z = np.zeros(b, f)
  return RolloutBatch(
      sequence_tokens=np.concatenate([rep(prompt), tokens], 1),
      sequence_positions=np.concatenate([rep(positions), response_positions], 1),
      sequence_mask=np.concatenate([rep(mask), response_mask], 1),
      prefix_mask=np.concatenate([rep(mask), np.zeros_like(response_mask)], 1), tokens=tokens,
      old_logprobs=np.where(response_mask, -7.0, 0.0).astype(f), entropies=np.zeros((b, lr), f),
      response_mask=response_mask, lengths=lengths, images=None,
      task_ids=np.zeros(b, np.int32), task_keys=np.zeros(b, np.int32), reward=z, accuracy=z,
      format=z, structure=z, length_reward=z, advantages=rng.standard_normal(b).astype(f),
      valid=np.ones(b, bool), response_start=lb).trim(RESPONSE_BUCKET)


def timed(fn, repeats: int) -> tuple[float, list[float]]:
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times), times


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--scale", type=float, default=1 / 16)
  ap.add_argument("--prompts_per_task", type=int, default=4)
  ap.add_argument("--group_size", type=int, default=8)
  ap.add_argument("--micro_batch_size", type=int, default=32, help="padded rows per micro-batch")
  ap.add_argument("--row_tokens", type=int, default=512)
  ap.add_argument("--rows_per_micro", type=int, default=2)
  args = ap.parse_args()
  g = args.group_size
  rng = np.random.default_rng(0)

  lengths = length_schedule(rng, args.prompts_per_task, g, args.scale)
  lr = -(-int(lengths.max()) // RESPONSE_BUCKET) * RESPONSE_BUCKET
  cfg = VLMConfig(text=DecoderConfig(vocab_size=1024, width=256, num_layers=4, num_heads=4,
                                     num_kv_heads=2, head_dim=64, mlp_dim=1024), vision=None)
  model = VLM(cfg, SHARDER, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  p, b = len(lengths) // g, len(lengths)
  batch = mixed_batch(model, rng, lengths, g, lr)
  pack_cfg = packing.PackingConfig(enabled=True, row_tokens=args.row_tokens,
                                   rows_per_micro=args.rows_per_micro)
  packed, stats = packing.pack(batch, pack_cfg, group_size=g)
  tx = optax.adamw(1e-6)
  loss = losses.PolicyLossConfig()
  common = dict(sampler_config=SamplerConfig(max_new_tokens=lr, stop_tokens=()), loss_config=loss,
                entropy=None)
  minibatches = {"padded": jax.tree.map(SHARDER.put_batch, batch),
                 "packed": packing.put(packed, SHARDER)}
  states, updates = {}, {}
  for name in minibatches:
    states[name], shardings = create_train_state(jax.tree.map(jax.numpy.copy, params), tx,
                                                 SHARDER)
    updates[name] = rl.make_update(
        graphdef, tx, state_shardings=shardings, packed=name == "packed",
        num_micro=b // args.micro_batch_size, group_size=g, **common)

  def run(name):
    states[name], m = updates[name](states[name], minibatches[name])
    return m["policy_loss"]

  first = {name: float(run(name)) for name in minibatches}  # warm-up: compiles
  update_times = {name: [] for name in minibatches}
  for _ in range(args.repeats):
    for name in minibatches:
      update_times[name].append(timed(lambda: run(name), 1)[0])

  # --------------------------------------------------------------------------- figures
  med = lambda xs: statistics.median(xs)
  real_response = int(lengths.sum())
  lb = batch.response_start
  padded_computed = p * lb + b * batch.tokens.shape[1]  # shared prompt forward: prompts once
  padded_real = p * PROMPT_TOKENS + real_response
  t_update = {k: med(v) for k, v in update_times.items()}
  print(json.dumps({
      "benchmark": "length_mix", "device": jax.devices()[0].device_kind,
      "rows": b, "group_size": g, "max_new_tokens": lr, "scale": args.scale,
      "mean_length": float(lengths.mean()), "trimmed_width": int(batch.tokens.shape[1]),
      "row_tokens": args.row_tokens, "rows_per_micro": args.rows_per_micro,
      "update_real_token_fraction": stats.fill,
      "update_real_token_fraction_padded": padded_real / padded_computed,
      "update_response_fraction_padded": real_response / (b * batch.tokens.shape[1]),
      "plain_decode_real_fraction": real_response / (b * int(lengths.max())),
      "packed_micro_batches": stats.num_micro, "padded_micro_batches": b // args.micro_batch_size,
      "policy_loss": first, "update_s": t_update,
      "speedup_vs_padded": {"update": t_update["padded"] / t_update["packed"]},
      "times": update_times,
      "repeats": args.repeats, "load_1min": os.getloadavg()[0]}))


if __name__ == "__main__":
  main()
