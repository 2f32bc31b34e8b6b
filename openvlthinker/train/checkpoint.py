"""Atomic orbax checkpoints of the whole run state, with resume, fallback and a config check.

A checkpoint holds `state` (a pytree of arrays: params, optimizer state, step, rng, shaping
statistics) and `meta` (JSON: the data-iterator state and run counters). Orbax writes each step to a
temporary directory and renames it on commit, so a crash never leaves a half-written step that
looks complete. Reading a step goes in two parts:

- Its stored tree (leaf names, shapes, dtypes: orbax's metadata) is compared with the template
  first. A difference means the config changed (model width, layers, optimizer chain), and raises
  `CheckpointMismatch` naming the leaves; nothing falls back and nothing is moved, since an older
  step of the same run differs the same way.
- A step that cannot be read (a file missing or cut short, metadata that is not JSON: see
  `_unreadable`) is renamed to `<step>.damaged` (`.damaged.1`, ... when taken), never deleted,
  with a one-line warning, and the previous step is tried. Orbax's step list is reloaded, so the
  run saves that step again when it gets there. With no step readable the error names each step
  tried and where it went. Any other failure (out of memory, a bug) is raised as it is and moves
  nothing. Bytes garbled in place that still decode are not detected: orbax keeps no checksums.

A failed read leaves orbax's other reads in flight on an event loop it has closed; the tracebacks
they print when they finish ("Event loop is closed", hundreds per failed restore) are filtered out,
and only those (`_quiet_abandoned_reads`).
"""
from __future__ import annotations

import json
import logging as py_logging
import os
import re
import sys
from typing import Any, Callable, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from openvlthinker.errors import RunError

T = TypeVar("T")


class CheckpointError(RunError):
  """A checkpoint could not be restored: none readable, no such step, or not the config's. The
  entry point prints it as one line (`error: ...`)."""


class CheckpointMismatch(CheckpointError):
  """A checkpoint's tree (leaf names, shapes, dtypes) is not the one the config builds."""


def leaf_name(path) -> str:
  """A pytree key path as a filesystem-safe dotted name: `params.decoder.blocks.0.mlp.up.value`."""
  return re.sub(r"[^A-Za-z0-9_]+", ".", jax.tree_util.keystr(path)).strip(".")


def _describe(leaf) -> tuple[str, tuple[int, ...]]:
  dtype = getattr(leaf, "dtype", None)
  try:
    dtype = np.dtype(dtype).name if dtype is not None else type(leaf).__name__
  except TypeError:  # Not a numpy dtype (a PRNG key's).
    dtype = str(dtype)
  return dtype, tuple(np.shape(leaf))  # np.shape reads a `.shape` first (arrays, metadata)


