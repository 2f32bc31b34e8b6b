"""Logical data shards (`data/shards.py`): which shards a process reads, each process's batch as
its shards' batches in order, the iterator state of every shard, and the one-line errors. (Two
real processes reading their shards: `tests/train/test_multiprocess.py`.)"""
import numpy as np
import pytest

from openvlthinker.data import pipeline, shards
from openvlthinker.data import tokenizer as tokenizer_lib


def test_layout_gives_each_process_a_contiguous_range_of_shards():
  assert shards.ShardLayout.for_processes(0, processes=1, process=0) == shards.ShardLayout(1, 0, 1)
  assert shards.ShardLayout.for_processes(0, processes=4, process=3) == shards.ShardLayout(4, 3, 1)
  layout = shards.ShardLayout.for_processes(8, processes=2, process=1)
  assert (layout.count, list(layout.indices)) == (8, [4, 5, 6, 7])
  with pytest.raises(ValueError, match=r"^data.shards: expected a multiple of the 4 processes"):
    shards.ShardLayout.for_processes(6, processes=4, process=0)
  assert layout.per_shard(32, "rl.prompts_per_step") == 4
  with pytest.raises(ValueError, match=r"^rl.prompts_per_step: expected a multiple of "
                                       r"data.shards=8 .*got 12"):
    layout.per_shard(12, "rl.prompts_per_step")


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.load_tokenizer()


def config(batch_size, **kw):
  return pipeline.DataConfig(batch_size=batch_size, seq_len=192, prompt_buckets=(64, 96, 128),
                             **kw)


def take(it, n):
  return [next(it) for _ in range(n)]


def test_a_process_batch_is_its_shards_batches_in_order(tok):
  """Two shards read by one process: each batch is shard 0's then shard 1's, prompts padded to
  the wider bucket; the state holds both shards' and resumes exactly."""
  layout = shards.ShardLayout.for_processes(2, processes=1, process=0)
  it = shards.rl_batches(config(3), tok, layout)
  parts = [iter(pipeline.rl_dataset(config(3), tok, shard_index=i, shard_count=2))
           for i in range(2)]
  for _ in range(3):
    got = next(it)
    a, b = next(parts[0]), next(parts[1])
    width = max(a["prompt_tokens"].shape[1], b["prompt_tokens"].shape[1])
    assert got["prompt_tokens"].shape == (6, width)
    for key in ("uid", "task_ids", "answer"):
      np.testing.assert_array_equal(got[key], np.concatenate([a[key], b[key]]))
    for part, rows in ((a, slice(0, 3)), (b, slice(3, 6))):
      n = part["prompt_tokens"].shape[1]
      np.testing.assert_array_equal(got["prompt_tokens"][rows, :n], part["prompt_tokens"])
      assert not got["prompt_mask"][rows, n:].any()
    assert int(got["num_dropped"]) == int(a["num_dropped"]) + int(b["num_dropped"])

  state = it.get_state()
  assert len(state["shards"]) == 2
  after = take(it, 2)
  resumed = shards.rl_batches(config(3), tok, layout)
  resumed.set_state(state)
  for x, y in zip(after, take(resumed, 2)):
    np.testing.assert_array_equal(x["uid"], y["uid"])


def test_one_shard_reads_what_the_pipeline_reads_and_takes_an_old_state(tok):
  """With one shard (one process, data.shards=0) the stream is the pipeline's own, and a
  checkpoint written before data shards (one iterator's state) resumes it."""
  layout = shards.ShardLayout.for_processes(0, processes=1, process=0)
  plain = iter(pipeline.sft_dataset(config(4), tok, shard_index=0, shard_count=1))
  first = next(plain)
  old_state = plain.get_state()
  it = shards.sft_batches(config(4), tok, layout)
  np.testing.assert_array_equal(next(it)["tokens"], first["tokens"])
  fresh = shards.sft_batches(config(4), tok, layout)
  fresh.set_state(old_state)
  np.testing.assert_array_equal(next(fresh)["tokens"], next(plain)["tokens"])


def test_a_state_with_another_shard_count_is_a_one_line_error(tok):
  it = shards.sft_batches(config(4), tok, shards.ShardLayout.for_processes(2, 1, 0))
  state = it.get_state()
  other = shards.sft_batches(config(4), tok, shards.ShardLayout.for_processes(4, 1, 0))
  with pytest.raises(ValueError, match=r"^data.shards: the checkpoint's data iterator holds 2 "
                                       r"shard states, expected 4"):
    other.set_state(state)
