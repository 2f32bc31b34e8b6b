"""Run metrics: one JSON line per step, TensorBoard event files, and PNG plots at the end.

The JSONL file is the record of a run. On resume it is cut back to the restored step, so a run that
was killed and resumed has exactly one line per step, as an uninterrupted run would.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np


def _plain(value: Any):
  if isinstance(value, (np.generic, np.ndarray)) and np.ndim(value) == 0:
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


class MetricsWriter:
  """Appends `{"step": s, "stage": ..., **metrics}` lines and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, filename: str = "metrics.jsonl", tensorboard: bool = True):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, filename)
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def truncate_after(self, stage: str, step: int) -> None:
    """Drops the lines of `stage` past `step` (written before a crash, redone after resume)."""
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = f.readlines()
    keep = []
    for line in lines:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue  # A line cut short by the crash.
      if record.get("stage") == stage and record.get("step", -1) > step:
        continue
      keep.append(json.dumps(record) + "\n")
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, self.path)

  def write(self, stage: str, step: int, metrics: dict[str, Any]) -> None:
    record = {"stage": stage, "step": int(step)}
    record.update({k: _plain(v) for k, v in sorted(metrics.items())})
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
      f.flush()
      os.fsync(f.fileno())
    if self._tb is not None:
      for key, value in record.items():
        if isinstance(value, (int, float)) and key != "step":
          self._tb.add_scalar(f"{stage}/{key}", value, step)
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


class NullWriter:
  """What the processes other than process 0 write metrics to: nothing (one run, one record)."""

  def truncate_after(self, stage: str, step: int) -> None:
    del stage, step

  def write(self, stage: str, step: int, metrics: dict[str, Any]) -> None:
    del stage, step, metrics

  def close(self):
    pass


def read_jsonl(path: str) -> list[dict[str, Any]]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
