"""Latency of `rewards.score` on 4 KB responses, per problem type, against the spec regex; and
the throughput of `scoring.score_rows` on an RL batch, with the worker pool and without it.

Prints one JSON line: p50 / p99 / max milliseconds per call of `rewards.score` for --count
responses of about 4 KB per problem type (a long thinking part and an answer), pooled over
--repeats runs, and the same percentiles of the REFERENCE §2 format regex alone on the same
responses (the baseline), with `ratio_p99_*` = score / regex. The math caches are cleared before
every call, so the figures are the uncached cost.

Throughput: --batch responses (512 prompts x 8; the problem types in turn, math twice as often
and half of it in the forms math-verify reads) of about --tokens tokens (4 characters each), in
responses/s, the median of --repeats batches, each drawn anew with the caller's caches cleared:
`pool_rps` through score_rows and its process pool (started beforehand: `pool_start_s`),
`serial_rps` rewards.score_batch in the caller, `threads_rps` the same chunks on a thread pool
of the pool's size (the GIL keeps it near serial). `load_avg_*` is os.getloadavg() before and
after: the figures are only as good as the machine is idle.

  python benchmarks/reward_latency.py [--count 300] [--repeats 3] [--batch 4096] [--tokens 2000]
"""
import argparse
import json
import os
import re
import sys
import time
from concurrent import futures

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from openvlthinker.rl import math_equiv  # noqa: E402
from openvlthinker.rl import math_parse  # noqa: E402
from openvlthinker.rl import math_verify_grader  # noqa: E402
from openvlthinker.rl import rewards  # noqa: E402
from openvlthinker.rl import scoring  # noqa: E402

SPEC = re.compile(rewards.FORMAT_PATTERN, re.DOTALL)


def _clear_caches():
  math_equiv.check.cache_clear()
  math_parse.parse.cache_clear()
  math_verify_grader.check.cache_clear()
  math_verify_grader.read.cache_clear()


def _cases(problem_type, n, rng, chars=4096):
  """(response, answer, fields) triples; responses about `chars` characters."""
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
    filler = ("we compare the values and check them again " * (chars // 40 + 1))[
        :chars - len(head) - len(tail)]
    out.append((head + filler + tail, truth, fields))
  return out


# Math answers in the forms math-verify reads (the polynomials of _cases stay in math_equiv):
# (truth, right answer, wrong answer) of a, b.
_MATH_FORMS = (
    lambda a, b: ("(%d, %d)" % (a, b), "(%d,%d)" % (a, b), "(%d, %d)" % (b, a + 1)),
    lambda a, b: ("[%d, %d)" % (a, a + b), "[%d,%d)" % (a, a + b), "[%d, %d]" % (a, a + b)),
    lambda a, b: ("\\frac{%d}{%d}" % (a, b + 1),
                  "The answer is \\boxed{\\frac{%d}{%d}}." % (a, b + 1),
                  "The answer is %d." % (a + b)),
    lambda a, b: ("\\{%d, %d\\}" % (a, -b), "x = %d or x = %d" % (-b, a), "\\{%d\\}" % a),
    lambda a, b: ("%d" % (a * b), "x = %d" % (a * b), "%d\\%%" % (a * b + 1)),
)


def _math_rows(rng, group, chars):
  a, b = (int(v) for v in rng.integers(1, 50, size=2))
  truth, right, wrong = _MATH_FORMS[int(rng.integers(len(_MATH_FORMS)))](a, b)
  rows = []
  for g in range(group):
    head, tail = f"<thinking>step {g}: ", f"</thinking><answer>{right if g % 2 else wrong}</answer>"
    filler = ("we compare the values and check them again " * (chars // 40 + 1))[
        :chars - len(head) - len(tail)]
    rows.append((head + filler + tail, truth, {}))
  return rows


def _rl_batch(rng, n, chars, group=8):
  """An RL prompt batch (host fields) of n // group prompts and n responses, prompt-major; math
  prompts get twice the share of the others, half of them in _MATH_FORMS."""
  kinds = list(rewards.REWARDS) + ["math", "math-forms"]
  prompts = n // group
  batch = {"answer": [], "problem_type": [], "options": []}
  texts = []
  for p in range(prompts):
    kind = kinds[p % len(kinds)]
    if kind == "math-forms":
      rows = _math_rows(rng, group, chars)
    else:
      rows = _cases(kind, group, rng, chars)
    kind = "math" if kind == "math-forms" else kind
    batch["answer"].append(rows[0][1])
    batch["problem_type"].append(kind)
    batch["options"].append(rows[0][2].get("options", ()))
    texts += [r for r, _, _ in rows]
  return texts, batch, np.repeat(np.arange(prompts), group)


def _threaded(texts, batch, index):
  examples = [{"answer": batch["answer"][p], "problem_type": batch["problem_type"][p],
               "options": tuple(batch["options"][p])} for p in index]
  size = -(-len(texts) // (scoring.workers() * scoring.CHUNKS_PER_WORKER))
  with futures.ThreadPoolExecutor(scoring.workers()) as pool:
    jobs = [pool.submit(rewards.score_batch, texts[a:a + size], examples[a:a + size])
            for a in range(0, len(texts), size)]
    return [j.result() for j in jobs]


def throughput(n: int, tokens: int, repeats: int, rng) -> dict:
  """Responses/s of score_rows with the pool, in the caller, and on threads (medians)."""
  start = time.perf_counter()
  texts, batch, index = _rl_batch(rng, n, 4 * tokens)
  scoring.score_rows(texts, batch, index)  # starts the pool (forkserver, workers' warm-up)
  out = {"batch": n, "response_tokens": tokens, "workers": scoring.workers(),
         "pool_start_s": round(time.perf_counter() - start, 2)}
  rates = {"pool_rps": [], "serial_rps": [], "threads_rps": []}
  for _ in range(repeats):
    texts, batch, index = _rl_batch(rng, n, 4 * tokens)
    examples = [{"answer": batch["answer"][p], "problem_type": batch["problem_type"][p],
                 "options": tuple(batch["options"][p])} for p in index]
    for key, run in (("pool_rps", lambda: scoring.score_rows(texts, batch, index)),
                     ("serial_rps", lambda: rewards.score_batch(texts, examples)),
                     ("threads_rps", lambda: _threaded(texts, batch, index))):
      _clear_caches()
      start = time.perf_counter()
      run()
      rates[key].append(n / (time.perf_counter() - start))
  out.update({k: round(float(np.median(v)), 1) for k, v in rates.items()})
  out["pool_speedup"] = round(out["pool_rps"] / out["serial_rps"], 2)
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--count", type=int, default=300)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--batch", type=int, default=4096)
  parser.add_argument("--tokens", type=int, default=2000)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  math_verify_grader.warm_up()  # sympy's lazy imports, antlr's prediction cache
  out = {"count": args.count, "repeats": args.repeats, "response_chars": 4096,
         "load_avg_before": [round(v, 2) for v in os.getloadavg()]}
  pooled = []
  for problem_type in rewards.REWARDS:
    times, base = [], []
    for _ in range(args.repeats):
      for response, truth, fields in _cases(problem_type, args.count, rng):
        _clear_caches()
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
  out.update(throughput(args.batch, args.tokens, args.repeats, rng))
  out["load_avg_after"] = [round(v, 2) for v in os.getloadavg()]
  print(json.dumps(out))


if __name__ == "__main__":
  main()
