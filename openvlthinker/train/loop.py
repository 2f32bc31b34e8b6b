"""What every training stage shares: state checkpoints with resume, SIGTERM, progress display.

The train state is saved as a flat dict keyed by readable pytree paths, so any pytree (nnx.State,
optax states, shaping statistics) round-trips through orbax without custom handlers.
"""
from __future__ import annotations

import os
import re
import signal
import sys
from typing import Any

import jax

from openvlthinker.train.checkpoint import Checkpointer


def flatten_state(tree: Any) -> dict[str, Any]:
  """{path name: leaf}; names are the keystr of each leaf made filesystem-safe."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  out = {}
  for path, leaf in flat:
    name = re.sub(r"[^A-Za-z0-9_]+", ".", jax.tree_util.keystr(path)).strip(".")
    if name in out:
      raise ValueError(f"state: two leaves share the checkpoint name {name!r}")
    out[name] = leaf
  return out


def unflatten_state(template: Any, flat: dict[str, Any]) -> Any:
  """Inverse of `flatten_state` given a template with the same structure."""
  names = list(flatten_state(template))
  missing = [n for n in names if n not in flat]
  if missing:
    raise ValueError(f"checkpoint: missing entries {missing[:5]} (the model or optimizer config "
                     "differs from the run that wrote it)")
  return jax.tree.unflatten(jax.tree.structure(template), [flat[n] for n in names])


class StageCheckpoints:
  """Checkpoints of one stage (`workdir/<stage>/checkpoints`)."""

  def __init__(self, workdir: str, stage: str, keep: int):
    self.stage = stage
    self.checkpointer = Checkpointer(os.path.join(workdir, stage, "checkpoints"), keep)

  def save(self, step: int, state: Any, meta: dict) -> None:
    self.checkpointer.save(step, flatten_state(state), {**meta, "stage": self.stage})

  def restore(self, template: Any):
    """(step, state, meta) of the newest readable checkpoint, or None."""
    found = self.checkpointer.restore_latest(flatten_state(template))
    if found is None:
      return None
    step, flat, meta = found
    return step, unflatten_state(template, flat), meta

  def latest_step(self) -> int | None:
    steps = self.checkpointer.steps()
    return steps[-1] if steps else None


class Preempted(Exception):
  """Raised after the checkpoint is saved when SIGTERM arrived; the runner exits with status 0."""


class Preemption:
  """Turns SIGTERM (TPU preemption) into a flag the loop checks after each step."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def progress(total: int, initial: int, desc: str, enabled: bool):
  """A tqdm bar on stderr (a no-op object when disabled or not a terminal in CI)."""
  if not enabled:
    return _NoBar()
  from tqdm import tqdm
  return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr,
              mininterval=1.0)


class _NoBar:
  def update(self, n=1): ...
  def set_postfix(self, **kw): ...
  def close(self): ...
