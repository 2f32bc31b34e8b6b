"""RL's verdict (eval/verdict.py) on hand-made before/after results, and the per-task standard
error it relies on (evaluator.per_task) against a direct computation over problems."""
import numpy as np
import pytest

from openvlthinker import taxonomy
from openvlthinker.eval.evaluator import Samples, per_task
from openvlthinker.eval.verdict import format_verdict, rl_verdict

T = taxonomy.NUM_TASKS


def results(acc, se=0.02):
  return {"accuracy": np.asarray(acc, np.float64), "accuracy_se": np.full(T, se)}


def test_learned_when_the_mean_rises_enough_and_five_of_six_improve():
  before = results([0.1, 0.5, 0.3, 0.0, 0.2, 0.0])
  after = results([0.2, 0.56, 0.4, 0.05, 0.3, 0.0])  # OCR unchanged: 5 of 6 improve
  v = rl_verdict(before, after)
  assert v["mean_accuracy_before"] == pytest.approx(1.1 / 6)
  assert v["mean_accuracy_change"] == pytest.approx(0.41 / 6)
  assert (v["tasks_improved"], v["tasks_evaluated"]) == (5, 6)
  assert v["tasks_lowered_beyond_se"] == [] and v["rl_learned"]
  assert "RL learned" in format_verdict(v) and "5 of 6" in format_verdict(v)


@pytest.mark.parametrize("after, why", [
    ([0.15, 0.55, 0.35, 0.05, 0.25, 0.0], "mean gain 0.05 - 0.05/6 < 0.05"),
    ([0.2, 0.56, 0.4, 0.0, 0.3, 0.0], "4 of 6 improve"),
    ([0.4, 0.8, 0.279, 0.05, 0.3, 0.01], "general VQA falls by 0.021 > its se 0.02"),
])
def test_not_learned(after, why):
  v = rl_verdict(results([0.1, 0.5, 0.3, 0.0, 0.2, 0.0]), results(after))
  assert not v["rl_learned"], why


def test_a_fall_within_one_standard_error_is_allowed_and_absent_tasks_are_skipped():
  before = results([0.1, 0.5, 0.3, np.nan, 0.2, 0.1])
  after = results([0.3, 0.7, 0.29, np.nan, 0.4, 0.2])  # VQA −0.01 < se 0.02; 4 of 5 improve
  v = rl_verdict(before, after)
  assert v["tasks_evaluated"] == 5 and v["tasks_improved"] == 4
  assert v["tasks_lowered_beyond_se"] == [] and v["rl_learned"]
  v = rl_verdict(before, results([0.3, 0.7, 0.25, np.nan, 0.4, 0.2]))
  assert v["tasks_lowered_beyond_se"] == ["general_vqa"] and not v["rl_learned"]


def test_per_task_standard_error_is_over_problems():
  rng = np.random.default_rng(3)
  k, task_ids = 4, np.asarray([0, 0, 0, 2, 2, 2, 2, 2, 5], np.int32)
  acc = rng.random((len(task_ids), k))
  parts = {m: acc for m in ("accuracy", "overall")}
  samples = Samples("s", [{}] * len(task_ids), [[""] * k] * len(task_ids), parts, task_ids, {})
  out = per_task([samples])
  for t in (0, 2):
    a = acc[task_ids == t].mean(axis=1)  # one value per problem, not per sample
    assert out["accuracy_se"][t] == pytest.approx(a.std(ddof=1) / np.sqrt(len(a)), rel=1e-12)
    assert out["accuracy"][t] == pytest.approx(a.mean(), rel=1e-12)
  assert np.isnan(out["accuracy_se"][5]) and np.isnan(out["accuracy_se"][1])  # 1 and 0 problems
