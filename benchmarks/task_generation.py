"""Seconds to generate 1000 samples of each task type, against a bare-canvas baseline.

Prints one JSON line: for each task type, the median over --repeats of the seconds for 1000
`registry.generate(task, split, i, difficulty)` calls (fresh indices each repeat, one process, one
core), at difficulty 0 and 3 for the train split and difficulty 0 for the eval split (which draws
about EVAL_BUCKETS scenes per kept one); the baseline is 1000 blank 64 px PIL canvases converted
to numpy, timed in the same run, and `ratio_*` = task / baseline.

  python benchmarks/task_generation.py [--repeats 3] [--count 1000]
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from openvlthinker import taxonomy  # noqa: E402
from openvlthinker.tasks import registry, render  # noqa: E402


def _seconds(fn, count, repeats):
  fn(0, 10)  # warm-up: imports, font loading
  times = []
  for r in range(repeats):
    start = time.perf_counter()
    fn(1000 + r * count, count)
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--count", type=int, default=1000)
  args = parser.parse_args()

  def baseline(first, n):
    for _ in range(n):
      render.to_array(render.canvas(64)[0])

  out = {"count": args.count, "repeats": args.repeats, "cpu_count": os.cpu_count()}
  out["baseline_s"] = round(_seconds(baseline, args.count, args.repeats), 4)
  for task in taxonomy.TASK_TYPES:
    for split, difficulty in (("train", 0), ("train", 3), ("eval", 0)):
      def run(first, n, task=task, split=split, difficulty=difficulty):
        for i in range(first, first + n):
          registry.generate(task, split, i, difficulty)

      key = f"{task}_{split}_d{difficulty}"
      seconds = _seconds(run, args.count, args.repeats)
      out[f"{key}_s"] = round(seconds, 3)
      out[f"ratio_{key}"] = round(seconds / out["baseline_s"], 1)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
