"""Generation throughput of the on-device sampler against two baselines measured in the same run.

Prints one JSON line. Default: the configs/default.py model, 8 prompts (16 image tokens + 48 text
tokens) × 8 samples, 64 new tokens at temperature 1, no early stop. Baselines, with the same
sampling code and no early stop either: (a) `nocache`: every step recomputes the full forward
(images included) over a fixed [B, Lp + Lr] buffer; (b) `hostloop`: a Python loop over a jitted
one-step decode (the cache donated), after the same shared-prefix prefill, so its ratio is the gain
of the on-device `while_loop` alone.

--matched: the same benchmark (8 prompts × 8 samples, the RL layout: 8 prefills, each prompt's
cache shared by its samples) at the size peers were measured at on this machine: a text model
(vocab 1024, width 256, 4 layers, 4 heads / 2 KV heads, head dim 64, MLP 1024, float32), 64-token
prompts, 64 new tokens, batch 64, temperature 1 → `matched_tokens_per_s`. The same batch of 64
rows from 64 distinct prompts (64 prefills, nothing shared) → `matched_tokens_per_s_64_distinct`.

Figures are medians over --repeats calls after a warm-up call (the sampler and the host loop take
turns, so drifting load hits both), with the (min, max) spread; the
1-minute load average is recorded because other processes share the cores, and `tokens_per_cpu_s`
(tokens per second of this process's CPU time, all threads) is the figure least moved by them.
No XLA flags are set.

  python benchmarks/sampler.py [--matched] [--repeats=N] [--nocache_steps=N]
"""
import argparse
import functools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from configs import default as default_config  # noqa: E402
from openvlthinker import sampling  # noqa: E402
from openvlthinker.models.build import build_model, vlm_config  # noqa: E402
from openvlthinker.models.decoder import DecoderConfig  # noqa: E402
from openvlthinker.models.vlm import VLMConfig  # noqa: E402
from openvlthinker.sampler import Sampler, SamplerConfig, align_prompts  # noqa: E402


def timed(fns, repeats):
  """Per function: wall seconds per call (median, min, max) and median process CPU seconds (all
  threads), over `repeats` rounds that call each function once in turn (after one warm-up call
  each), so load from other processes falls on all of them alike."""
  for fn in fns:
    jax.block_until_ready(fn())
  times, cpu = [[] for _ in fns], [[] for _ in fns]
  for _ in range(repeats):
    for i, fn in enumerate(fns):
      start, start_cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn())
      times[i].append(time.perf_counter() - start)
      cpu[i].append(time.process_time() - start_cpu)
  return [(statistics.median(t), min(t), max(t), statistics.median(c)) for t, c in zip(times, cpu)]


def make_prompts(cfg, prompts, prompt_len, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(10, cfg.text.vocab_size, (prompts, prompt_len)).astype(np.int32)
  images = None
  if cfg.vision is not None:
    tokens[:, 1:1 + cfg.num_image_tokens] = cfg.image_token_id
    size = cfg.vision.image_size
    images = rng.integers(0, 256, (prompts, 1, size, size, 3), dtype=np.uint8)
  return tokens, np.ones(tokens.shape, bool), images


def nocache_baseline(graphdef, state, config, tokens, mask, images, group, steps):
  """A function running `steps` steps that each run the full forward over [B, Lp + Lr]."""
  g = group
  tokens, positions, valid = align_prompts(tokens, mask, tokens.shape[1])
  b, lp = tokens.shape[0] * g, tokens.shape[1]
  lr = config.max_new_tokens
  rep = lambda x: None if x is None else jnp.repeat(x, g, axis=0)
  seq = jnp.concatenate([rep(tokens), jnp.zeros((b, lr), jnp.int32)], 1)
  pos = jnp.concatenate([rep(positions), rep(positions[:, -1:]) + 1 + jnp.arange(lr)], 1)
  valid = jnp.concatenate([rep(valid), jnp.zeros((b, lr), bool)], 1)
  images = rep(images)
  keys = jax.random.split(jax.random.key(0), b)

  @jax.jit
  def step(state, seq, valid, t):
    logits = nnx.merge(graphdef, state)(seq, pos, images, input_mask=valid)[0]
    u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, t)))(keys)
    tok = sampling.draw(sampling.candidates(logits[:, lp - 1 + t], config), u).tokens
    seq = jax.lax.dynamic_update_slice_in_dim(seq, tok[:, None], lp + t, axis=1)
    valid = jax.lax.dynamic_update_slice_in_dim(valid, jnp.ones((b, 1), bool), lp + t, axis=1)
    return seq, valid

  def run():
    s, v = seq, valid
    for t in range(steps):
      s, v = step(state, s, v, t)
    return s
  return run


