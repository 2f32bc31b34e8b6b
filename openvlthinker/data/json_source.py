"""A random-access source of `Example`s read from the public OpenVLThinkerV2 JSON / JSONL format.

Records carry `problem` (with `<image>` placeholders), `answer` wrapped in `<answer>…</answer>`,
`images` as paths relative to an image root, `problem_type`, `task_type` and optional `options`
("A. text"), `problem_id`, `data_source`. Every record is validated when the source is built: a
malformed record raises an error naming the record and the field. A record whose image file is
missing, whose problem or task type no reward knows, or whose ground truth no answer could match
(`rewards.check_ground_truth`) raises too, or, with skip_bad_records, is skipped and counted.
Images are decoded (`images.read_rgb`) only when a record is read; one that does not decode is a
fault of that record alone: with skip_bad_records the read returns a `BadRecord`, which the
pipeline counts as dropped, else it raises a one-line ValueError naming the record and the file.
"""
from collections.abc import Mapping
import collections
import dataclasses
import json
import os
from typing import Any

from absl import logging
import numpy as np

from openvlthinker import taxonomy
from openvlthinker.data import images as images_lib
from openvlthinker.data import sources
from openvlthinker.rl import rewards
from openvlthinker.tasks.base import Example

_IMAGE = "<image>"
# Fields the reader consumes; every other field of a record is kept in `Example.meta`.
_CONSUMED = ("problem", "answer", "images", "problem_type", "task_type", "options", "reasoning")


class UnusableRecord(ValueError):
  """A well-formed record whose ground truth no answer could match: skippable."""

  def __init__(self, record: str, why: str):
    super().__init__(f"record {record}: {why}")
    self.record, self.why = record, why


@dataclasses.dataclass(frozen=True)
class _Record:
  """A validated record, images not yet loaded."""
  name: str
  image_paths: tuple[str, ...]
  example: Example  # with images=()


@dataclasses.dataclass(frozen=True)
class BadRecord:
  """What reading a record whose image does not decode returns under skip_bad_records; the
  pipeline's featurizers turn it into `Dropped(reason, uid)`."""
  reason: str  # "bad_image"
  uid: str
  message: str  # one line naming the record and the file


def _utf8_error(base: str, data: bytes, e: UnicodeDecodeError) -> ValueError:
  lineno = data.count(b"\n", 0, e.start) + 1
  line_start = data.rfind(b"\n", 0, e.start) + 1
  column = len(data[line_start:e.start].decode("utf-8")) + 1  # valid up to the first bad byte
  return ValueError(f"{base}:{lineno}: not valid UTF-8 (byte 0x{data[e.start]:02x} at column "
                    f"{column})")


def _read_raw(path: str) -> list[tuple[str, Any]]:
  """[(record name, parsed JSON value)] of a .json list or a .jsonl file; raises ValueError
  naming the file (and the line) when it is not UTF-8 JSON or holds no records."""
  base = os.path.basename(path)
  with open(path, "rb") as f:
    data = f.read()
  data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark, as some editors write
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise _utf8_error(base, data, e) from None
  if not text.strip():
    raise ValueError(f"{base}: no records (the file is empty)")
  raw = _parse_jsonl(text, base) if path.endswith(".jsonl") else _parse_json(text, base)
  if not raw:  # a .json "[]": a .jsonl without records is blank, so empty above
    raise ValueError(f"{base}: no records (the file holds an empty list)")
  return raw


