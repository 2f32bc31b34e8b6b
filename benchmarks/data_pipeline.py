"""Throughput of the SFT and RL grain pipelines on the suite, against the bare task generators.

Prints one JSON line: examples/s of `registry.generate` over the same mixture (the baseline, run in
the same process), of the SFT and RL pipelines (worker_count 0: the cost the trainer's process
pays), their ratio to the baseline, and the tokenisation cost per example. Medians of --repeats.

  python benchmarks/data_pipeline.py [--batch=8] [--batches=40] [--repeats=5]
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from openvlthinker.data import pipeline  # noqa: E402
from openvlthinker.data import prompts  # noqa: E402
from openvlthinker.data import sources  # noqa: E402
from openvlthinker.data import tokenizer as tokenizer_lib  # noqa: E402


def median_rate(fn, count, repeats):
  """Median items/s of fn(seed) producing `count` items, one warm-up call first."""
  fn(0)
  times = []
  for seed in range(1, repeats + 1):
    start = time.perf_counter()
    fn(seed)
    times.append(time.perf_counter() - start)
  return count / statistics.median(times)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--batches", type=int, default=40)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()  # grain reads absl flags
  tok = tokenizer_lib.load_tokenizer()
  n = args.batch * args.batches

  def generate(seed):
    stream, _ = sources.mixed_dataset(sources.SuiteSource().by_task(), None, seed)
    return [stream[i] for i in range(n)]

  def run(make):
    def consume(seed):
      config = pipeline.DataConfig(batch_size=args.batch, seed=seed)
      it = iter(make(config, tok, shard_index=0, shard_count=1))
      for _ in range(args.batches):
        next(it)
    return consume

  examples = generate(0)

  def tokenise(seed):
    del seed
    for ex in examples:
      prompts.encode_sft(ex, tok, 16)

  base = median_rate(generate, n, args.repeats)
  sft = median_rate(run(pipeline.sft_dataset), n, args.repeats)
  rl = median_rate(run(pipeline.rl_dataset), n, args.repeats)
  encode_us = 1e6 / median_rate(tokenise, n, args.repeats)
  print(json.dumps({
      "batch": args.batch, "examples": n, "repeats": args.repeats,
      "generate_examples_per_s": round(base, 1),
      "sft_examples_per_s": round(sft, 1), "rl_examples_per_s": round(rl, 1),
      "sft_vs_generate": round(sft / base, 3), "rl_vs_generate": round(rl / base, 3),
      "encode_sft_us_per_example": round(encode_us, 1),
  }))


if __name__ == "__main__":
  main()
