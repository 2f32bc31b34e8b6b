"""grain pipelines: SFT batches and RL prompt batches from a mixture of task types.

Order of work: source (suite | tfds | json) → per-task seeded shuffle and mixture (sources.py) →
this JAX process's slice → Example → features (tokenise, fit images) → fill a batch → worker
processes. Batches are numpy dicts; the keys in SFT_DEVICE_KEYS / RL_DEVICE_KEYS go to devices,
the others stay on the host. Iterators are grain DatasetIterators: `get_state()` is a JSON-able
dict the trainer checkpoints, and `set_state()` continues with exactly the next batch. The same
config (seed and worker_count included) gives the same batches.

Records that cannot fit are dropped and counted, never truncated (a cut response would teach the
model to stop without eos): an SFT example longer than seq_len, an RL prompt longer than the
largest bucket, more images than max_images, an SFT example with no reasoning. So is, under
skip_bad_records, a JSON record whose image file does not decode or is larger than
max_image_pixels ("bad_image"): one bad file never stops a run. Each batch carries `num_dropped`,
the records dropped while filling it, counted inside the workers so it is exact.
"""
import collections
from collections.abc import Callable, Mapping, Sequence
import dataclasses
import functools
from typing import Any

import grain
import jax
import numpy as np
from PIL import Image

from openvlthinker import taxonomy
from openvlthinker.data import images
from openvlthinker.data import json_source
from openvlthinker.data import prompts
from openvlthinker.data import sources
from openvlthinker.data import tokenizer as tokenizer_lib
from openvlthinker.tasks.base import Example