def _parse_jsonl(text: str, base: str) -> list[tuple[str, Any]]:
  raw = []
  # Lines split on "\n" only, as JSON Lines defines them (str.splitlines would also split on
  # characters such as U+2028 that may appear inside a JSON string).
  for lineno, line in enumerate(text.split("\n"), start=1):
    if not line.strip():
      continue
    try:
      raw.append((f"{base}:{lineno}", json.loads(line)))
    except json.JSONDecodeError as e:
      raise ValueError(f"{base}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
  return raw


def _parse_json(text: str, base: str) -> list[tuple[str, Any]]:
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{base}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
  if not isinstance(value, list):
    raise ValueError(f"{base}: expected a JSON list of records (or a .jsonl file), "
                     f"got {type(value).__name__}")
  return [(f"{base}[{i}]", record) for i, record in enumerate(value)]


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
  """Validates one raw record; raises ValueError naming the record and the field (UnusableRecord
  when its ground truth is well-formed but no answer could match it)."""
  if not isinstance(record, Mapping):
    raise ValueError(f"record {name}: expected a JSON object, got {type(record).__name__}")
  if "problem_id" in record:
    name = f"{name} (problem_id {record['problem_id']})"
  question = _field(name, record, "problem", str)
  try:
    answer = rewards.truth_text(_field(name, record, "answer", str))
  except rewards.UnusableTruth as e:  # broken tags: the file is malformed, not the problem
    raise ValueError(f"record {name}: field 'answer': {e}") from None
  images = _str_list(name, record, "images")
  options = _str_list(name, record, "options", default=[])
  placeholders = question.count(_IMAGE)
  if placeholders and placeholders != len(images):
    raise ValueError(f"record {name}: field 'problem' has {placeholders} {_IMAGE} placeholders "
                     f"but field 'images' lists {len(images)} files")
  problem_type = _field(name, record, "problem_type", str)
  task_type = _field(name, record, "task_type", str)
  try:
    problem_type = taxonomy.canonical_problem_type(problem_type)
    task_type = taxonomy.canonical_task_type(task_type)
  except ValueError as e:  # well-formed, but a type no reward knows: that record's fault alone
    raise UnusableRecord(name, str(e)) from None
  reason = rewards.check_ground_truth(answer, problem_type, options)
  if reason is not None:
    raise UnusableRecord(name, f"field 'answer': {reason}")
  paths = tuple(os.path.normpath(os.path.join(image_root, p)) for p in images)
  uid = str(record["problem_id"]) if "problem_id" in record else name
  meta = {k: v for k, v in record.items() if k not in _CONSUMED}
  meta["image_paths"] = list(paths)
  reasoning = _field(name, record, "reasoning", str, default="")
  example = Example(images=(), question=question, answer=answer, problem_type=problem_type,
                    task_type=task_type, options=options, reasoning=reasoning, uid=uid, meta=meta)
  return _Record(name=name, image_paths=paths, example=example)


def skip_kind(why: str) -> str:
  """The kind of a skipped record's reason (`JsonSource.skipped`): missing image, unknown type or
  unusable answer."""
  if why.startswith("image file not found"):
    return "missing image"
  if why.startswith("field 'answer'"):
    return "unusable answer"
  return "unknown type"


class JsonSource:
  """Random-access `Example`s of a public-format .json / .jsonl file.

  Args:
    path: the .json (a list of records) or .jsonl (one record a line) file.
    image_root: directory the `images` paths are relative to; defaults to the file's directory.
    skip_bad_records: when False, a record naming a missing image file, an unknown problem or
      task type, or holding an unusable ground truth raises (naming the record) when the source is built, and an image that does
      not decode raises ValueError naming the record and the file when the record is read. When
      True, the first two are skipped and counted in `num_skipped` (names and reasons in
      `skipped`), and reading the third returns a `BadRecord` (logged as a warning).
    max_image_pixels: images with more pixels (from the file header) are not decoded: a fault
      of their record, as an undecodable file is.
  """

  def __init__(self, path: str, image_root: str | None = None, skip_bad_records: bool = False,
               max_image_pixels: int = images_lib.DEFAULT_MAX_PIXELS):
    self.path = path
    self._skip = bool(skip_bad_records)
    self._max_pixels = images_lib.check_max_pixels(max_image_pixels)
    root = image_root or os.path.dirname(os.path.abspath(path))
    self._records: list[_Record] = []
    self.skipped: list[tuple[str, str]] = []
    self._warned: set[str] = set()
    raw_records = _read_raw(path)
    for name, raw in raw_records:
      try:
        record = parse_record(name, raw, root)
      except UnusableRecord as e:
        self._reject(e.record, e.why, ValueError)
        continue
      missing = [p for p in record.image_paths if not os.path.isfile(p)]
      if missing:
        self._reject(record.name, f"image file not found: {missing[0]}", FileNotFoundError)
      else:
        self._records.append(record)
    base = os.path.basename(path)
    if self.skipped:
      logging.warning("%s: skipped %d of %d records (%s; first: %s: %s)", path, len(self.skipped),
                      len(raw_records), self._skip_counts(), *self.skipped[0])
    if not self._records:
      raise ValueError(f"{base}: all {len(raw_records)} records were skipped "
                       f"({self._skip_counts()}; first: {self.skipped[0][0]}: "
                       f"{self.skipped[0][1]})")

  def _reject(self, name: str, why: str, error: type[Exception]):
    """Skips and counts a record under skip_bad_records, else raises `error` naming it."""
    if not self._skip:
      raise error(f"record {name}: {why} (set data.skip_bad_records to skip such records)")
    self.skipped.append((name, why))

  def _skip_counts(self) -> str:
    kinds = collections.Counter(skip_kind(why) for _, why in self.skipped)
    return ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))

  @property
  def num_skipped(self) -> int:
    return len(self.skipped)

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> Example | BadRecord:
    record = self._records[index]
    images = []
    for path in record.image_paths:
      try:
        images.append(images_lib.read_rgb(path, self._max_pixels))
      except images_lib.ImageError as e:
        message = f"record {record.name}: cannot read image {path}: {e}"
        if not self._skip:
          raise ValueError(message) from None
        if record.name not in self._warned:  # once per record and process, not every epoch
          self._warned.add(record.name)
          logging.warning("%s (dropped: data.skip_bad_records is set)", message)
        return BadRecord("bad_image", record.example.uid, message)
    # Pixel sizes before the pipeline resizes: grounding boxes are in these coordinates.
    meta = dict(record.example.meta, image_sizes=[list(i.shape[:2]) for i in images])
    return dataclasses.replace(record.example, images=tuple(images), meta=meta)

  def task_types(self) -> list[str]:
    return [r.example.task_type for r in self._records]

  def by_task(self) -> dict[str, sources.Subset]:
    task_types = np.asarray(self.task_types(), dtype=object)
    return {t: sources.Subset(self, np.flatnonzero(task_types == t))
            for t in taxonomy.TASK_TYPES if np.any(task_types == t)}

