"""Real tokens against computed tokens at the paper's response-length mix, for both halves of an
RL step: today's sampler (`sampler.compact=False`: every row decodes until the longest ends)
against the compacting one, and the padded update against the packed one (`rl.packing`), all
measured in the same run, taking turns. Prints one JSON line.

The mix: REFERENCE §6's lengths after ~100 steps (general VQA 1000–1400 tokens, math 600–1100,
chart 800–1000, spatial reasoning 300–600, grounding ~65, OCR 30–50) times --scale (1/16 by
default, so the longest is 88 tokens), an equal number of prompts per task, G responses each with
lengths drawn uniformly in the task's range (seeded): the batch is laid out as the sampler
returns it (48 random prompt tokens right-aligned in a 64-slot bucket, responses of exactly those
lengths), so every run trains on the same tokens. The samplers decode the same prompts with no
stop token and each row capped at its scheduled length (`max_lengths`), so they stop where the
schedule says, deterministically. The model is the peer-matched text model of the other
benchmarks (vocab 1024, width 256, 4 layers, float32) on this machine's default device.

Figures: `sampler_real_token_fraction` (response tokens / the row × step slots the decode
computed, `decoded_row_steps` plus step 0 of every row, drawn from the prefill) compacting and
plain; `update_real_token_fraction` (real tokens / token slots the update's forward computes;
prompts count once per packed segment, once per group in the padded shared-prompt forward), for
both paths; `speedup_vs_padded` for the sampler, the update and the RL step (sampler + update),
each the ratio of medians of --repeats timed calls after a warm-up call that compiles, the four
calls taking turns in each repeat; `sampler_agreement`: whether the samplers' outputs are the
same bits. `demo_no_early_stop`: the samplers at the CPU demo's sizes (configs/default.py's model
with images, 16 prompts x 8, 64 tokens) when no group ends early, compaction's worst case (its
calls and syncs, nothing to drop), median of --demo_repeats calls each, taking turns.

  python benchmarks/length_mix.py [--repeats=3] [--scale=0.0625] [--prompts_per_task=4]
"""
import argparse
import dataclasses
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

from configs import default as default_config  # noqa: E402
from openvlthinker.models.build import build_model, vlm_config  # noqa: E402
from openvlthinker.models.decoder import DecoderConfig  # noqa: E402
from openvlthinker.models.vlm import VLM, VLMConfig  # noqa: E402
from openvlthinker.rl import losses  # noqa: E402
from openvlthinker.sampler import Sampler, SamplerConfig  # noqa: E402
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


def timed(fn) -> float:
  t = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t


def samplers(graphdef, config: SamplerConfig) -> dict[str, Sampler]:
  return {name: Sampler(graphdef, dataclasses.replace(config, compact=name == "compact"), SHARDER)
          for name in ("plain", "compact")}


def agreement(a, b) -> dict:
  """How two SamplerOutputs agree: bit for bit (tokens, log-probs, entropies, lengths), tokens
  alone, and the largest log-prob difference."""
  fields = lambda o: [np.asarray(x) for x in jax.device_get(
      (o.tokens, o.logprobs, o.entropies, o.lengths))]
  a, b = fields(a), fields(b)
  return {"identical": all(x.tobytes() == y.tobytes() for x, y in zip(a, b)),
          "tokens_equal": bool((a[0] == b[0]).all()),
          "max_logprob_diff": float(np.abs(a[1] - b[1]).max())}


