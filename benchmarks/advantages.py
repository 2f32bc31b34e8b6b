"""Times jitted G²RPO against a numpy loop-per-group reference and jitted plain GRPO.

Prints one JSON line: median ms per call of each, for 512 prompts x 8 responses over 6 tasks (the
paper's rollout batch) and 2048 x 8, with the ratios `speedup_vs_loop_*` (loop / G²RPO) and
`ratio_to_grpo_*` (G²RPO / GRPO), and G²RPO's largest deviation from the float64 loop.
G²RPO is timed as the trainer calls it: `jax.jit(get_advantage_estimator("g2rpo"))`.

  python benchmarks/advantages.py [--repeats 7]
"""
import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import ndtri

from openvlthinker.rl import advantages

GROUP_SIZE = 8
NUM_TASKS = 6


def loop_quantile_map(x: np.ndarray) -> np.ndarray:
  """Q of REFERENCE §3 over one segment, vectorised numpy (float64)."""
  n = x.shape[0]
  if n <= 1:
    return np.zeros(n)
  _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
  cum = np.concatenate([[0.0], np.cumsum(ndtri((np.arange(n) + 0.5) / n))])
  ends = np.cumsum(counts)
  return ((cum[ends] - cum[ends - counts]) / counts)[inverse]


def loop_g2rpo(rewards, group_ids, task_ids):
  """The loop reference: Q per prompt group, then Q per task, one Python iteration each."""
  stage1 = np.empty(rewards.shape[0])
  for rows in _segments(group_ids):
    stage1[rows] = loop_quantile_map(rewards[rows])
  stage1 = np.round(stage1, 12)  # exact ties, as the jitted version keeps them bit for bit
  out = np.empty_like(stage1)
  for rows in _segments(task_ids):
    out[rows] = loop_quantile_map(stage1[rows])
  return out


def _segments(ids):
  order = np.argsort(ids, kind="stable")
  return np.split(order, np.flatnonzero(np.diff(ids[order])) + 1)


def make_batch(num_prompts: int, seed: int = 0):
  """Rows in sampler order (G responses per prompt); binary rewards, continuous for 2 tasks."""
  rng = np.random.default_rng(seed)
  b = num_prompts * GROUP_SIZE
  group_ids = np.repeat(np.arange(num_prompts), GROUP_SIZE).astype(np.int32)
  task_ids = np.repeat(rng.integers(0, NUM_TASKS, num_prompts), GROUP_SIZE).astype(np.int32)
  p_correct = np.repeat(rng.random(num_prompts), GROUP_SIZE)
  accuracy = (rng.random(b) < p_correct).astype(np.float32)
  continuous = np.isin(task_ids, (0, 5))  # grounding (IoU) and OCR (1 - WER)
  accuracy = np.where(continuous, rng.random(b).astype(np.float32), accuracy)
  fmt = (rng.random(b) < 0.9).astype(np.float32)
  rewards = 0.9 * accuracy + 0.1 * fmt + 0.5 * fmt  # REFERENCE §2 with the structure bonus
  return rewards.astype(np.float32), group_ids, task_ids


def median_ms(fn, args, repeats: int, seconds_per_repeat: float = 0.1) -> float:
  """Median over repeats of the mean time per call of a loop of about seconds_per_repeat."""
  jax.block_until_ready(fn(*args))  # compile / warm up
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  calls = max(1, round(seconds_per_repeat / (time.perf_counter() - start)))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / calls * 1e3)
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()

  g2rpo = jax.jit(advantages.get_advantage_estimator("g2rpo"))
  grpo = jax.jit(advantages.get_advantage_estimator("grpo"))
  result = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
            "jax": jax.__version__, "repeats": args.repeats}
  for num_prompts in (512, 2048):
    name = f"{num_prompts}x{GROUP_SIZE}"
    batch = make_batch(num_prompts)
    on_device = tuple(jnp.asarray(x) for x in batch)
    err = np.abs(np.asarray(g2rpo(*on_device)) - loop_g2rpo(*batch)).max()
    g2rpo_ms = median_ms(g2rpo, on_device, args.repeats)
    loop_ms = median_ms(loop_g2rpo, batch, args.repeats)
    grpo_ms = median_ms(grpo, on_device, args.repeats)
    result.update({
        f"g2rpo_ms_{name}": round(g2rpo_ms, 4),
        f"loop_ms_{name}": round(loop_ms, 3),
        f"grpo_ms_{name}": round(grpo_ms, 4),
        f"speedup_vs_loop_{name}": round(loop_ms / g2rpo_ms, 2),
        f"ratio_to_grpo_{name}": round(g2rpo_ms / grpo_ms, 2),
        f"max_abs_diff_vs_loop_{name}": float(err),
    })
  print(json.dumps(result))


if __name__ == "__main__":
  main()
