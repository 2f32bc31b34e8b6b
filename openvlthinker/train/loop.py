"""What every training stage shares: `run_stage` (resume, metrics truncation, SIGTERM, checkpoint
cadence, progress bar) over state checkpoints saved as flat dicts.

The train state is saved as a flat dict keyed by readable pytree paths, so any pytree (nnx.State,
optax states, shaping statistics) round-trips through orbax without custom handlers.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Any, Callable, Iterable

import flax
import jax

from openvlthinker import multihost
from openvlthinker.train.checkpoint import Checkpointer, leaf_name


def flatten_state(tree: Any) -> dict[str, Any]:
  """{path name: leaf}; names are the keystr of each leaf made filesystem-safe (`leaf_name`, the
  names checkpoint errors use)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  out = {}
  for path, leaf in flat:
    name = leaf_name(path)
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


@flax.struct.dataclass
class _ParamsOnly:
  """A TrainState's `params` alone: its leaves get the checkpoint names a TrainState's do."""
  params: Any


class StageCheckpoints:
  """Checkpoints of one stage (`workdir/<stage>/checkpoints`)."""

  def __init__(self, workdir: str, stage: str, keep: int | None, directory: str | None = None):
    self.stage = stage
    self.checkpointer = Checkpointer(directory or os.path.join(workdir, stage, "checkpoints"),
                                     keep)

  @classmethod
  def at(cls, directory: str) -> StageCheckpoints:
    """The checkpoints in `directory` (another run's `WORKDIR/<stage>/checkpoints`), to read;
    nothing is deleted (no keep limit)."""
    stage = os.path.basename(os.path.dirname(os.path.abspath(directory)))
    return cls("", stage, keep=None, directory=directory)

  def save(self, step: int, state: Any, meta: dict) -> None:
    self.checkpointer.save(step, flatten_state(state), {**meta, "stage": self.stage})

  def restore(self, template: Any):
    """(step, state, meta) of the newest readable checkpoint, or None. Unreadable newer steps are
    moved aside (`<step>.damaged`); a checkpoint whose leaves are not the template's raises
    `CheckpointMismatch`."""
    found = self.checkpointer.restore_latest(flatten_state(template))
    if found is None:
      return None
    step, flat, meta = found
    return step, unflatten_state(template, flat), meta

  def restore_params(self, params: Any, step: int | None = None) -> tuple[int, Any]:
    """(step, parameters) of checkpoint `step`, or of the newest readable one when None (moving
    unreadable newer ones aside), onto the shardings and dtypes of `params`. The checkpoint must
    hold the leaves of `params` with their shapes (`CheckpointMismatch` otherwise); a dtype may
    differ (it is cast). A missing or unreadable given `step` is a `CheckpointError`."""
    step, flat = self.checkpointer.restore_subtree(flatten_state(_ParamsOnly(params)), step)
    return step, unflatten_state(_ParamsOnly(params), flat).params

  def steps(self) -> list[int]:
    """The steps saved, oldest first."""
    return self.checkpointer.steps()

  def latest_step(self) -> int | None:
    steps = self.checkpointer.steps()
    return steps[-1] if steps else None


class Preempted(Exception):
  """Raised after the checkpoint is saved when SIGTERM or SIGINT arrived; the runner exits 0."""


class Preemption:
  """Turns SIGTERM (TPU preemption) and the first Ctrl-C (SIGINT) into a flag the loop checks
  after each step, so both save before exiting; a second Ctrl-C interrupts at once."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested: str | None = None  # the name of the signal that arrived
    self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

  def _handle(self, signum, frame):
    del frame
    self.requested = signal.Signals(signum).name
    if signum == signal.SIGINT:  # The next Ctrl-C is the user insisting: raise right away.
      signal.signal(signal.SIGINT, signal.default_int_handler)
      print("SIGINT: saving a checkpoint after this step (Ctrl-C again to stop now)",
            file=sys.stderr, flush=True)

  def restore(self):
    for s, handler in self._previous.items():
      signal.signal(s, handler)


def progress(total: int, initial: int, desc: str, enabled: bool):
  """A tqdm bar on stderr (a no-op object when disabled or not a terminal in CI)."""
  if not enabled:
    return _NoBar()
  from tqdm import tqdm
  return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr,
              mininterval=1.0)


class _NoBar:
  def update(self, n=1): ...
  def set_postfix(self, *a, **kw): ...
  def close(self): ...


def run_stage(name: str, steps: int, state: Any, step_fn: Callable[[Any, int], tuple[Any, dict]],
              data_iter, ckpts: StageCheckpoints, writer, *, checkpoint_every: int,
              progress_bar: bool, postfix: Iterable[str] = (),
              after_step: Callable[[int, Any, bool], None] | None = None,
              save_meta: Callable[[], dict] = dict, load_meta: Callable[[dict], None] = lambda m: None,
              truncate: Iterable[str] = ()) -> Any:
  """Runs steps [start, steps) of a stage and returns the final state.

  Resumes from the newest readable checkpoint (state, data-iterator state, `load_meta(meta)`),
  cuts the metrics of `name` and of the stages in `truncate` back to that step, and calls
  `step_fn(state, step) -> (state, metrics)` for each remaining step, then `after_step(step + 1,
  state, done)`. Saves every `checkpoint_every` steps, at the end and on SIGTERM or SIGINT; after
  such a save raises `Preempted`.
  """
  start = 0
  restored = ckpts.restore(state)
  if restored is not None:
    start, state, meta = restored
    data_iter.set_state(meta["data_iterator"])
    load_meta(meta)
  for stage in (name, *truncate):
    writer.truncate_after(stage, start)
  if start >= steps:
    return state
  preempt = Preemption()
  bar = progress(steps, start, name, progress_bar)
  try:
    for step in range(start, steps):
      state, metrics = step_fn(state, step)
      writer.write(name, step + 1, metrics)
      bar.update()
      bar.set_postfix({k: f"{metrics[k]:.3f}" for k in postfix})
      done = step + 1 == steps
      if after_step is not None:
        after_step(step + 1, state, done)
      # A signal one host received stops every process at the same step (the save is collective).
      stop = multihost.any_process(preempt.requested is not None)
      if done or (step + 1) % checkpoint_every == 0 or stop:
        ckpts.save(step + 1, state, {"data_iterator": data_iter.get_state(), **save_meta()})
      if stop and not done:
        raise Preempted(f"{preempt.requested or 'a signal to another process'}: saved the "
                        f"{name} checkpoint at step {step + 1}")
  finally:
    bar.close()
    preempt.restore()
  return state
