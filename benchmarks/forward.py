"""Forward throughput of the default model on this machine, against the peak of a large f32 matmul.

Prints one JSON line: tokens_per_s, gflops (achieved, model FLOPs from XLA's cost analysis of the
compiled forward), peak_gflops (a 2048² float32 jnp.dot measured in the same run) and mfu.

  python benchmarks/forward.py [--config=configs/default.py] [--batch=N] [--repeats=N]
"""
import argparse
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

from openvlthinker.models.build import build_model, vlm_config  # noqa: E402
from openvlthinker.sharding import Sharder  # noqa: E402


def load_config(path):
  import importlib.util
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def median_seconds(fn, repeats):
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def peak_gflops(repeats, n=2048):
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
  dot = jax.jit(lambda x: x @ x)
  return 2 * n ** 3 / median_seconds(lambda: dot(a), repeats) / 1e9


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="configs/default.py")
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--seq_len", type=int, default=None)
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()
  config = load_config(args.config)
  batch = args.batch or config.data.batch_size
  seq_len = args.seq_len or config.data.seq_len
  cfg = vlm_config(config.model)
  model = build_model(cfg, Sharder(), seed=0)
  graphdef, state = nnx.split(model)

  rng = np.random.default_rng(0)
  tokens = rng.integers(10, cfg.text.vocab_size, (batch, seq_len)).astype(np.int32)
  tokens[:, 1:1 + cfg.num_image_tokens] = cfg.image_token_id
  positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), tokens.shape)
  size = cfg.vision.image_size
  images = rng.integers(0, 256, (batch, 1, size, size, 3), dtype=np.uint8)

  @jax.jit
  def forward(state, tokens, positions, images):
    return nnx.merge(graphdef, state)(tokens, positions, images)[0]

  compiled = forward.lower(state, tokens, positions, images).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost["flops"])
  seconds = median_seconds(lambda: compiled(state, tokens, positions, images), args.repeats)
  peak = peak_gflops(args.repeats)
  gflops = flops / seconds / 1e9
  print(json.dumps(dict(
      tokens_per_s=round(batch * seq_len / seconds, 1), gflops=round(gflops, 2),
      peak_gflops=round(peak, 2), mfu=round(gflops / peak, 3), batch=batch, seq_len=seq_len,
      model_gflop_per_call=round(flops / 1e9, 3), seconds_per_call=round(seconds, 4),
      devices=jax.device_count(), backend=jax.default_backend())))


if __name__ == "__main__":
  main()
