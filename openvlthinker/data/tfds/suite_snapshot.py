"""TFDS builder of a fixed snapshot of the procedural suite (array_record), and its reader.

Splits are named `<split>_<task_type>` (e.g. `train_ocr`, `eval_math_reasoning`) so a reader
gets each task's records without decoding the others; `train` of all tasks is the TFDS split
expression `train_spatial_grounding+train_spatial_reasoning+…`. Images are stored as PNG bytes
(encoded with PIL, so building needs no TensorFlow) and decoded by TFDS's numpy path on read.
Build with e.g. `python -m openvlthinker.data.tfds.build --config=small --data_dir=DIR`.
"""
import dataclasses
import io
import json

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from openvlthinker import taxonomy
from openvlthinker.tasks import registry
from openvlthinker.tasks.base import Example

NAME = "openvlthinker_suite"
SPLITS = ("train", "eval")
_TEXT_FIELDS = ("question", "answer", "problem_type", "task_type", "reasoning", "uid")


@dataclasses.dataclass(eq=False)
class SnapshotConfig(tfds.core.BuilderConfig):
  """How many examples per task and split, and the generator arguments."""
  train_per_task: int = 0
  eval_per_task: int = 0
  image_size: int = 64
  difficulty: int = 0


def split_name(split: str, task_type: str) -> str:
  return f"{split}_{taxonomy.canonical_task_type(task_type)}"


def _png(image: np.ndarray) -> bytes:
  out = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(out, format="PNG")
  return out.getvalue()


def _json_default(value):
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f"meta: cannot store {type(value).__name__} {value!r:.80} as JSON")


def encode_example(example: Example) -> dict:
  """The TFDS record of an Example (meta as JSON text; tuples come back as lists)."""
  record = {k: getattr(example, k) for k in _TEXT_FIELDS}
  record["images"] = [_png(image) for image in example.images]
  record["options"] = list(example.options)
  record["meta"] = json.dumps(example.meta, default=_json_default, sort_keys=True)
  return record


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def decode_example(record: dict) -> Example:
  """The Example of a record read by `tfds.data_source` (numpy decoding)."""
  return Example(images=tuple(np.asarray(i, np.uint8) for i in record["images"]),
                 options=tuple(_text(o) for o in record["options"]),
                 meta=json.loads(_text(record["meta"])),
                 **{k: _text(record[k]) for k in _TEXT_FIELDS})


class OpenvlthinkerSuite(tfds.core.GeneratorBasedBuilder):
  """A fixed snapshot of the procedural suite: `generate(task, split, i)` for i < per_task."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First snapshot format: per-task splits, PNG images."}
  BUILDER_CONFIGS = [
      SnapshotConfig(name="tiny", train_per_task=16, eval_per_task=8),
      SnapshotConfig(name="small", train_per_task=2000, eval_per_task=200),
      SnapshotConfig(name="medium", train_per_task=20000, eval_per_task=500),
  ]
  DEFAULT_CONFIG_NAME = "small"

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    features = tfds.features.FeaturesDict({
        "images": tfds.features.Sequence(
            tfds.features.Image(shape=(None, None, 3), encoding_format="png")),
        "options": tfds.features.Sequence(text),
        "meta": text,
        **{k: text for k in _TEXT_FIELDS},
    })
    return tfds.core.DatasetInfo(builder=self, description=__doc__, features=features)

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is generated
    counts = {"train": self.builder_config.train_per_task,
              "eval": self.builder_config.eval_per_task}
    return {split_name(split, task): self._generate_examples(task, split, counts[split])
            for split in SPLITS if counts[split] for task in taxonomy.TASK_TYPES}

  def _generate_examples(self, task_type: str, split: str, count: int):
    config = self.builder_config
    for index in range(count):
      example = registry.generate(task_type, split, index, difficulty=config.difficulty,
                                  image_size=config.image_size)
      yield index, encode_example(example)


class _Decoded:
  """A TFDS data source viewed as a random-access sequence of Examples (picklable)."""

  def __init__(self, data_source):
    self._source = data_source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> Example:
    return decode_example(self._source[int(index)])


class SnapshotSource:
  """Random-access reader of a built snapshot: `by_task()` maps task type → Examples.

  Args:
    data_dir: the TFDS data_dir the snapshot was built into.
    config: the builder config name (`tiny`, `small`, `medium` or a custom one built there).
    split: `train` or `eval`.
  """

  def __init__(self, data_dir: str, config: str = "small", split: str = "train"):
    if split not in SPLITS:
      raise ValueError(f"split: got {split!r}, expected one of {SPLITS}")
    builder = tfds.builder(f"{NAME}/{config}", data_dir=data_dir)
    available = set(builder.info.splits.keys())
    if not builder.is_prepared() or not available:
      raise FileNotFoundError(f"TFDS snapshot {NAME}/{config} is not built under {data_dir!r}")
    self._by_task = {t: _Decoded(builder.as_data_source(split=split_name(split, t)))
                     for t in taxonomy.TASK_TYPES if split_name(split, t) in available}
    if not self._by_task:
      raise ValueError(f"TFDS snapshot {NAME}/{config} in {data_dir!r} has no {split!r} splits "
                       f"(it has {sorted(available)})")

  def by_task(self) -> dict[str, _Decoded]:
    return dict(self._by_task)
