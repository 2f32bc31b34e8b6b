"""A random-access source of `Example`s read from the public OpenVLThinkerV2 JSON / JSONL format.

Records carry `problem` (with `<image>` placeholders), `answer` wrapped in `<answer>…</answer>`,
`images` as paths relative to an image root, `problem_type`, `task_type` and optional `options`
("A. text"), `problem_id`, `data_source`. Every record is validated and its image files checked when
the source is built, so a bad record fails (or, for missing images, is skipped and counted) before
training starts; images are decoded only when a record is read.
"""
from collections.abc import Mapping
import dataclasses
import json
import os
import re
from typing import Any

from absl import logging
import numpy as np
from PIL import Image

from openvlthinker import taxonomy
from openvlthinker.data import sources
from openvlthinker.tasks.base import Example

_ANSWER_TAGS = re.compile(r"\s*<answer>(.*)</answer>\s*", re.DOTALL)
_IMAGE = "<image>"
# Fields the reader consumes; every other field of a record is kept in `Example.meta`.
_CONSUMED = ("problem", "answer", "images", "problem_type", "task_type", "options", "reasoning")


@dataclasses.dataclass(frozen=True)
class _Record:
  """A validated record, images not yet loaded."""
  name: str
  image_paths: tuple[str, ...]
  example: Example  # with images=()


def _read_raw(path: str) -> list[tuple[str, Any]]:
  """[(record name, parsed JSON value)] of a .json list or a .jsonl file."""
  base = os.path.basename(path)
  with open(path, encoding="utf-8") as f:
    if path.endswith(".jsonl"):
      raw = []
      for lineno, line in enumerate(f, start=1):
        if not line.strip():
          continue
        try:
          raw.append((f"{base}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
          raise ValueError(f"{base}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
      return raw
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{base}: not valid JSON ({e.msg} at line {e.lineno})") from e
  if not isinstance(data, list):
    raise ValueError(f"{base}: expected a JSON list of records (or a .jsonl file), "
                     f"got {type(data).__name__}")
  return [(f"{base}[{i}]", record) for i, record in enumerate(data)]


def _field(name: str, record: Mapping[str, Any], key: str, kind, default=dataclasses.MISSING):
  if key not in record or record[key] is None:
    if default is dataclasses.MISSING:
      raise ValueError(f"record {name}: missing field {key!r}")
    return default
  value = record[key]
  if not isinstance(value, kind):
    raise ValueError(f"record {name}: field {key!r} must be {kind.__name__}, "
                     f"got {type(value).__name__} {value!r:.80}")
  return value


def _str_list(name: str, record: Mapping[str, Any], key: str, default=dataclasses.MISSING):
  values = _field(name, record, key, list, default)
  for v in values:
    if not isinstance(v, str):
      raise ValueError(f"record {name}: field {key!r} must be a list of strings, "
                       f"got item {v!r:.80}")
  return tuple(values)


def parse_record(name: str, record: Any, image_root: str) -> _Record:
  """Validates one raw record; raises ValueError naming the record and the field."""
  if not isinstance(record, Mapping):
    raise ValueError(f"record {name}: expected a JSON object, got {type(record).__name__}")
  if "problem_id" in record:
    name = f"{name} (problem_id {record['problem_id']})"
  question = _field(name, record, "problem", str)
  answer = _field(name, record, "answer", str)
  match = _ANSWER_TAGS.fullmatch(answer)
  answer = (match.group(1) if match else answer).strip()
  images = _str_list(name, record, "images")
  options = _str_list(name, record, "options", default=[])
  placeholders = question.count(_IMAGE)
  if placeholders and placeholders != len(images):
    raise ValueError(f"record {name}: field 'problem' has {placeholders} {_IMAGE} placeholders "
                     f"but field 'images' lists {len(images)} files")
  try:
    problem_type = taxonomy.canonical_problem_type(_field(name, record, "problem_type", str))
    task_type = taxonomy.canonical_task_type(_field(name, record, "task_type", str))
  except ValueError as e:
    raise ValueError(f"record {name}: {e}") from None
  paths = tuple(os.path.normpath(os.path.join(image_root, p)) for p in images)
  uid = str(record["problem_id"]) if "problem_id" in record else name
  meta = {k: v for k, v in record.items() if k not in _CONSUMED}
  meta["image_paths"] = list(paths)
  reasoning = _field(name, record, "reasoning", str, default="")
  example = Example(images=(), question=question, answer=answer, problem_type=problem_type,
                    task_type=task_type, options=options, reasoning=reasoning, uid=uid, meta=meta)
  return _Record(name=name, image_paths=paths, example=example)


def load_image(path: str, record_name: str) -> np.ndarray:
  """uint8[H, W, 3] of the image file at `path` (converted to RGB)."""
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert("RGB"), dtype=np.uint8)
  except (OSError, ValueError) as e:
    raise ValueError(f"record {record_name}: cannot read image {path}: {e}") from e


class JsonSource:
  """Random-access `Example`s of a public-format .json / .jsonl file.

  Args:
    path: the .json (a list of records) or .jsonl (one record a line) file.
    image_root: directory the `images` paths are relative to; defaults to the file's directory.
    skip_missing_images: when False, a record naming a missing image file raises FileNotFoundError
      naming the record and the path; when True the record is skipped and counted in
      `num_skipped` (names in `skipped`).
  """

  def __init__(self, path: str, image_root: str | None = None, skip_missing_images: bool = False):
    self.path = path
    root = image_root or os.path.dirname(os.path.abspath(path))
    self._records: list[_Record] = []
    self.skipped: list[tuple[str, str]] = []
    for name, raw in _read_raw(path):
      record = parse_record(name, raw, root)
      missing = [p for p in record.image_paths if not os.path.isfile(p)]
      if not missing:
        self._records.append(record)
      elif skip_missing_images:
        self.skipped.append((record.name, missing[0]))
      else:
        raise FileNotFoundError(f"record {record.name}: image file not found: {missing[0]} "
                                "(set skip_missing_images to skip such records)")
    if self.skipped:
      logging.warning("%s: skipped %d records with missing image files (first: %s, %s)", path,
                      len(self.skipped), *self.skipped[0])

  @property
  def num_skipped(self) -> int:
    return len(self.skipped)

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> Example:
    record = self._records[index]
    images = tuple(load_image(p, record.name) for p in record.image_paths)
    # Pixel sizes before the pipeline resizes: grounding boxes are in these coordinates.
    meta = dict(record.example.meta, image_sizes=[list(i.shape[:2]) for i in images])
    return dataclasses.replace(record.example, images=images, meta=meta)

  def task_types(self) -> list[str]:
    return [r.example.task_type for r in self._records]

  def by_task(self) -> dict[str, sources.Subset]:
    task_types = np.asarray(self.task_types(), dtype=object)
    return {t: sources.Subset(self, np.flatnonzero(task_types == t))
            for t in taxonomy.TASK_TYPES if np.any(task_types == t)}
