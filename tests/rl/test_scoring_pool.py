"""Pooled scoring: the same arrays as serial scoring, and a failing row or worker costs that row
only. The tests share one pool where they can: each start forks workers from a forkserver and
warms their math grader (about 2 s)."""
import multiprocessing
import os

import numpy as np
import pytest

from openvlthinker.rl import rewards
from openvlthinker.rl import scoring

MARKER = "<<fail here>>"
_TYPES = {
    "multiple choice": ("B", ("A. cat", "B. dog"), ["B", "(A)", "dog", "Z"]),
    "numerical": ("12.5", (), ["12.5", "12.50", "1e999", "NaN"]),
    "regression": ("-40", (), ["-38", "40", "x"]),
    "ocr": ("red cat sat", (), ["red cat sat", "red sat", ""]),
    "math": ("(1, 2)", (), ["(1,2)", "(2, 1)", "The answer is (1, 2).", r"\binom{999999}{499999}",
                            "9^9^9^9", r"\sum_{k=1}^{10^{9}} k^2", "(" * 40, "2^{"]),
    "spatial grounding": ('{"boxes": [10, 12, 30, 40]}', (),
                          ['{"boxes": [10, 12, 30, 40]}', '{"boxes": [0, 0, 1]}', "[" * 5000]),
    "open-ended": ("a red cat sat", (), ["the cat", "a red cat sat", "\U0001f408" * 10]),
}


def _batch(copies: int = 1):
  """texts, batch (host fields of an RL prompt batch) and prompt_index: every problem type, with
  answers right, wrong and hostile, each in well-formed and broken responses."""
  batch = {"answer": [], "problem_type": [], "options": []}
  texts, index = [], []
  for _ in range(copies):
    for kind, (truth, options, answers) in _TYPES.items():
      batch["answer"].append(f"<answer>{truth}</answer>" if kind == "math" else truth)
      batch["problem_type"].append(kind)
      batch["options"].append(options)
      for a in answers:
        for response in (f"<thinking>t</thinking><answer>{a}</answer>", a, f"<answer>{a}"):
          texts.append(response)
          index.append(len(batch["answer"]) - 1)
  return texts, {k: np.array(v, dtype=object) for k, v in batch.items()}, np.array(index)


def _examples(batch, index):
  return [{"answer": batch["answer"][p], "problem_type": batch["problem_type"][p],
           "options": tuple(batch["options"][p])} for p in index]


def fail_on_marker(texts, examples):
  """rewards.score_batch, except that it raises for a batch holding MARKER (in a worker)."""
  if any(MARKER in t for t in texts):
    raise RuntimeError("a scorer bug")
  return rewards.score_batch(texts, examples)


def die_on_marker(texts, examples):
  """rewards.score_batch, except that the worker process dies on MARKER."""
  if any(MARKER in t for t in texts):
    os._exit(3)
  return rewards.score_batch(texts, examples)


def die_on_marker_in_a_worker(texts, examples):
  """die_on_marker in a scoring worker (a multiprocessing child), fail_on_marker in the caller.
  Not told apart by an ignored SIGINT: a test process started in the background ignores it too."""
  if any(MARKER in t for t in texts) and multiprocessing.parent_process() is not None:
    os._exit(3)
  return fail_on_marker(texts, examples)


@pytest.fixture(scope="module", autouse=True)
def _shut_down_at_the_end():
  yield
  scoring.shutdown()


@pytest.fixture
def fresh_pool():
  """No pool to begin with, and none left behind (for tests that break or refuse one)."""
  scoring.shutdown()
  yield
  scoring.shutdown()
  scoring._state["failed"] = False


def _assert_same(got, want):
  assert set(got) == set(want)
  for key in want:
    assert got[key].dtype == want[key].dtype and got[key].tolist() == want[key].tolist(), key


def test_pooled_scores_equal_serial_scores():
  texts, batch, index = _batch(copies=2)
  assert len(texts) >= scoring.POOL_MIN_ROWS
  pooled = scoring.score_rows(texts, batch, index)
  assert scoring._state["pool"] is not None  # it did run in the pool
  _assert_same(pooled, rewards.score_batch(texts, _examples(batch, index)))
  assert pooled["accuracy"].sum() > 10 and pooled["unparsable"].sum() > 10


def test_a_row_that_raises_in_a_worker_scores_as_unparsable():
  texts, batch, index = _batch(copies=2)
  bad = 17
  texts[bad] = f"<thinking>t</thinking><answer>{MARKER}</answer>"
  got = scoring.score_examples(texts, _examples(batch, index), fail_on_marker)
  want = rewards.score_batch(texts, _examples(batch, index))
  failed = {"format": 0.0, "accuracy": 0.0, "structure": 0.0, "overall": 0.0, "unparsable": 1}
  assert {k: got[k][bad] for k in failed} == failed
  keep = np.arange(len(texts)) != bad
  _assert_same({k: v[keep] for k, v in got.items()}, {k: v[keep] for k, v in want.items()})


