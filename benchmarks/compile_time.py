"""Compile time and HLO size of the RL update and of the sampler, against decoder depth.

Prints one JSON line: for each layer count, the wall seconds of trace + lower and of the XLA
compile, their sum, the CPU seconds of both (steadier where other processes share the cores), and
the size of the lowered StableHLO and of the compiled HLO text, for
  rl_update: `train.rl.make_update` (G²RPO loss, shared-prompt forward, 2 micro-batches, AdamW),
  sampler:   `sampler.Sampler` (prefill + phased decode loops).
The model is a tiny text-only decoder (width 64, 4 heads, 2 KV heads, head dim 16, MLP 128,
vocab 1024), so the figures measure what depth costs the compiler, not the arithmetic. Each layer
count is measured with the layers under one scan (`scan_layers`) and, as the baseline in the same
run, as a loop over per-layer weights.

  python benchmarks/compile_time.py [--layers 4 24 36] [--remat] [--repeats 1]
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from openvlthinker.models.build import build_model  # noqa: E402
from openvlthinker.models.decoder import DecoderConfig  # noqa: E402
from openvlthinker.models.vlm import VLMConfig  # noqa: E402
from openvlthinker.rl import losses  # noqa: E402
from openvlthinker.sampler import Sampler, SamplerConfig  # noqa: E402
from openvlthinker.sharding import Sharder, make_mesh  # noqa: E402
from openvlthinker.train import rl, state as state_lib  # noqa: E402
from openvlthinker.train.batch import RolloutBatch  # noqa: E402

P, G, LB, LR, NUM_MICRO = 4, 4, 32, 16, 2


def model_config(layers: int, remat: bool, scan: bool) -> VLMConfig:
  text = DecoderConfig(vocab_size=1024, width=64, num_layers=layers, num_heads=4, num_kv_heads=2,
                       head_dim=16, mlp_dim=128, remat=remat, scan_layers=scan)
  return VLMConfig(text=text, vision=None)


def timed_compile(lower) -> dict:
  """Wall seconds of `lower()` (trace + lower) and of its `.compile()`, their sum, the process's
  CPU seconds for both (steadier than wall time on a shared machine), and both texts' sizes."""
  t0, c0 = time.perf_counter(), time.process_time()
  lowered = lower()
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2, c2 = time.perf_counter(), time.process_time()
  return dict(lower_s=t1 - t0, compile_s=t2 - t1, total_s=t2 - t0, total_cpu_s=c2 - c0,
              stablehlo_chars=len(lowered.as_text()), hlo_chars=len(compiled.as_text()))


def minibatch(rng: np.random.Generator) -> RolloutBatch:
  """P·G rows of prompt + response, all tokens real."""
  b = P * G
  seq = rng.integers(10, 1024, (b, LB + LR)).astype(np.int32)
  mask = np.ones((b, LB + LR), bool)
  rows = np.zeros(b, np.float32)
  return RolloutBatch(
      sequence_tokens=seq, sequence_mask=mask,
      sequence_positions=np.broadcast_to(np.arange(LB + LR, dtype=np.int32), seq.shape).copy(),
      prefix_mask=mask & (np.arange(LB + LR) < LB), tokens=seq[:, LB:],
      response_mask=np.ones((b, LR), bool), old_logprobs=np.full((b, LR), -7.0, np.float32),
      entropies=np.zeros((b, LR), np.float32), lengths=np.full(b, LR, np.int32), images=None,
      task_ids=np.zeros(b, np.int32), task_keys=np.zeros(b, np.int32), reward=rows,
      accuracy=rows, format=rows, structure=rows, length_reward=rows,
      advantages=rng.standard_normal(b).astype(np.float32), valid=np.ones(b, bool),
      response_start=LB)


def measure(layers: int, remat: bool, scan: bool) -> dict:
  # Equal models hash equal: without this a repeat would find the sampler's (module-level) jit
  # already traced and compiled.
  jax.clear_caches()
  one_device = Sharder(make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]))
  graphdef, params = nnx.split(build_model(model_config(layers, remat, scan), one_device, seed=0))
  rng = np.random.default_rng(0)
  sampler_config = SamplerConfig(max_new_tokens=LR, prompt_buckets=(LB,))
  tx = optax.adamw(1e-4)
  state, shardings = state_lib.create_train_state(params, tx, one_device)
  update = rl.make_update(graphdef, tx, state_shardings=shardings, sampler_config=sampler_config,
                          loss_config=losses.PolicyLossConfig(), num_micro=NUM_MICRO,
                          entropy=None, group_size=G)
  mb = jax.tree.map(jnp.asarray, minibatch(rng))
  out = {"rl_update": timed_compile(lambda: update.lower(state, mb))}
  tokens = rng.integers(10, 1024, (P, LB)).astype(np.int32)
  sampler = Sampler(graphdef, sampler_config)
  out["sampler"] = timed_compile(lambda: sampler.lower(
      params, tokens, np.ones_like(tokens, bool), None, jax.random.key(0), group_size=G))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--layers", type=int, nargs="+", default=[4, 24, 36])
  parser.add_argument("--remat", action="store_true", help="DecoderConfig.remat=True")
  parser.add_argument("--repeats", type=int, default=1,
                      help="measurements per layer count; the fastest is kept")
  args = parser.parse_args()
  # The backend's one-time start-up would otherwise count against the first compile.
  jax.jit(lambda x: x + 1).lower(1.0).compile()
  result = dict(backend=jax.default_backend(), remat=args.remat, shapes=dict(
      prompts=P, group=G, prompt_len=LB, new_tokens=LR, micro_batches=NUM_MICRO))
  for layers in args.layers:
    for scan in (True, False):
      runs = [measure(layers, args.remat, scan) for _ in range(args.repeats)]
      best = {k: min((r[k] for r in runs), key=lambda m: m["total_s"]) for k in runs[0]}
      result[f"layers_{layers}_{'scan' if scan else 'loop'}"] = {
          k: {f: round(v, 2) if f.endswith("_s") else v for f, v in m.items()}
          for k, m in best.items()}
  print(json.dumps(result))


if __name__ == "__main__":
  main()