def _leaves(tree) -> dict[str, tuple[str, tuple[int, ...]]]:
  """{leaf name: (dtype, shape)} of a pytree of arrays, abstract arrays or orbax metadata."""
  return {leaf_name(p): _describe(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _spec(dtype_shape) -> str:
  dtype, shape = dtype_shape
  return f"{dtype}[{','.join(map(str, shape))}]"


def _names(names: list[str], shown: int = 3) -> str:
  more = f" and {len(names) - shown} more" if len(names) > shown else ""
  return ", ".join(names[:shown]) + more


def mismatch(path: str, stored: dict, expected: dict, *, extra_ok: bool = False,
             dtypes: bool = True) -> str | None:
  """Why the leaves `stored` in checkpoint `path` are not the `expected` ones, or None. Both map
  leaf names to (dtype, shape); `extra_ok` allows leaves only the checkpoint has (a partial read),
  and without `dtypes` only shapes count (the restore casts)."""
  key = (lambda d: d) if dtypes else (lambda d: d[1])
  differ = [n for n in expected if n in stored and key(stored[n]) != key(expected[n])]
  missing = [n for n in expected if n not in stored]
  extra = [] if extra_ok else [n for n in stored if n not in expected]
  count = len(differ) + len(missing) + len(extra)
  if not count:
    return None
  parts = [f"{count} {'leaf differs' if count == 1 else 'leaves differ'}"]
  if differ:  # A parameter reads more plainly than its optimizer moments.
    n = next((d for d in differ if d.startswith("params")), differ[0])
    parts[0] += f", e.g. {n}: checkpoint {_spec(stored[n])}, config {_spec(expected[n])}"
  if missing:
    parts.append(f"missing in checkpoint: {_names(missing)}")
  if extra:
    parts.append(f"extra in checkpoint: {_names(extra)}")
  return (f"checkpoint {path} does not match the config: " + "; ".join(parts)
          + " (the model or optimizer config differs from the run that wrote it)")


def _reason(e: BaseException, limit: int = 300) -> str:
  """The innermost cause of a read error, one line of at most `limit` characters."""
  while e.__cause__ is not None:
    e = e.__cause__
  text = str(e).strip().splitlines()[0] if str(e).strip() else ""
  text = f"{type(e).__name__}: {text}" if text else type(e).__name__
  return text if len(text) <= limit else text[:limit - 3] + "..."


# Tensorstore's status codes for files that are cut short, garbled or gone.
_DAMAGE_CODES = re.compile(r"(OUT_OF_RANGE|DATA_LOSS|NOT_FOUND|FAILED_PRECONDITION|"
                           r"INVALID_ARGUMENT): ")


def _unreadable(e: BaseException) -> bool:
  """Whether a failed read means damaged files: somewhere in its chain, a missing file, broken
  JSON metadata or a tensorstore read error. A config mismatch, running out of memory or a bug
  is not (and is raised as it is, so that no good checkpoint is moved aside)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, (FileNotFoundError, json.JSONDecodeError)):
      return True
    if type(e) is ValueError and _DAMAGE_CODES.match(str(e)):
      return True
    e = e.__cause__ or e.__context__
  return False


def _abandoned_read(unraisable) -> bool:
  """Whether an unraisable exception is one a failed orbax restore leaves behind: an orbax read
  coroutine collected unfinished, or tensorstore calling back onto the event loop orbax closed."""
  code = getattr(unraisable.object, "cr_code", None)
  if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
    return True
  frames, tb = [], unraisable.exc_traceback
  while tb is not None:
    frames.append(tb.tb_frame.f_code.co_name)
    tb = tb.tb_next
  exc = unraisable.exc_value
  return (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"
          and "call_soon_threadsafe" in frames)


class _AbandonedReadsHook:
  """A `sys.unraisablehook` that drops `_abandoned_read` exceptions and passes on the rest."""

  def __init__(self, previous: Callable[[Any], None]):
    self.previous = previous

  def __call__(self, unraisable) -> None:
    if not _abandoned_read(unraisable):
      self.previous(unraisable)


class _AbandonedReadsLog(py_logging.Filter):
  """On the "asyncio" logger: drops "exception was never retrieved" (and "destroyed but it is
  pending") for orbax's reads abandoned by a failed restore: orbax's tasks, or tensorstore's
  read errors."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    message = record.getMessage()
    if not ("exception was never retrieved" in message
            or "Task was destroyed but it is pending" in message):
      return True
    exc = record.exc_info[1] if record.exc_info else None
    return not ("orbax" in message or "TensorStore" in message
                or (exc is not None and _unreadable(exc)))


def _quiet_abandoned_reads() -> None:
  """Installs the two filters above (once; again if someone replaced the hook since)."""
  if not isinstance(sys.unraisablehook, _AbandonedReadsHook):
    sys.unraisablehook = _AbandonedReadsHook(sys.unraisablehook)
  asyncio_logger = py_logging.getLogger("asyncio")
  if not any(isinstance(f, _AbandonedReadsLog) for f in asyncio_logger.filters):
    asyncio_logger.addFilter(_AbandonedReadsLog())


class Checkpointer:
  """Saves and restores (state pytree, meta dict) pairs under `directory/<step>`."""

  def __init__(self, directory: str, max_to_keep: int | None = 3):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=False))
    # Reads a step's metadata and part of its state, whatever handler the manager has registered.
    self._reader = ocp.PyTreeCheckpointHandler()

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Writes step `step` and waits until it is committed (atomic rename)."""
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)), force=True)
    self._manager.wait_until_finished()

  def stored_leaves(self, step: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{leaf name: (dtype, shape)} of step `step`'s state, from its metadata (no array is read)."""
    tree = self._reader.metadata(epath.Path(self.step_path(step)) / "state").tree
    return _leaves(tree)

  def _check(self, step: int, abstract: Any, partial: bool) -> Any:
    """The restore target for `abstract`; raises `CheckpointMismatch` when step `step` stores
    other leaves (for a partial read: lacks some, or has other shapes)."""
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract)
    why = mismatch(self.step_path(step), self.stored_leaves(step), _leaves(target),
                   extra_ok=partial, dtypes=not partial)
    if why:
      raise CheckpointMismatch(why)
    return target

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores step `step` onto the shardings and dtypes of `abstract_state`, whose leaves must
    be the checkpoint's (names, shapes, dtypes)."""
    _quiet_abandoned_reads()
    target = self._check(step, abstract_state, partial=False)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    return out["state"], dict(out["meta"])

  def _restore_subtree(self, step: int, abstract: dict[str, Any]) -> dict[str, Any]:
    _quiet_abandoned_reads()
    target = self._check(step, abstract, partial=True)
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    args = ocp.args.PyTreeRestore(target, restore_args=restore_args, partial_restore=True)
    out = self._reader.restore(epath.Path(self.step_path(step)) / "state", args=args)
    return dict(out)

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """The newest readable checkpoint as (step, state, meta); None when there is none at all.
    Unreadable newer steps are moved aside."""
    found = self._newest(lambda step: self.restore(step, abstract_state))
    return None if found is None else (found[0], *found[1])

  def restore_subtree(self, abstract: dict[str, Any],
                      step: int | None = None) -> tuple[int, dict[str, Any]]:
    """(step, the entries named in `abstract`, a flat dict, on its shardings and dtypes) of step
    `step`, or of the newest readable one when None; the rest of the checkpoint is not read."""
    found = self._newest(lambda s: self._restore_subtree(s, abstract), step)
    if found is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    return found

  def _newest(self, read: Callable[[int], T], step: int | None = None) -> tuple[int, T] | None:
    """(step, read(step)) for the given step, or else for the newest step that can be read,
    moving aside each newer one that cannot; None when there are no steps."""
    steps = self.steps()
    if step is not None:
      if step not in steps:
        raise CheckpointError(f"no step {step} in {self.directory}; its steps: "
                              f"{', '.join(map(str, steps)) or 'none'}")
      try:
        return step, read(step)
      except Exception as e:
        if not _unreadable(e):
          raise
        raise CheckpointError(f"checkpoint {self.step_path(step)} is unreadable "
                              f"({_reason(e)})") from e
    tried = []
    for step in reversed(steps):
      try:
        return step, read(step)
      except Exception as e:  # A damaged step may fail anywhere in orbax/tensorstore.
        if not _unreadable(e):
          raise
        path, reason = self.step_path(step), _reason(e)
        moved = self._move_aside(step)
        print(f"warning: checkpoint {path} is unreadable ({reason}); moved it to {moved}; "
              "trying an earlier step", file=sys.stderr, flush=True)
        tried.append(f"{path} ({reason}; moved to {moved})")
    if not tried:
      return None
    raise CheckpointError(f"no readable checkpoint in {self.directory}; tried "
                          + "; ".join(tried) + "; a rerun starts this stage from the beginning")

  def _move_aside(self, step: int) -> str:
    """Renames step `step` to `<step>.damaged` (or `.damaged.N`, the first free name), which
    orbax does not list as a step, and reloads orbax's step list."""
    multihost = jax.process_count() > 1
    if multihost:  # Everyone has failed to read it before one process renames it.
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"checkpoint_damaged_{step}_before")
    source = self.step_path(step)
    target, n = f"{source}.damaged", 1
    while os.path.exists(target):
      target, n = f"{source}.damaged.{n}", n + 1
    if jax.process_index() == 0:
      os.rename(source, target)
    if multihost:
      multihost_utils.sync_global_devices(f"checkpoint_damaged_{step}_after")
    self._manager.reload()
    return target

  def close(self):
    self._manager.close()
    self._reader.close()
