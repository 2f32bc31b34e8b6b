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
