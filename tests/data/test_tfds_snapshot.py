"""TFDS snapshot: builds and reads back (array_record, no TensorFlow) equal to the generator."""
import json
import sys

import numpy as np
import pytest

from openvlthinker import taxonomy
from openvlthinker.data import pipeline
from openvlthinker.data import tokenizer as tokenizer_lib
from openvlthinker.data.tfds import suite_snapshot
from openvlthinker.tasks import registry

TRAIN, EVAL = 3, 2


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tfds")
  config = suite_snapshot.SnapshotConfig(name="test", train_per_task=TRAIN, eval_per_task=EVAL,
                                         image_size=48, difficulty=1)
  suite_snapshot.OpenvlthinkerSuite(config=config, data_dir=str(path)).download_and_prepare(
      file_format="array_record")
  return str(path)


def test_builds_and_reads_without_tensorflow(data_dir):
  assert "tensorflow" not in sys.modules
  source = suite_snapshot.SnapshotSource(data_dir, config="test", split="train")
  assert sorted(source.by_task()) == sorted(taxonomy.TASK_TYPES)
  assert "tensorflow" not in sys.modules


@pytest.mark.parametrize("split, count", [("train", TRAIN), ("eval", EVAL)])
def test_read_back_equals_the_generator(data_dir, split, count):
  by_task = suite_snapshot.SnapshotSource(data_dir, config="test", split=split).by_task()
  for task_type, records in by_task.items():
    assert len(records) == count
    got = {ex.uid: ex for ex in (records[i] for i in range(count))}
    for index in range(count):
      want = registry.generate(task_type, split, index, difficulty=1, image_size=48)
      have = got[want.uid]
      assert len(have.images) == len(want.images)
      for a, b in zip(have.images, want.images):
        assert a.dtype == np.uint8
        np.testing.assert_array_equal(a, b)
      for field in ("question", "answer", "problem_type", "task_type", "reasoning", "options"):
        assert getattr(have, field) == getattr(want, field), field
      # meta travels as JSON: tuples come back as lists.
      assert have.meta == json.loads(json.dumps(want.meta))


def test_missing_snapshot_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"openvlthinker_suite/tiny is not built"):
    suite_snapshot.SnapshotSource(str(tmp_path), config="tiny")
  with pytest.raises(ValueError, match=r"split: got 'test'"):
    suite_snapshot.SnapshotSource(str(tmp_path), split="test")


def test_snapshot_feeds_the_sft_pipeline(data_dir):
  config = pipeline.DataConfig(source="tfds", path=data_dir, tfds_config="test", batch_size=6,
                               image_size=48, seq_len=160, mixture={"ocr": 1, "math_reasoning": 1})
  tok = tokenizer_lib.load_tokenizer()
  it = iter(pipeline.sft_dataset(config, tok, shard_index=0, shard_count=1))
  batches = [next(it) for _ in range(2)]
  assert all(b["images"].shape == (6, 1, 48, 48, 3) for b in batches)
  assert sorted(set(np.concatenate([b["task_ids"] for b in batches]).tolist())) == sorted(
      taxonomy.task_id(t) for t in ("ocr", "math_reasoning"))
