"""Atomic orbax checkpoints of the whole run state, with resume and fallback.

A checkpoint holds `state` (a pytree of arrays: params, optimizer state, step, rng, shaping
statistics) and `meta` (JSON: the data-iterator state and run counters). Orbax writes each step to a
temporary directory and renames it on commit, so a crash never leaves a half-written step that
looks complete. When the newest step cannot be read (a truncated file), `restore_latest` warns and
falls back to the previous one; with none readable it raises an error naming what it tried.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


class CheckpointError(RuntimeError):
  """No checkpoint in a directory that has some could be restored."""


class Checkpointer:
  """Saves and restores (state pytree, meta dict) pairs under `directory/<step>`."""

  def __init__(self, directory: str, max_to_keep: int | None = 3):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=False))

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Writes step `step` and waits until it is committed (atomic rename)."""
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)), force=True)
    self._manager.wait_until_finished()

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores step `step` onto the shardings and dtypes of `abstract_state`."""
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    return out["state"], dict(out["meta"])

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """The newest readable checkpoint as (step, state, meta); None when there is none at all."""
    steps = self.steps()
    if not steps:
      return None
    errors = []
    for step in reversed(steps):
      try:
        state, meta = self.restore(step, abstract_state)
      except Exception as e:  # A damaged step may fail anywhere in orbax/tensorstore.
        path = os.path.join(self.directory, str(step))
        logging.warning("checkpoint %s is unreadable (%s: %.300s); trying an earlier one", path,
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        print(f"warning: checkpoint {path} is unreadable ({type(e).__name__}); "
              "falling back to an earlier one", flush=True)
        errors.append(f"{path}: {type(e).__name__}")
        continue
      return step, state, meta
    raise CheckpointError(f"no readable checkpoint in {self.directory}; tried "
                          + "; ".join(errors))

  def restore_subtree(self, step: int, abstract: dict[str, Any]) -> dict[str, Any]:
    """The entries of step `step` named in `abstract` (a flat dict), on its shardings; the rest
    of the checkpoint is not read."""
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract)
    out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))
    return dict(out["state"])

  def close(self):
    self._manager.close()
