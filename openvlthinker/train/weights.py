"""Which parameters a stage starts from, or an evaluation scores, and a one-line account of them.

`eval.checkpoint` names them: '' (the newest checkpoint of the latest stage that has one: RL, else
SFT), 'sft' / 'rl' (that stage's newest), 'rl:120' / 'sft:40' (that step), or a bare step '120'
(that step of the latest stage). With no checkpoint at all the weights are the run's initial ones:
`model.init`'s, or the random initialisation, and the account says so loudly.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import optax

from openvlthinker.fields import FieldError
from openvlthinker.train import loop

STAGES = ("sft", "rl")  # in training order: the latest stage with a checkpoint is the newest


@dataclasses.dataclass(frozen=True)
class Weights:
  """Parameters and where they came from: stage 'sft' | 'rl' | 'init' (model.init) | 'random'."""
  params: Any
  stage: str
  step: int | None = None
  path: str | None = None

  @property
  def label(self) -> str:
    """A short column name: 'rl@120', 'sft@40', 'init', 'random'."""
    return f"{self.stage}@{self.step}" if self.step is not None else self.stage

  @property
  def is_random(self) -> bool:
    return self.stage == "random"

  @functools.cached_property
  def param_norm(self) -> float:
    """The global L2 norm of the parameters (one compiled reduction, not one op per leaf)."""
    return float(jax.jit(optax.global_norm)(self.params))

  def describe(self) -> str:
    norm = self.param_norm
    if self.stage == "random":
      return (f"the RANDOM initial weights (no checkpoint in the workdir and no model.init), "
              f"parameter norm {norm:.6f}")
    if self.stage == "init":
      return f"the model.init weights from {self.path}, parameter norm {norm:.6f}"
    return f"{self.stage} step {self.step} ({self.path}), parameter norm {norm:.6f}"


def parse_spec(spec: str) -> tuple[str | None, int | None]:
  """'' | 'sft' | 'rl' | 'STAGE:STEP' | 'STEP' → (stage or None = latest, step or None = newest)."""
  expected = "'', 'sft', 'rl', 'sft:STEP', 'rl:STEP' or 'STEP'"
  if not isinstance(spec, str):
    raise FieldError("checkpoint", expected, spec)
  if spec.isdigit():
    return None, int(spec)
  stage, colon, step = spec.partition(":")
  if stage not in ("", *STAGES) or (colon and not (stage and step.isdigit())):
    raise FieldError("checkpoint", expected, spec)
  return stage or None, int(step) if colon else None


def initial(ctx) -> Weights:
  """The run's initial parameters: model.init's or the random initialisation."""
  if ctx.config.model.init:
    return Weights(ctx.initial_params, "init", path=ctx.config.model.init)
  return Weights(ctx.initial_params, "random")


def stage_checkpoints(ctx, stage: str) -> loop.StageCheckpoints:
  return loop.StageCheckpoints(ctx.workdir, stage, ctx.config.checkpoint.keep)


def saved_steps(ctx, stage: str) -> list[int]:
  """The steps `stage` has saved in the workdir (creating nothing when it has none)."""
  if not os.path.isdir(os.path.join(ctx.workdir, stage, "checkpoints")):
    return []
  return stage_checkpoints(ctx, stage).steps()


def select(ctx, spec: str = "") -> Weights:
  """The weights `spec` names (see the module docstring), restored onto the run's mesh.

  Raises FieldError (field 'checkpoint') when a named stage or step has no checkpoint.
  """
  stage, step = parse_spec(spec)
  if stage is None:
    with_checkpoints = [s for s in STAGES if saved_steps(ctx, s)]
    if not with_checkpoints:
      if step is not None:
        raise FieldError("checkpoint", f"a step of a stage with checkpoints in {ctx.workdir}",
                         spec)
      return initial(ctx)
    stage = with_checkpoints[-1]
  available = saved_steps(ctx, stage)
  if not available:
    raise FieldError("checkpoint", f"a stage with checkpoints in {ctx.workdir}", spec)
  if step is not None and step not in available:
    raise FieldError("checkpoint", f"one of the saved {stage} steps {available}", spec)
  ckpts = stage_checkpoints(ctx, stage)
  step, params = ckpts.restore_params(ctx.initial_params, step=step)
  return Weights(params, stage, step, os.path.join(ckpts.checkpointer.directory, str(step)))