def demo_overhead(repeats: int) -> dict:
  """The samplers at configs/default.py's sizes (its model with 64 px images, 16 prompts x 8,
  64 new tokens, 4 phases, 40-token prompts in the 64 bucket), with no stop token: every group
  runs to the end, so compaction has nothing to drop and costs only its calls and syncs."""
  c = default_config.get_config()
  cfg = vlm_config(c.model)
  model = build_model(cfg, SHARDER, seed=0)
  graphdef, params = nnx.split(model)
  p, g, n = c.rl.prompts_per_step, c.rl.group_size, 40
  rng = np.random.default_rng(1)
  tokens = rng.integers(16, cfg.text.vocab_size, (p, n)).astype(np.int32)
  tokens[:, 4:4 + cfg.num_image_tokens] = cfg.image_token_id
  images = rng.integers(0, 256, (p, 1, cfg.vision.image_size, cfg.vision.image_size, 3), np.uint8)
  config = SamplerConfig(max_new_tokens=c.rl.sampler.max_new_tokens, stop_tokens=(),
                         prompt_buckets=tuple(c.data.prompt_buckets),
                         decode_phases=c.rl.sampler.decode_phases)
  run = {k: (lambda s=s: s(params, tokens, np.ones_like(tokens, bool), images,
                           jax.random.key(0), group_size=g))
         for k, s in samplers(graphdef, config).items()}
  same = agreement(run["plain"](), run["compact"]())  # warm-up: compiles
  times = {k: [] for k in run}
  for _ in range(repeats):
    for k in run:
      times[k].append(timed(run[k]))
  med = {k: statistics.median(v) for k, v in times.items()}
  return {"rows": p * g, "max_new_tokens": config.max_new_tokens, "sampler_s": med,
          "compact_vs_plain": med["plain"] / med["compact"], "agreement": same, "times": times}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--scale", type=float, default=1 / 16)
  ap.add_argument("--prompts_per_task", type=int, default=4)
  ap.add_argument("--group_size", type=int, default=8)
  ap.add_argument("--micro_batch_size", type=int, default=32, help="padded rows per micro-batch")
  ap.add_argument("--row_tokens", type=int, default=512)
  ap.add_argument("--rows_per_micro", type=int, default=2)
  ap.add_argument("--decode_phases", type=int, default=SamplerConfig.decode_phases)
  ap.add_argument("--demo_repeats", type=int, default=15,
                  help="timed calls of each sampler at the demo's sizes (0: skip); its gap is a "
                       "few percent at most, so it needs more than --repeats")
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

  def update(name):
    states[name], m = updates[name](states[name], minibatches[name])
    return m["policy_loss"]

  # The samplers answer the batch's prompts (right-padded, as grain yields them), each row capped
  # at its scheduled length.
  lb = batch.response_start
  prompts = np.asarray(batch.sequence_tokens[::g, lb - PROMPT_TOKENS:lb])
  sampler_config = SamplerConfig(max_new_tokens=lr, stop_tokens=(), prompt_buckets=(lb,),
                                 decode_phases=args.decode_phases)
  decode = {name: (lambda s=s: s(params, prompts, np.ones_like(prompts, bool), None,
                                 jax.random.key(0), group_size=g, max_lengths=lengths))
            for name, s in samplers(graphdef, sampler_config).items()}

  first = {name: float(update(name)) for name in minibatches}  # warm-up: compiles
  outs = {name: decode[name]() for name in decode}
  assert (np.asarray(outs["plain"].lengths) == lengths).all(), "the schedule was not followed"
  same = agreement(outs["plain"], outs["compact"])
  # Each repeat times the four calls in turn: the RL step of a path is its sampler + update.
  paths = {"baseline": ("plain", "padded"), "new": ("compact", "packed")}
  times = {name: [] for name in ("plain", "compact", "padded", "packed")}
  for _ in range(args.repeats):
    for sample_name, update_name in paths.values():
      times[sample_name].append(timed(decode[sample_name]))
      times[update_name].append(timed(lambda n=update_name: update(n)))
  step_times = {path: [a + b for a, b in zip(times[s], times[u])]
                for path, (s, u) in paths.items()}
  demo = demo_overhead(args.demo_repeats) if args.demo_repeats else None

  # --------------------------------------------------------------------------- figures
  med = statistics.median
  real_response = int(lengths.sum())
  decoded = {k: int(o.decoded_row_steps) + b for k, o in outs.items()}  # + step 0 of each row
  padded_computed = p * lb + b * batch.tokens.shape[1]  # shared prompt forward: prompts once
  padded_real = p * PROMPT_TOKENS + real_response
  t = {k: med(v) for k, v in times.items()}
  t_step = {k: med(v) for k, v in step_times.items()}
  print(json.dumps({
      "benchmark": "length_mix", "device": jax.devices()[0].device_kind,
      "rows": b, "group_size": g, "max_new_tokens": lr, "scale": args.scale,
      "mean_length": float(lengths.mean()), "trimmed_width": int(batch.tokens.shape[1]),
      "row_tokens": args.row_tokens, "rows_per_micro": args.rows_per_micro,
      "decode_phases": args.decode_phases,
      "sampler_real_token_fraction": real_response / decoded["compact"],
      "sampler_real_token_fraction_plain": real_response / decoded["plain"],
      "sampler_agreement": same,
      "update_real_token_fraction": stats.fill,
      "update_real_token_fraction_padded": padded_real / padded_computed,
      "update_response_fraction_padded": real_response / (b * batch.tokens.shape[1]),
      "packed_micro_batches": stats.num_micro, "padded_micro_batches": b // args.micro_batch_size,
      "policy_loss": first,
      "sampler_s": {k: t[k] for k in ("plain", "compact")},
      "update_s": {k: t[k] for k in ("padded", "packed")}, "rl_step_s": t_step,
      "speedup_vs_padded": {"sampler": t["plain"] / t["compact"],
                            "update": t["padded"] / t["packed"],
                            "rl_step": t_step["baseline"] / t_step["new"]},
      "times": times, "demo_no_early_stop": demo,
      "repeats": args.repeats, "load_1min": os.getloadavg()[0]}))


if __name__ == "__main__":
  main()
