"""The step's metrics from its minibatch updates (`rl_metrics.reduce_updates`): skips summed, the
rest averaged over the minibatches, per-task advantage statistics for the tasks with a valid row."""
import types

import numpy as np
import pytest

from openvlthinker import taxonomy
from openvlthinker.train import rl_metrics

T = taxonomy.TASK_TYPES


def test_updates_reduce_to_one_value_each_and_tasks_with_a_valid_row():
  # Task 0: one valid row; task 1: three; task 2: a row, but not valid; the rest: none.
  batch = types.SimpleNamespace(task_ids=np.array([0, 1, 1, 1, 2, 0]),
                                valid=np.array([True, True, True, True, False, False]))
  mean = [np.arange(len(T), dtype=np.float32), np.arange(len(T), dtype=np.float32) + 2]
  updates = [{"loss": np.float32(1.0), "skipped_step": np.float32(s), "task_adv_mean": m,
              "task_adv_std": m * 0 + 1} for s, m in zip((0, 1), mean)]
  out = rl_metrics.reduce_updates(updates, batch)
  assert out["loss"] == 1.0 and out["skipped_step"] == 1.0
  assert {k: v for k, v in out.items() if k.startswith("adv_mean/")} == {
      f"adv_mean/{T[0]}": 1.0, f"adv_mean/{T[1]}": 2.0}
  assert out[f"adv_std/{T[0]}"] == pytest.approx(1.0)


def test_task_gradient_shares_are_float64_over_the_present_tasks():
  """The float32 norms the device returns are logged as they are and their shares computed in
  float64 (1/3 and 2/3 to double precision, so the logged shares sum to 1); a task without rows
  in the minibatch is left out even when its norm is not 0."""
  norms = np.array([1.0, 2.0, 5.0] + [0.0] * (len(T) - 3), np.float32)
  out = rl_metrics.task_balance_metrics(norms, np.array([0, 1, 1]))
  assert out == {f"grad_norm_task/{T[0]}": 1.0, f"grad_norm_task/{T[1]}": 2.0,
                 f"grad_share/{T[0]}": 1 / 3, f"grad_share/{T[1]}": 2 / 3}


def test_rollout_metrics_against_numpy():
  """Reward parts over every sampled response (filtered or not), per task and overall; entropy,
  length term and overlong penalty over the kept rows; lengths over all rows."""
  from openvlthinker.train.batch import RowSummary
  rng = np.random.default_rng(0)
  n = 12
  sampled = {"reward": rng.normal(size=n), "accuracy": rng.integers(0, 2, n).astype(np.float32),
             "format": rng.uniform(size=n), "unparsable": rng.integers(0, 2, n),
             "task_ids": np.repeat([0, 3, 3, 5], 3)}
  valid = np.array([True] * 6 + [False] * 3 + [True] * 3)
  task_ids = sampled["task_ids"]
  rows = RowSummary(reward=sampled["reward"], accuracy=sampled["accuracy"], format=sampled["format"],
                    structure=np.zeros(n), length_reward=rng.uniform(size=n),
                    overlong_penalty=-rng.uniform(size=n), lengths=rng.integers(1, 9, n),
                    task_ids=task_ids, task_keys=task_ids, valid=valid,
                    token_entropy=rng.uniform(size=n))
  out = rl_metrics.rollout_metrics(rows, sampled, length_shaping=True)
  for key, name in (("reward", "reward"), ("accuracy", "reward_accuracy"),
                    ("format", "reward_format")):
    assert out[f"{name}/mean"] == pytest.approx(sampled[key].mean())
    for t in (0, 3, 5):
      assert out[f"{name}/{T[t]}"] == pytest.approx(sampled[key][task_ids == t].mean())
    assert f"{name}/{T[1]}" not in out  # absent tasks are left out
  assert out["unparsable_frac"] == pytest.approx(sampled["unparsable"].mean())
  assert out["overlong_penalty/mean"] == pytest.approx(rows.overlong_penalty[valid].mean())
  for t in (0, 3, 5):
    kept = (task_ids == t) & valid
    assert out[f"length_reward/{T[t]}"] == pytest.approx(rows.length_reward[kept].mean())
    assert out[f"entropy/{T[t]}"] == pytest.approx(rows.token_entropy[kept].mean())
    assert out[f"length/{T[t]}"] == pytest.approx(rows.lengths[task_ids == t].mean())
  off = rl_metrics.rollout_metrics(rows.replace(overlong_penalty=None), sampled, False)
  assert not any(k.startswith(("length_reward/", "overlong_penalty")) for k in off)


def test_a_run_of_empty_steps_stops_after_max_empty_steps(capsys):
  """`RLStage.count_empty`: each step the filter kept nothing warns on stderr; a step with a kept
  group resets the count; the max_empty_steps-th in a row stops the run."""
  from configs import test as test_config
  from openvlthinker.errors import RunError
  from openvlthinker.train.rl_stage import RLStage
  c = test_config.get_config()
  c.rl.filter.max_empty_steps = 3
  stage = types.SimpleNamespace(c=c, empty_streak=0)
  empty = types.SimpleNamespace(valid=np.zeros(4, bool))
  kept = types.SimpleNamespace(valid=np.array([False, True, False, False]))
  count = lambda step, rows: RLStage.count_empty(stage, step, rows, sampled_groups=2)
  assert count(0, empty) and count(1, empty)
  err = capsys.readouterr().err
  assert "rl step 2: the filter kept 0 of 2 sampled groups" in err and "(2 in a row" in err
  assert not count(2, kept) and stage.empty_streak == 0
  assert count(3, empty) and count(4, empty)
  with pytest.raises(RunError, match="rl.filter: 3 steps in a row kept no group"):
    count(5, empty)
