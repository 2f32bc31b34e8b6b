"""grain pipelines: batch contents, determinism, checkpoint/restore, workers, sharding, drops."""
import collections
import dataclasses
import json
import os
import re
import shutil
import zlib

import numpy as np
from PIL import Image
import pytest

from openvlthinker import taxonomy
from openvlthinker.data import pipeline
from openvlthinker.data import prompts
from openvlthinker.data import sources
from openvlthinker.data import tokenizer as tokenizer_lib
from openvlthinker.tasks.base import Example

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.load_tokenizer()


class ListSource:
  """A source of hand-made Examples: {task_type: [Example, ...]}."""

  def __init__(self, by_task):
    self._by_task = by_task

  def by_task(self):
    return self._by_task


def _example(k, task_type="general_vqa", n_images=1, reasoning_words=3, question=None):
  image = np.full((8, 8, 3), k, np.uint8)  # the fill value identifies the example in a batch
  return Example(images=(image,) * n_images, question=question or f"Question {k}?",
                 answer=str(k), problem_type="multiple choice", task_type=task_type,
                 options=(f"A. {k}", "B. no"), uid=f"ex{k}", meta={"k": k},
                 reasoning=f"<thinking>{' '.join(['w'] * reasoning_words)}</thinking>"
                           f"<answer>{k}</answer>")


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_sft_batch_rows_match_their_examples(tok):
  examples = [_example(k, n_images=1 + k % 2) for k in range(1, 7)]
  config = pipeline.DataConfig(batch_size=3, seq_len=96, max_images=2, num_image_tokens=4)
  it = iter(pipeline.sft_dataset(config, tok, source=ListSource({"general_vqa": examples}),
                                 shard_index=0, shard_count=1))
  for batch in _take(it, 4):
    assert batch["tokens"].shape == (3, 96) and batch["tokens"].dtype == np.int32
    assert batch["images"].shape == (3, 2, 64, 64, 3) and batch["images"].dtype == np.uint8
    assert int(batch["num_dropped"]) == 0
    for row in range(3):
      ex = examples[int(batch["images"][row, 0, 0, 0, 0]) - 1]
      n = len(ex.images)
      assert batch["num_images"][row] == n and batch["task_ids"][row] == 2
      assert np.all(batch["images"][row, :n] == ex.images[0][0, 0, 0])  # constant survives resize
      assert not batch["images"][row, n:].any()
      tokens, real, target = (batch[k][row] for k in ("tokens", "input_mask", "loss_mask"))
      assert np.array_equal(real, tokens != 0) and real[:real.sum()].all()  # right padding
      assert tok.decode(tokens[target]) == ex.reasoning and tokens[target][-1] == tok.eos_id
      prompt = tokens[real & ~target]
      assert prompt[0] == tok.bos_id and np.sum(prompt == tok.image_id) == 4 * n
      assert tok.decode(prompt[prompt != tok.image_id]) == prompts.prompt_text(ex).replace(
          "<image>", "")


def test_rl_batch_buckets_and_host_metadata(tok):
  # Prompts of very different lengths: the bucket follows the longest one in each batch.
  examples = [_example(k, task_type="ocr", question="Q? " + "long " * (k * 12))
              for k in range(1, 9)]
  config = pipeline.DataConfig(batch_size=2, prompt_buckets=(40, 64, 96, 128),
                               num_image_tokens=4)
  it = iter(pipeline.rl_dataset(config, tok, source=ListSource({"ocr": examples}),
                                shard_index=0, shard_count=1))
  by_uid = {ex.uid: ex for ex in examples}
  seen_buckets, seen_uids = set(), set()
  dropped = 0
  for batch in _take(it, 8):
    dropped += int(batch["num_dropped"])
    lengths = batch["prompt_mask"].sum(1)
    bucket = batch["prompt_tokens"].shape[1]
    assert bucket == min(b for b in config.prompt_buckets if b >= lengths.max())
    seen_buckets.add(bucket)
    for row in range(2):
      ex = by_uid[batch["uid"][row]]
      seen_uids.add(ex.uid)
      ids = batch["prompt_tokens"][row]
      assert np.array_equal(batch["prompt_mask"][row], np.arange(bucket) < lengths[row])
      assert not ids[lengths[row]:].any()
      np.testing.assert_array_equal(ids[:lengths[row]], prompts.encode_prompt(ex, tok, 4))
      assert batch["answer"][row] == ex.answer and batch["options"][row] == ex.options
      assert batch["meta"][row] == ex.meta and batch["problem_type"][row] == "multiple choice"
      assert batch["task_type"][row] == "ocr"
      assert batch["task_ids"][row] == taxonomy.task_id("ocr")
  assert len(seen_buckets) >= 2
  # Examples whose prompt exceeds 128 tokens never appear; they are counted instead.
  too_long = {ex.uid for ex in examples if len(prompts.encode_prompt(ex, tok, 4)) > 128}
  assert too_long and not too_long & seen_uids and dropped > 0


