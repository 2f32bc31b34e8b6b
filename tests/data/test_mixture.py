"""Task mixture: exact proportions per block, dense per-task indices, seeded order, weights."""
import collections

import numpy as np
import pytest

from openvlthinker.data import sources


@pytest.mark.parametrize("weights", [[1.0], [1, 1, 1, 1, 1, 1], [1, 2, 3], [0.001, 5, 0.3],
                                     [0.0004, 1.0]])
def test_mixture_counts_are_proportional(weights):
  counts = sources.mixture_counts(weights, block=1000)
  assert counts.sum() == 1000 and np.all(counts >= 1)
  exact = np.asarray(weights) / np.sum(weights) * 1000
  # Largest remainder: each count is within one of its exact share, plus one for every tiny weight
  # that was given a slot taken from the largest counts.
  tiny = np.sum(exact < 0.5)
  assert np.all((np.abs(counts - exact) <= 1 + tiny) | (exact < 1))


@pytest.mark.parametrize("weights", [[], [1, -1], [0, 1], [np.inf, 1], [np.nan]])
def test_mixture_counts_reject_bad_weights(weights):
  with pytest.raises(ValueError, match="mixture weights"):
    sources.mixture_counts(weights)


def test_task_mixture_blocks_are_exact_and_indices_dense():
  counts = [5, 1, 14]
  mixture = sources.TaskMixture(counts, seed=7)
  picks = [mixture[i] for i in range(3 * 20)]
  for block in range(3):
    tasks = collections.Counter(t for t, _ in picks[block * 20:(block + 1) * 20])
    assert tasks == {0: 5, 1: 1, 2: 14}
  for task, count in enumerate(counts):
    within = sorted(j for t, j in picks if t == task)
    assert within == list(range(3 * count))  # every record once, none skipped


def test_task_mixture_order_depends_on_seed_and_block():
  a = [sources.TaskMixture([50, 50], seed=1)[i] for i in range(200)]
  b = [sources.TaskMixture([50, 50], seed=2)[i] for i in range(200)]
  assert a != b
  first, second = [t for t, _ in a[:100]], [t for t, _ in a[100:]]
  assert first != second
  # A stride-2 slice (two processes or workers) still sees both tasks in one block.
  assert set(first[0::2]) == set(first[1::2]) == {0, 1}


def test_shuffled_epochs_permute_each_epoch_differently():
  ds = sources.ShuffledEpochs(list(range(7)), seed=4)
  epochs = [[ds[e * 7 + j] for j in range(7)] for e in range(4)]
  assert all(sorted(e) == list(range(7)) for e in epochs)
  assert len({tuple(e) for e in epochs}) == 4
  assert ds[3 * 7 + 2] == epochs[3][2] and ds[2] == epochs[0][2]  # random access, any order


def test_mixed_dataset_reads_finite_tasks_epoch_by_epoch():
  by_task = {"ocr": [f"o{i}" for i in range(10)], "general_vqa": [f"g{i}" for i in range(30)]}
  ds, tasks = sources.mixed_dataset(by_task, {"ocr": 1, "general_vqa": 3}, seed=0)
  assert tasks == ("general_vqa", "ocr")  # taxonomy order
  block = [ds[i] for i in range(1000)]
  counts = collections.Counter(block)
  # 250 ocr draws = 25 epochs of 10 records; 750 vqa draws = 25 epochs of 30.
  assert counts == {**{f"o{i}": 25 for i in range(10)}, **{f"g{i}": 25 for i in range(30)}}
  assert block != [ds2 for ds2 in sources.mixed_dataset(by_task, {"ocr": 1, "general_vqa": 3},
                                                        seed=1)[0][:1000]]


def test_mixed_dataset_uniform_default_and_seeded():
  by_task = {"ocr": list(range(4)), "math_reasoning": list(range(100, 104))}
  a, _ = sources.mixed_dataset(by_task, None, seed=3)
  b, _ = sources.mixed_dataset(by_task, None, seed=3)
  assert [a[i] for i in range(50)] == [b[i] for i in range(50)]
  assert sum(1 for i in range(1000) if a[i] < 100) == 500


@pytest.mark.parametrize("weights, pattern", [
    ({"cooking": 1.0}, "task_type: got 'cooking'"),
    ({"ocr": -1.0}, r"mixture\['ocr'\]: expected a finite weight >= 0"),
    ({"ocr": 0.0}, "at least one positive weight"),
    ({"chart_figure_qa": 1.0}, r"mixture\['chart_figure_qa'\].*no 'chart_figure_qa' records"),
])
def test_resolve_weights_errors(weights, pattern):
  with pytest.raises(ValueError, match=pattern):
    sources.resolve_weights(["ocr", "general_vqa"], weights)


def test_resolve_weights_accepts_aliases_and_drops_zeros():
  got = sources.resolve_weights(["ocr", "general_vqa"],
                                {"general_vqa_science_stem": 2, "ocr": 0})
  assert got == {"general_vqa": 2.0}
