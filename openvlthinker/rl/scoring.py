"""Host-side scoring of sampled responses: decode, score, count the unparsable.

Used by RL rollouts and by evaluation, so both score the same way. Scoring never raises on model
output; responses that do not parse score 0 accuracy and are counted. Batches of POOL_MIN_ROWS
rows or more are scored in a pool of worker processes (pure-Python scoring holds the GIL, so
threads would not help): forkserver workers, never forked from the trainer, whose JAX runtime has
threads running. A row whose worker fails scores as an unparsable 0.
"""
from __future__ import annotations

import atexit
import concurrent.futures as futures
import multiprocessing
import os
import signal
import threading
from typing import Callable, Sequence

import numpy as np

from openvlthinker import taxonomy
from openvlthinker.rl import math_verify_grader
from openvlthinker.rl import rewards

POOL_MIN_ROWS = 64  # below this a pool costs more (pickling, a round trip) than it saves
MAX_WORKERS = 32
CHUNKS_PER_WORKER = 4  # contiguous chunks: a prompt's G rows share a worker and its truth cache
# A round of chunks is given up on (as a hang: every call has a deadline of 0.5 s) after
# ROUND_TIMEOUT_S plus ROW_TIMEOUT_S per row per worker.
ROUND_TIMEOUT_S = 30.0
ROW_TIMEOUT_S = 1.0
_KEYS = ("format", "accuracy", "structure", "overall")

_lock = threading.Lock()
_state: dict = {"pool": None, "failed": False}

ScoreFn = Callable[[Sequence[str], Sequence[dict]], dict]


def decode_responses(tokenizer, tokens: np.ndarray, lengths: np.ndarray) -> list[str]:
  """int32[B, Lr] response tokens → B strings (each cut at its length; decode stops at eos)."""
  return [tokenizer.decode(row[:n].tolist()) for row, n in zip(np.asarray(tokens),
                                                               np.asarray(lengths))]


def score_rows(texts: Sequence[str], batch: dict, prompt_index: np.ndarray) -> dict[str, np.ndarray]:
  """Scores row b against prompt prompt_index[b] of an RL prompt batch (host fields)."""
  examples = [{"answer": batch["answer"][p], "problem_type": batch["problem_type"][p],
               "options": tuple(batch["options"][p])} for p in np.asarray(prompt_index)]
  return score_examples(list(texts), examples)


def score_examples(texts: list[str], examples: list[dict],
                   score_fn: ScoreFn = rewards.score_batch) -> dict[str, np.ndarray]:
  """rewards.score_batch(texts, examples), in the pool when the batch is large enough for it to
  pay and one can start; the same arrays either way. score_fn must be a module-level function
  (workers import it by name); tests pass one that fails on purpose."""
  if len(texts) != len(examples):
    raise ValueError(f"texts: got {len(texts)}, expected one per example ({len(examples)})")
  for kind in {ex["problem_type"] for ex in examples}:
    taxonomy.canonical_problem_type(kind)  # a caller bug raises here, not in a worker
  if len(texts) < POOL_MIN_ROWS or _pool() is None:
    return score_fn(texts, examples)
  return _score_in_pool(texts, examples, score_fn)


def workers() -> int:
  """The pool's size: the CPUs this process may use, at most MAX_WORKERS."""
  try:
    cpus = len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    cpus = os.cpu_count() or 1
  return max(1, min(cpus, MAX_WORKERS))


def _pool() -> futures.ProcessPoolExecutor | None:
  """The process-wide pool, started on first use; None if it cannot start (then never retried)."""
  with _lock:
    if _state["pool"] is None and not _state["failed"]:
      try:
        ctx = multiprocessing.get_context("forkserver")
        # Workers fork from a fresh server process that has imported the scorer once.
        ctx.set_forkserver_preload(["openvlthinker.rl.scoring"])
        _state["pool"] = futures.ProcessPoolExecutor(workers(), mp_context=ctx,
                                                     initializer=_init_worker)
      except (OSError, ValueError, RuntimeError, ImportError):
        _state["failed"] = True
    return _state["pool"]


def _init_worker() -> None:
  # Ctrl-C is the trainer's to handle (it saves a checkpoint first); a worker that took it too
  # would die mid-batch with a traceback, and the batch would score as failed rows.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  math_verify_grader.warm_up()