def test_ctrl_c_reaches_the_trainer_not_the_workers():
  """A Ctrl-C (SIGINT to the terminal's process group) is the trainer's to handle: it saves a
  checkpoint first. The workers ignore it and the next batch still scores in the pool."""
  import signal
  texts, batch, index = _batch(copies=2)
  scoring.score_rows(texts, batch, index)  # the pool is up
  pool = scoring._state["pool"]
  workers = list(pool._processes.values())
  for process in workers:
    os.kill(process.pid, signal.SIGINT)
  for process in workers:
    process.join(timeout=1.0)
    assert process.is_alive(), "a worker died of SIGINT"
  assert scoring._state["pool"] is pool
  _assert_same(scoring.score_rows(texts, batch, index),
               rewards.score_batch(texts, _examples(batch, index)))


# Three pool starts (the first, and one after each death of the worker): ~10 s, but it is the
# only test of how a lost slice is retried alone, so mutation testing (-m "not slow") runs it.
def test_a_worker_that_dies_costs_its_row_only(fresh_pool, monkeypatch):
  monkeypatch.setattr(scoring, "POOL_MIN_ROWS", 8)
  texts, batch, index = _batch()
  texts, index = texts[:8], index[:8]
  texts[5] = MARKER
  got = scoring.score_examples(texts, _examples(batch, index), die_on_marker)
  want = rewards.score_batch(texts, _examples(batch, index))
  assert got["unparsable"][5] == 1 and got["overall"][5] == 0.0
  keep = np.arange(len(texts)) != 5
  _assert_same({k: v[keep] for k, v in got.items()}, {k: v[keep] for k, v in want.items()})


def test_when_no_new_pool_starts_after_a_death_the_caller_scores_the_rest(fresh_pool,
                                                                          monkeypatch):
  """A worker dies on a row, and no new pool can start: the slices lost with the pool are scored
  in the caller (the same arrays as serial scoring), the row that killed the worker fails there
  too and is the only unparsable one."""
  monkeypatch.setattr(scoring, "POOL_MIN_ROWS", 8)
  real, starts = scoring.multiprocessing.get_context, []

  def the_first_start_only(method):
    starts.append(method)
    if len(starts) > 1:
      raise OSError("no processes here")
    return real(method)

  monkeypatch.setattr(scoring.multiprocessing, "get_context", the_first_start_only)
  texts, batch, index = _batch()
  texts, index = texts[:8], index[:8]
  texts[5] = MARKER
  got = scoring.score_examples(texts, _examples(batch, index), die_on_marker_in_a_worker)
  assert len(starts) == 2 and scoring._state["failed"]
  want = rewards.score_batch(texts, _examples(batch, index))
  assert got["unparsable"][5] == 1 and got["overall"][5] == 0.0
  keep = np.arange(len(texts)) != 5
  _assert_same({k: v[keep] for k, v in got.items()}, {k: v[keep] for k, v in want.items()})


def test_small_batches_are_scored_in_the_caller(monkeypatch):
  monkeypatch.setattr(scoring, "_pool", lambda: pytest.fail("no pool for a small batch"))
  texts, batch, index = _batch()
  texts, index = texts[:scoring.POOL_MIN_ROWS - 1], index[:scoring.POOL_MIN_ROWS - 1]
  _assert_same(scoring.score_rows(texts, batch, index),
               rewards.score_batch(texts, _examples(batch, index)))


def test_without_a_pool_scoring_falls_back_to_the_caller(fresh_pool, monkeypatch):
  def refuse(method):
    raise OSError("no processes here")

  monkeypatch.setattr(scoring.multiprocessing, "get_context", refuse)
  texts, batch, index = _batch(copies=2)
  _assert_same(scoring.score_rows(texts, batch, index),
               rewards.score_batch(texts, _examples(batch, index)))
  assert scoring._state == {"pool": None, "failed": True}


def test_an_unknown_problem_type_is_a_caller_bug(monkeypatch):
  monkeypatch.setattr(scoring, "_pool", lambda: pytest.fail("raised before any work is sent out"))
  texts, batch, index = _batch(copies=2)
  batch["problem_type"][0] = "astrology"
  with pytest.raises(ValueError):
    scoring.score_rows(texts, batch, index)


def test_the_pool_is_sized_to_the_host(monkeypatch):
  assert 1 <= scoring.workers() <= min(os.cpu_count(), scoring.MAX_WORKERS)
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
  assert scoring.workers() == min(3, scoring.MAX_WORKERS)
  monkeypatch.delattr(os, "sched_getaffinity")  # not Linux: all the host's CPUs, or one
  monkeypatch.setattr(os, "cpu_count", lambda: 2)
  assert scoring.workers() == min(2, scoring.MAX_WORKERS)
  monkeypatch.setattr(os, "cpu_count", lambda: None)
  assert scoring.workers() == 1


def test_workers_start_from_a_fork_server():
  """Not forked from the trainer: a fork of a process whose JAX runtime runs threads can hang."""
  texts, batch, index = _batch(copies=2)
  scoring.score_rows(texts, batch, index)
  assert scoring._state["pool"]._mp_context.get_start_method() == "forkserver"


def test_workers_that_cannot_start_leave_scoring_in_the_caller(fresh_pool, monkeypatch):
  class NoChildren(scoring.futures.ProcessPoolExecutor):
    def submit(self, *args, **kwargs):
      raise AssertionError("daemonic processes are not allowed to have children")

  monkeypatch.setattr(scoring.futures, "ProcessPoolExecutor", NoChildren)
  texts, batch, index = _batch(copies=2)
  _assert_same(scoring.score_rows(texts, batch, index),
               rewards.score_batch(texts, _examples(batch, index)))
  assert scoring._state == {"pool": None, "failed": True}