SOURCES = ("suite", "tfds", "json")
SFT_DEVICE_KEYS = ("tokens", "input_mask", "loss_mask", "images", "num_images", "task_ids")
RL_DEVICE_KEYS = ("prompt_tokens", "prompt_mask", "images", "num_images", "task_ids")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The pipeline's knobs (the trainer maps its ml_collections config onto these).

  source: 'suite' (procedural, infinite), 'tfds' (a built snapshot) or 'json' (public format).
  path: tfds: the data_dir; json: the .json / .jsonl file.
  image_root: json: directory of the relative image paths ('' = the file's directory).
  tfds_config: tfds: the snapshot's builder config name.
  split: 'train' or 'eval'.
  batch_size: examples (SFT) or prompts (RL) per batch, per JAX process.
  seq_len: SFT sequence length L, prompt and response included.
  prompt_buckets: RL prompt lengths; a batch pads to the smallest bucket holding its longest prompt.
  image_size: H = W of every image (others are resized, bilinear).
  num_image_tokens: token copies per `<image>`: (image_size / patch / merge)^2 of the model.
  max_images: N_img, image slots per example (unused slots are zeros).
  mixture: task type → weight (aliases accepted; None = uniform over the source's tasks).
  difficulty: task type → suite difficulty (missing tasks: 0).
  seed: shuffling and mixture seed.
  worker_count: grain worker processes (0 = in the calling process).
  worker_buffer_size: batches each worker prepares ahead.
  skip_bad_records: json: skip and count records whose image file is missing or whose ground truth
    no answer could match (at start-up), and drop records whose image does not decode or has more
    than max_image_pixels pixels (counted in num_dropped); when False each of these raises an
    error naming the record (and the file).
  max_image_pixels: json: the most pixels an image may have (read from its header, before
    decoding); larger images are bad records. At most PIL's own hard limit (~179M).
  max_drops_per_batch: raise instead of dropping more records than this while filling one batch
    (a config that drops everything, e.g. seq_len too small, fails fast).
  """
  source: str = "suite"
  path: str = ""
  image_root: str = ""
  tfds_config: str = "small"
  split: str = "train"
  batch_size: int = 8
  seq_len: int = 128
  prompt_buckets: tuple[int, ...] = (64, 96, 128, 256)
  image_size: int = 64
  num_image_tokens: int = 16
  max_images: int = 1
  mixture: Mapping[str, float] | None = None
  difficulty: Mapping[str, int] | None = None
  seed: int = 0
  worker_count: int = 0
  worker_buffer_size: int = 2
  skip_bad_records: bool = False
  max_image_pixels: int = images.DEFAULT_MAX_PIXELS
  max_drops_per_batch: int = 1000

  def __post_init__(self):
    def positive(name):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"data.{name}: expected a positive int, got {value!r}")
    for name in ("batch_size", "seq_len", "image_size", "num_image_tokens", "max_images",
                 "worker_buffer_size", "max_drops_per_batch"):
      positive(name)
    images.check_max_pixels(self.max_image_pixels)
    if self.source not in SOURCES:
      raise ValueError(f"data.source: got {self.source!r}, expected one of {SOURCES}")
    if self.source != "suite" and not self.path:
      raise ValueError(f"data.path: source {self.source!r} needs a path, got ''")
    if self.split not in ("train", "eval"):
      raise ValueError(f"data.split: got {self.split!r}, expected 'train' or 'eval'")
    buckets = tuple(self.prompt_buckets)
    if not buckets or any(b <= 0 for b in buckets) or list(buckets) != sorted(set(buckets)):
      raise ValueError(f"data.prompt_buckets: expected increasing positive ints, got {buckets}")
    if not isinstance(self.worker_count, int) or self.worker_count < 0:
      raise ValueError(f"data.worker_count: expected an int >= 0, got {self.worker_count!r}")
    if not 0 <= self.seed < 2**32:
      raise ValueError(f"data.seed: expected an int in [0, 2**32), got {self.seed!r}")


def make_source(config: DataConfig):
  """The source named by config.source: an object with `by_task() -> {task: Examples}`."""
  if config.source == "suite":
    return sources.SuiteSource(config.split, config.difficulty, config.image_size)
  if config.source == "json":
    return json_source.JsonSource(config.path, config.image_root or None,
                                  skip_bad_records=config.skip_bad_records,
                                  max_image_pixels=config.max_image_pixels)
  # tensorflow_datasets is imported only when a snapshot is read: it is slow to import.
  from openvlthinker.data.tfds import suite_snapshot  # pylint: disable=g-import-not-at-top
  return suite_snapshot.SnapshotSource(config.path, config.tfds_config, config.split)


# ---------------------------------------------------------------------------------- features

@dataclasses.dataclass(frozen=True)
class Dropped:
  """Stands in for a record that cannot fit (or, "bad_image", cannot be read); counted by the
  batcher."""
  reason: str
  uid: str


# The config field each drop reason points at, for messages about records that do not fit.
DROP_FIELDS = {
    "prompt_longer_than_buckets": "data.prompt_buckets",
    "longer_than_seq_len": "data.seq_len",
    "too_many_images": "data.max_images",
    "no_reasoning": "data.source",
    "bad_image": "data.path",
}


def fit_images(example: Example, image_size: int, max_images: int) -> np.ndarray:
  """uint8[max_images, S, S, 3]: the images resized to S = image_size, then zero slots."""
  out = np.zeros((max_images, image_size, image_size, 3), np.uint8)
  for k, image in enumerate(example.images):
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f"example {example.uid!r}: image {k} must be uint8[H, W, 3], "
                       f"got {image.dtype}{list(image.shape)}")
    if image.shape[:2] != (image_size, image_size):
      image = np.asarray(Image.fromarray(image).resize((image_size, image_size),
                                                       Image.Resampling.BILINEAR))
    out[k] = image
  return out


class SftFeatures:
  """Example → {tokens int32[l], loss_mask bool[l], images, num_images, task_id} or Dropped."""

  def __init__(self, config: DataConfig, tokenizer: tokenizer_lib.Tokenizer):
    self._config, self._tokenizer = config, tokenizer

  def __call__(self, example: Example | json_source.BadRecord):
    c = self._config
    if isinstance(example, json_source.BadRecord):
      return Dropped(example.reason, example.uid)
    if len(example.images) > c.max_images:
      return Dropped("too_many_images", example.uid)
    if not example.reasoning:
      return Dropped("no_reasoning", example.uid)
    tokens, loss_mask = prompts.encode_sft(example, self._tokenizer, c.num_image_tokens)
    if len(tokens) > c.seq_len:
      return Dropped("longer_than_seq_len", example.uid)
    return {"tokens": tokens, "loss_mask": loss_mask,
            "images": fit_images(example, c.image_size, c.max_images),
            "num_images": len(example.images), "task_id": taxonomy.task_id(example.task_type)}


class RlFeatures:
  """Example → {prompt int32[lp], images, num_images, task_id, scoring metadata} or Dropped."""

  def __init__(self, config: DataConfig, tokenizer: tokenizer_lib.Tokenizer):
    self._config, self._tokenizer = config, tokenizer

  def __call__(self, example: Example | json_source.BadRecord):
    c = self._config
    if isinstance(example, json_source.BadRecord):
      return Dropped(example.reason, example.uid)
    if len(example.images) > c.max_images:
      return Dropped("too_many_images", example.uid)
    prompt = prompts.encode_prompt(example, self._tokenizer, c.num_image_tokens)
    if len(prompt) > c.prompt_buckets[-1]:
      return Dropped("prompt_longer_than_buckets", example.uid)
    return {"prompt": prompt, "images": fit_images(example, c.image_size, c.max_images),
            "num_images": len(example.images), "task_id": taxonomy.task_id(example.task_type),
            "answer": example.answer, "problem_type": example.problem_type,
            "task_type": example.task_type, "options": example.options, "uid": example.uid,
            "meta": example.meta}


# ---------------------------------------------------------------------------------- batching

def _pad_rows(rows: Sequence[np.ndarray], length: int, dtype) -> np.ndarray:
  out = np.zeros((len(rows), length), dtype)
  for i, row in enumerate(rows):
    out[i, :len(row)] = row
  return out


def _objects(values: Sequence[Any]) -> np.ndarray:
  out = np.empty(len(values), object)  # element-wise: np.asarray would unpack the tuples
  for i, v in enumerate(values):
    out[i] = v
  return out


def collate_sft(items: Sequence[dict], num_dropped: int, seq_len: int) -> dict[str, np.ndarray]:
  """SFT batch of B items.

  tokens int32[B, L] (`[bos] prompt response [eos]`, right-padded with 0), input_mask bool[B, L]
  (real tokens), loss_mask bool[B, L] (True at target positions: response tokens and eos; the
  trainer scores logits[:, t - 1] against tokens[:, t] where loss_mask[:, t]), images
  uint8[B, N_img, H, W, 3], num_images int32[B], task_ids int32[B]; host: num_dropped int32[].
  """
  lengths = [len(it["tokens"]) for it in items]
  return {
      "tokens": _pad_rows([it["tokens"] for it in items], seq_len, np.int32),
      "input_mask": np.arange(seq_len)[None, :] < np.asarray(lengths)[:, None],
      "loss_mask": _pad_rows([it["loss_mask"] for it in items], seq_len, bool),
      "images": np.stack([it["images"] for it in items]),
      "num_images": np.asarray([it["num_images"] for it in items], np.int32),
      "task_ids": np.asarray([it["task_id"] for it in items], np.int32),
      "num_dropped": np.asarray(num_dropped, np.int32),
  }


def prompt_bucket(length: int, buckets: Sequence[int]) -> int:
  """The smallest of `buckets` (increasing) that holds a prompt of `length` tokens."""
  return next(b for b in buckets if b >= length)


def collate_rl(items: Sequence[dict], num_dropped: int,
               buckets: Sequence[int]) -> dict[str, np.ndarray]:
  """RL prompt batch of P items.

  prompt_tokens int32[P, Lp] (`[bos] prompt`, right-padded with 0; Lp = the smallest bucket that
  holds the longest prompt), prompt_mask bool[P, Lp], images uint8[P, N_img, H, W, 3],
  num_images int32[P], task_ids int32[P]. Host: answer, problem_type, task_type, uid str[P];
  options object[P] (tuples of "A. text"), meta object[P] (dicts); num_dropped int32[].
  """
  lengths = np.asarray([len(it["prompt"]) for it in items])
  bucket = prompt_bucket(lengths.max(), buckets)
  return {
      "prompt_tokens": _pad_rows([it["prompt"] for it in items], bucket, np.int32),
      "prompt_mask": np.arange(bucket)[None, :] < lengths[:, None],
      "images": np.stack([it["images"] for it in items]),
      "num_images": np.asarray([it["num_images"] for it in items], np.int32),
      "task_ids": np.asarray([it["task_id"] for it in items], np.int32),
      **{k: np.asarray([it[k] for it in items], dtype=str)
         for k in ("answer", "problem_type", "task_type", "uid")},
      "options": _objects([it["options"] for it in items]),
      "meta": _objects([it["meta"] for it in items]),
      "num_dropped": np.asarray(num_dropped, np.int32),
  }


class _FillBatchIterator(grain.DatasetIterator):
  """Pulls features until `batch_size` fit, counting the Dropped ones.

  Holds nothing between batches, so its state is its parent's.
  """

  def __init__(self, parent, batch_size: int, collate: Callable, max_drops: int):
    super().__init__(parent)
    self._batch_size, self._collate, self._max_drops = batch_size, collate, max_drops

  def __next__(self):
    items, drops = [], collections.Counter()
    while len(items) < self._batch_size:
      item = next(self._parent)
      if isinstance(item, Dropped):
        drops[item.reason] += 1
        if drops.total() > self._max_drops:
          raise ValueError(f"data: dropped {drops.total()} records while filling one batch "
                           f"({dict(drops)}; last uid {item.uid!r}); check seq_len, "
                           "prompt_buckets, max_images, that the source has reasoning for SFT "
                           "and (bad_image) the image files the warnings name")
      else:
        items.append(item)
    return self._collate(items, drops.total())

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class _FillBatchIterDataset(grain.IterDataset):

  def __init__(self, parent, batch_size: int, collate: Callable, max_drops: int):
    super().__init__(parent)
    self._batch_size, self._collate, self._max_drops = batch_size, collate, max_drops

  def __iter__(self):
    return _FillBatchIterator(self._parent.__iter__(), self._batch_size, self._collate,
                              self._max_drops)


def _build(config: DataConfig, featurize, collate, source, shard_index, shard_count):
  if shard_index is None or shard_count is None:
    shard_index, shard_count = jax.process_index(), jax.process_count()
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index: got {shard_index}, expected in [0, {shard_count})")
  source = make_source(config) if source is None else source
  ds, _ = sources.mixed_dataset(source.by_task(), config.mixture, config.seed)
  ds = ds[shard_index::shard_count].map(featurize)
  # Two reader threads, two batches of records ahead: generation is CPU-bound Python, so more
  # threads only compete for the GIL, and grain's default 500-record buffer renders records long
  # before any batch needs them.
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2,
                                            prefetch_buffer_size=2 * config.batch_size))
  ds = _FillBatchIterDataset(ds, config.batch_size, collate, config.max_drops_per_batch)
  return ds.mp_prefetch(grain.MultiprocessingOptions(
      num_workers=config.worker_count, per_worker_buffer_size=config.worker_buffer_size))


def sft_dataset(config: DataConfig, tokenizer: tokenizer_lib.Tokenizer, *, source=None,
                shard_index: int | None = None,
                shard_count: int | None = None) -> grain.IterDataset:
  """An infinite grain IterDataset of SFT batches (see `collate_sft`) for this JAX process.

  shard_index / shard_count default to jax.process_index() / jax.process_count(); `source`
  overrides `make_source(config)`. `iter(dataset)` gives a checkpointable iterator.
  """
  collate = functools.partial(collate_sft, seq_len=config.seq_len)
  return _build(config, SftFeatures(config, tokenizer), collate, source, shard_index, shard_count)


def rl_dataset(config: DataConfig, tokenizer: tokenizer_lib.Tokenizer, *, source=None,
               shard_index: int | None = None,
               shard_count: int | None = None) -> grain.IterDataset:
  """An infinite grain IterDataset of RL prompt batches (see `collate_rl`); as `sft_dataset`."""
  collate = functools.partial(collate_rl, buckets=tuple(config.prompt_buckets))
  return _build(config, RlFeatures(config, tokenizer), collate, source, shard_index, shard_count)