def shutdown() -> None:
  """Stops the pool's workers (at exit, or after one broke); the next large batch starts anew."""
  with _lock:
    pool, _state["pool"] = _state["pool"], None
  if pool is not None:
    for process in list(getattr(pool, "_processes", {}).values()):
      process.terminate()  # a worker stuck in a call would otherwise hold shutdown forever
    pool.shutdown(wait=True, cancel_futures=True)


atexit.register(shutdown)


def _failed_rows(n: int) -> dict[str, np.ndarray]:
  out = {k: np.zeros(n, np.float32) for k in _KEYS}
  out["unparsable"] = np.ones(n, np.int32)
  return out


def _concat(parts: list[dict]) -> dict[str, np.ndarray]:
  return {k: np.concatenate([p[k] for p in parts]) for k in (*_KEYS, "unparsable")}


def _score_in_pool(texts, examples, score_fn) -> dict[str, np.ndarray]:
  """Contiguous chunks in parallel. A chunk that fails is split in halves and rerun until the
  rows that fail by themselves are found; those score as unparsable 0s. A worker that dies or
  hangs takes every chunk in flight with it, so a row lost that way is only condemned after
  failing again alone."""
  n = len(texts)
  size = max(1, -(-n // (workers() * CHUNKS_PER_WORKER)))
  queue = [(a, min(n, a + size)) for a in range(0, n, size)]
  parts: dict[int, dict] = {}
  suspects = []
  while queue or suspects:
    batch, alone = (queue, False) if queue else ([suspects.pop()], True)
    queue = []
    for (a, b), (part, lost) in zip(batch, _run(score_fn, texts, examples, batch)):
      if part is not None:
        parts[a] = part
      elif b - a > 1:
        queue += [(a, (a + b) // 2), ((a + b) // 2, b)]
      elif lost and not alone:
        suspects.append((a, b))
      else:
        parts[a] = _failed_rows(1)
  return _concat([parts[a] for a in sorted(parts)])


def _run(score_fn, texts, examples, bounds) -> list[tuple[dict | None, bool]]:
  """(score_fn's arrays or None, lost) for each [a, b) slice, run in the pool (here when none can
  start). lost: the slice failed with the pool (a worker died, or the round passed its time
  limit), not by raising; the pool is then replaced."""
  pool = _pool()
  if pool is None:
    return [_in_process(score_fn, texts[a:b], examples[a:b]) for a, b in bounds]
  try:
    jobs = [pool.submit(score_fn, texts[a:b], examples[a:b]) for a, b in bounds]
  except (RuntimeError, futures.BrokenExecutor):  # broken or shut down: the next one starts anew
    shutdown()
    return [(None, True)] * len(bounds)
  except Exception:  # noqa: BLE001 - workers cannot start here (e.g. in a daemonic process)
    shutdown()
    _state["failed"] = True
    return [_in_process(score_fn, texts[a:b], examples[a:b]) for a, b in bounds]
  rows = sum(b - a for a, b in bounds)
  done, _ = futures.wait(jobs, timeout=ROUND_TIMEOUT_S + ROW_TIMEOUT_S * rows / workers())
  out, broken = [], len(done) < len(jobs)
  for job in jobs:
    if job not in done:
      out.append((None, True))
      continue
    try:
      out.append((job.result(), False))
    except futures.BrokenExecutor:
      out.append((None, True))
      broken = True
    except Exception:  # noqa: BLE001 - a worker's failure must not take the run down
      out.append((None, False))
  if broken:
    shutdown()
  return out


def _in_process(score_fn, texts, examples) -> tuple[dict | None, bool]:
  try:
    return score_fn(texts, examples), False
  except Exception:  # noqa: BLE001 - as in a worker
    return None, False


def per_task_means(values: dict[str, np.ndarray], task_ids: np.ndarray, num_tasks: int,
                   valid: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Mean of each float[B] array per task id → float[num_tasks] (NaN for absent tasks)."""
  valid = np.ones(len(task_ids), bool) if valid is None else np.asarray(valid, bool)
  counts = np.bincount(task_ids[valid], minlength=num_tasks).astype(np.float64)
  out = {}
  for key, v in values.items():
    sums = np.bincount(task_ids[valid], weights=np.asarray(v, np.float64)[valid],
                       minlength=num_tasks)
    with np.errstate(invalid="ignore", divide="ignore"):
      out[key] = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
  out["count"] = counts
  return out