def test_drops_are_counted_exactly(tok):
  good = [_example(k) for k in range(1, 6)]
  bad = [_example(10, reasoning_words=200), _example(11, n_images=3),
         dataclasses.replace(_example(12), reasoning="")]
  by_task = {"general_vqa": good + bad}
  config = pipeline.DataConfig(batch_size=4, seq_len=128, max_images=2, num_image_tokens=4)
  batches = _take(iter(pipeline.sft_dataset(config, tok, source=ListSource(by_task),
                                            shard_index=0, shard_count=1)), 6)
  drops = sum(int(b["num_dropped"]) for b in batches)
  consumed = 6 * 4 + drops
  stream, _ = sources.mixed_dataset(by_task, None, config.seed)
  assert drops == sum(stream[i].uid in {"ex10", "ex11", "ex12"} for i in range(consumed))
  assert all(b["images"][:, 0, 0, 0, 0].max() < 10 for b in batches)


def test_a_config_that_drops_everything_fails_fast(tok):
  config = pipeline.DataConfig(batch_size=2, seq_len=10, max_drops_per_batch=20)
  it = iter(pipeline.sft_dataset(config, tok, shard_index=0, shard_count=1))
  with pytest.raises(ValueError, match=r"dropped 21 records.*longer_than_seq_len.*seq_len"):
    next(it)


def test_same_seed_same_batches_other_seed_other_batches(tok):
  def first(seed):
    config = pipeline.DataConfig(batch_size=4, seq_len=128, seed=seed)
    return _take(iter(pipeline.sft_dataset(config, tok, shard_index=0, shard_count=1)), 3)
  a = first(5)
  _assert_batches_equal(a, first(5))
  assert not np.array_equal(a[0]["tokens"], first(6)[0]["tokens"])


# Two worker processes take seconds to start (each imports grain and jax), so only the RL batch,
# whose host metadata (object arrays) must also cross the process boundary, runs with them.
@pytest.mark.parametrize("kind, workers", [("sft", 0), ("rl", 0), ("rl", 2)])
def test_restored_state_continues_with_the_next_batch(tok, kind, workers):
  make = pipeline.sft_dataset if kind == "sft" else pipeline.rl_dataset
  config = pipeline.DataConfig(batch_size=4, seq_len=128, worker_count=workers, seed=11)
  dataset = make(config, tok, shard_index=0, shard_count=1)
  it = iter(dataset)
  _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # what the trainer checkpoints
  expected = _take(it, 2)
  it.close()
  restored = iter(make(config, tok, shard_index=0, shard_count=1))
  restored.set_state(state)
  got = _take(restored, 2)
  restored.close()
  _assert_batches_equal(got, expected)


def test_process_shards_are_disjoint_and_cover_the_stream(tok):
  def uids(index, count, n):
    config = pipeline.DataConfig(batch_size=4)
    it = iter(pipeline.rl_dataset(config, tok, shard_index=index, shard_count=count))
    return [u for b in _take(it, n) for u in b["uid"]]
  whole = uids(0, 1, 2)
  shard0, shard1 = uids(0, 2, 1), uids(1, 2, 1)
  assert not set(shard0) & set(shard1)
  assert sorted(shard0 + shard1) == sorted(whole)


def test_mixture_weights_hold_exactly_per_block(tok):
  weights = {"ocr": 3, "math_reasoning": 1, "general_vqa_science_stem": 1}
  config = pipeline.DataConfig(batch_size=50, mixture=weights, seed=2)
  it = iter(pipeline.rl_dataset(config, tok, shard_index=0, shard_count=1))
  ids = np.concatenate([b["task_ids"] for b in _take(it, 20)])  # one 1000-record block
  counts = collections.Counter(taxonomy.TASK_TYPES[i] for i in ids)
  assert counts == {"ocr": 600, "math_reasoning": 200, "general_vqa": 200}


def test_suite_difficulty_reaches_the_generator(tok):
  config = pipeline.DataConfig(batch_size=6, difficulty={"ocr": 2}, mixture={"ocr": 1})
  batch = next(iter(pipeline.rl_dataset(config, tok, shard_index=0, shard_count=1)))
  assert all(m["difficulty"] == 2 for m in batch["meta"])
  assert all(u.startswith("ocr/train/d2/") for u in batch["uid"])


