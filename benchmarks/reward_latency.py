"""Latency of `rewards.score` on 4 KB responses, per problem type, against the spec regex.

Prints one JSON line: p50 / p99 / max milliseconds per call of `rewards.score` for --count
responses of about 4 KB per problem type (a long thinking part and an answer), pooled over
--repeats runs, and the same percentiles of the REFERENCE §2 format regex alone on the same
responses (the baseline), with `ratio_p99_*` = score / regex. The math caches are cleared before
every call, so the figures are the uncached cost.

  python benchmarks/reward_latency.py [--count 300] [--repeats 3]
"""
import argparse
import json
import os
import re
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from openvlthinker.rl import math_equiv  # noqa: E402
from openvlthinker.rl import math_parse  # noqa: E402
from openvlthinker.rl import rewards  # noqa: E402

SPEC = re.compile(rewards.FORMAT_PATTERN, re.DOTALL)


def _cases(problem_type, n, rng):
  """(response, answer, fields) triples; responses about 4096 characters."""
  out = []
  for i in range(n):
    a, b = (int(v) for v in rng.integers(1, 50, size=2))
    truth, pred, fields = {
        "multiple choice": ("C", "ABCD"[i % 4], {"options": ("A. a", "B. b", "C. c", "D. d")}),
        "numerical": (str(a), str(a + i % 2), {}),
        "regression": (str(a), str(a * 1.1), {}),
        "ocr": ("red cat sat on mat", "red cat sit on the mat", {}),
        "math": (f"x^2+{a + b}x+{a * b}", f"(x+{a})(x+{b + i % 2})", {}),
        "spatial grounding": ('{"boxes": [10, 10, 40, 40]}', f'{{"boxes": [{a}, {b}, 45, 50]}}',
                              {}),
        "open-ended": ("a red cat sat on the mat", "the cat on a mat", {}),
    }[problem_type]
    head = f"<thinking>step {i}: "
    tail = f"</thinking><answer>{pred}</answer>"
    filler = ("we compare the values and check them again " * 100)[:4096 - len(head) - len(tail)]
    out.append((head + filler + tail, truth, fields))
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--count", type=int, default=300)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  rewards.score("<answer>1</answer>", "1", "math")  # warm-up: sympy's lazy imports
  out = {"count": args.count, "repeats": args.repeats, "response_chars": 4096}
  pooled = []
  for problem_type in rewards.REWARDS:
    times, base = [], []
    for _ in range(args.repeats):
      for response, truth, fields in _cases(problem_type, args.count, rng):
        math_equiv.check.cache_clear()
        math_parse.parse.cache_clear()
        start = time.perf_counter()
        SPEC.match(response)
        mid = time.perf_counter()
        rewards.score(response, truth, problem_type, **fields)
        end = time.perf_counter()
        base.append(mid - start)
        times.append(end - mid)
    key = problem_type.replace(" ", "_")
    ms, base_ms = np.array(times) * 1e3, np.array(base) * 1e3
    out[f"{key}_p50_ms"] = round(float(np.percentile(ms, 50)), 3)
    out[f"{key}_p99_ms"] = round(float(np.percentile(ms, 99)), 3)
    out[f"{key}_max_ms"] = round(float(ms.max()), 3)
    out[f"regex_{key}_p99_ms"] = round(float(np.percentile(base_ms, 99)), 4)
    out[f"ratio_p99_{key}"] = round(out[f"{key}_p99_ms"] / max(out[f"regex_{key}_p99_ms"], 1e-6),
                                    1)
    pooled.extend(times)
  out["all_p99_ms"] = round(float(np.percentile(np.array(pooled) * 1e3, 99)), 3)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