def hostloop_baseline(graphdef, state, config, tokens, mask, images, group):
  """A jitted prefill, then one jitted call per decode step from a Python loop; each step keeps
  the token, its log-prob and the entropy, as the sampler does."""
  g = group
  tokens, positions, valid = align_prompts(tokens, mask, tokens.shape[1])
  b, lr = tokens.shape[0] * g, config.max_new_tokens
  keys = jax.random.split(jax.random.key(0), b)

  def draw(logits, t):
    u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, t)))(keys)
    return sampling.draw(sampling.candidates(logits, config), u)

  @jax.jit
  def prefill(state):
    model = nnx.merge(graphdef, state)
    logits, prompt = model(tokens, positions, images, model.init_cache(tokens.shape[0],
                                                                       tokens.shape[1]),
                           input_mask=valid, prefix_mask=valid, logits_from=tokens.shape[1] - 1)
    cache = model.init_cache(b, lr - 1, prefix=prompt)
    return draw(jnp.repeat(logits[:, 0], g, axis=0), 0), cache

  @functools.partial(jax.jit, donate_argnums=(2,))
  def decode(state, token, cache, position, t):
    logits, cache = nnx.merge(graphdef, state)(token[:, None], position[:, None], None, cache)
    return draw(logits[:, 0], t), cache

  start = jnp.repeat(jnp.asarray(positions[:, -1]) + 1, g)

  def run():
    drawn, cache = prefill(state)
    out = [drawn]
    for t in range(1, lr):
      drawn, cache = decode(state, drawn.tokens, cache, start + t - 1, t)
      out.append(drawn)
    return jax.tree.map(lambda *x: jnp.stack(x, 1), *out)
  return run


def measure(graphdef, state, cfg, prompts, group, prompt_len, new_tokens, repeats,
            nocache_steps):
  config = SamplerConfig(max_new_tokens=new_tokens, temperature=1.0, stop_tokens=(),
                         prompt_buckets=(prompt_len,))
  tokens, mask, images = make_prompts(cfg, prompts, prompt_len)
  sampler = Sampler(graphdef, config)
  key = jax.random.key(0)
  generated = prompts * group * new_tokens
  run = lambda: sampler(state, tokens, mask, images, key, group_size=group)
  hostloop = hostloop_baseline(graphdef, state, config, tokens, mask, images, group)
  (med, lo, hi, cpu), (h_med, _, _, h_cpu) = timed([run, hostloop], repeats)
  result = dict(tokens_per_s=generated / med, tokens_per_s_range=(generated / hi, generated / lo),
                tokens_per_cpu_s=generated / cpu, hostloop_tokens_per_s=generated / h_med,
                hostloop_tokens_per_cpu_s=generated / h_cpu)
  if nocache_steps:
    nocache = nocache_baseline(graphdef, state, config, tokens, mask, images, group,
                               nocache_steps)
    (n_med, *_), = timed([nocache], 1)
    # Every no-cache step costs the same (a fixed-shape forward): time a few, scale to all.
    result["nocache_tokens_per_s"] = prompts * group * nocache_steps / n_med
  return result


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--matched", action="store_true")
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--scan_layers", action=argparse.BooleanOptionalAction, default=False,
                      help="the decoder's layers under one scan (the pod layout) instead of a "
                      "loop over per-layer weights (the CPU configs' layout)")
  parser.add_argument("--nocache_steps", type=int, default=8,
                      help="steps timed for the no-cache baseline (each costs the same)")
  args = parser.parse_args()
  new_tokens = 64
  if args.matched:
    cfg = VLMConfig(text=DecoderConfig(vocab_size=1024, width=256, num_layers=4, num_heads=4,
                                       num_kv_heads=2, head_dim=64, mlp_dim=1024,
                                       scan_layers=args.scan_layers),
                    vision=None)
    runs = {"": (8, 8), "_64_distinct": (64, 1)}
    prompt_len = 64
  else:
    c = default_config.get_config()
    c.model.scan_layers = args.scan_layers
    cfg = vlm_config(c.model)
    runs = {"": (8, 8)}
    prompt_len = cfg.num_image_tokens + 48
  graphdef, state = nnx.split(build_model(cfg, seed=0))
  load_before = os.getloadavg()[0]
  out = {}
  for suffix, (prompts, group) in runs.items():
    r = measure(graphdef, state, cfg, prompts, group, prompt_len, new_tokens, args.repeats,
                args.nocache_steps)
    prefix = "matched_" if args.matched else ""
    out[f"{prefix}tokens_per_s{suffix}"] = round(r["tokens_per_s"], 1)
    out[f"{prefix}tokens_per_s_range{suffix}"] = [round(x, 1) for x in r["tokens_per_s_range"]]
    out[f"tokens_per_cpu_s{suffix}"] = round(r["tokens_per_cpu_s"], 1)
    out[f"speedup_vs_hostloop{suffix}"] = round(r["tokens_per_s"] / r["hostloop_tokens_per_s"], 3)
    out[f"hostloop_tokens_per_s{suffix}"] = round(r["hostloop_tokens_per_s"], 1)
    out[f"speedup_vs_hostloop_cpu{suffix}"] = round(
        r["tokens_per_cpu_s"] / r["hostloop_tokens_per_cpu_s"], 3)
    if "nocache_tokens_per_s" in r:
      out[f"speedup_vs_nocache{suffix}"] = round(r["tokens_per_s"] / r["nocache_tokens_per_s"], 2)
      out[f"nocache_tokens_per_s{suffix}"] = round(r["nocache_tokens_per_s"], 1)
    out[f"batch{suffix}"] = f"{prompts} prompts x {group} samples"
  if args.matched:
    out["tokens_per_s"] = out["matched_tokens_per_s"]
  out.update(mode="matched" if args.matched else "default", scan_layers=args.scan_layers,
             prompt_tokens=prompt_len,
             new_tokens=new_tokens, repeats=args.repeats, nocache_steps=args.nocache_steps,
             load_avg_1min=(round(load_before, 2), round(os.getloadavg()[0], 2)),
             cpus=os.cpu_count(), backend=jax.default_backend(),
             xla_flags=os.environ.get("XLA_FLAGS", ""))
  print(json.dumps(out))


if __name__ == "__main__":
  main()