def test_json_source_through_the_rl_pipeline(tok, tmp_path):
  shutil.copy(os.path.join(FIXTURES, "public_format.jsonl"), tmp_path / "data.jsonl")
  colours = {"red.png": (255, 0, 0), "green.png": (0, 255, 0), "white.png": (255, 255, 255),
             "sub/black.png": (0, 0, 0), "wide.png": (9, 8, 7)}
  for name, colour in colours.items():
    os.makedirs(tmp_path / "imgs" / os.path.dirname(name), exist_ok=True)
    Image.fromarray(np.full((5, 7, 3), colour, np.uint8)).save(tmp_path / "imgs" / name)
  config = pipeline.DataConfig(source="json", path=str(tmp_path / "data.jsonl"), batch_size=4,
                               max_images=2, image_size=32)
  it = iter(pipeline.rl_dataset(config, tok, shard_index=0, shard_count=1))
  rows = {}  # uid -> (batch, row), over enough batches to meet every record
  for batch in _take(it, 4):
    assert batch["images"].shape == (4, 2, 32, 32, 3)
    rows.update({u: (batch, i) for i, u in enumerate(batch["uid"])})
  assert sorted(rows) == ["1", "2", "3", "4"]
  answers = {"1": "3", "2": "B", "3": "A", "4": "naïve café  ∑ x_{0}"}
  for uid, (batch, row) in rows.items():
    assert batch["answer"][row] == answers[uid]
    assert batch["num_images"][row] == (2 if uid == "3" else 1)
  batch, row = rows["3"]
  assert np.all(batch["images"][row, 0] == 255) and np.all(batch["images"][row, 1] == 0)
  batch, row = rows["1"]
  assert np.all(batch["images"][row, 0] == (255, 0, 0)) and not batch["images"][row, 1].any()


@pytest.mark.parametrize("changes, pattern", [
    ({"source": "hdf5"}, r"data\.source: got 'hdf5'"),
    ({"source": "json"}, r"data\.path: source 'json' needs a path"),
    ({"batch_size": 0}, r"data\.batch_size: expected a positive int"),
    ({"prompt_buckets": (64, 32)}, r"data\.prompt_buckets: expected increasing"),
    ({"split": "test"}, r"data\.split: got 'test'"),
    ({"worker_count": -1}, r"data\.worker_count"),
    ({"max_image_pixels": 0}, r"data\.max_image_pixels: expected a positive int"),
    ({"max_image_pixels": 2**40}, r"data\.max_image_pixels: expected at most"),
])
def test_config_errors_name_the_field(changes, pattern):
  with pytest.raises(ValueError, match=pattern):
    pipeline.DataConfig(**changes)


def _json_run(tmp_path, n=400, bad=(37, 111, 250, 399)):
  """data.jsonl of n records, one 4 x 4 image each; the images of `bad` (1%) do not decode."""
  noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
  Image.fromarray(noise).save(tmp_path / "noise.png")
  png = (tmp_path / "noise.png").read_bytes()
  huge = bytearray(png)  # its header claiming 12000 x 12000 pixels
  huge[16:24] = (12_000).to_bytes(4, "big") * 2
  huge[29:33] = zlib.crc32(bytes(huge[12:29])).to_bytes(4, "big")
  broken = [np.random.default_rng(1).bytes(200), b"", png[:len(png) // 2], bytes(huge)]
  records = []
  for k in range(n):
    name = f"imgs/{k}.png"
    os.makedirs(tmp_path / "imgs", exist_ok=True)
    if k in bad:
      (tmp_path / name).write_bytes(broken[bad.index(k) % len(broken)])
    else:
      Image.fromarray(np.full((4, 4, 3), k % 256, np.uint8)).save(tmp_path / name)
    records.append({"problem_id": k, "problem": "<image> How many?", "problem_type": "numerical",
                    "task_type": "chart_figure_qa", "answer": f"<answer>{k}</answer>",
                    "images": [name], "reasoning": f"<thinking>x</thinking><answer>{k}</answer>"})
  path = tmp_path / "data.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in records))
  return str(path), {str(k) for k in bad}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("make", [pipeline.sft_dataset, pipeline.rl_dataset])
def test_undecodable_images_are_dropped_and_counted(tok, tmp_path, make):
  path, bad = _json_run(tmp_path)
  config = pipeline.DataConfig(source="json", path=path, batch_size=25, seq_len=96,
                               num_image_tokens=4, skip_bad_records=True)
  # One mixture block (1000 records) holds the first two epochs whole: each bad record twice.
  batches = _take(iter(make(config, tok, shard_index=0, shard_count=1)), 40)
  drops = sum(int(b["num_dropped"]) for b in batches)
  assert drops >= 2 * len(bad)
  # The records read, in stream order, from the same seeded mixture: the bad ones among them.
  stream, _ = sources.mixed_dataset(pipeline.make_source(config).by_task(), None, config.seed)
  assert drops == sum(stream[i].uid in bad for i in range(40 * 25 + drops))
  if make is pipeline.rl_dataset:
    seen = {u for b in batches for u in b["uid"]}
    assert not seen & bad and len(seen) == 400 - len(bad)


def test_an_undecodable_image_without_skipping_is_one_line_naming_record_and_file(tok, tmp_path):
  path, _ = _json_run(tmp_path, n=20, bad=(5,))
  config = pipeline.DataConfig(source="json", path=path, batch_size=4, num_image_tokens=4)
  it = iter(pipeline.rl_dataset(config, tok, shard_index=0, shard_count=1))
  with pytest.raises(ValueError) as e:
    _take(it, 10)
  assert re.fullmatch(r"record data\.jsonl:6 \(problem_id 5\): cannot read image "
                      r"\S+/imgs/5\.png: not an image file PIL can identify", str(e.value))
