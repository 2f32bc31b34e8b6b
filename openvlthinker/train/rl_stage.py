"""The RL stage. One step, as DESIGN.md draws it:

  rollout (sample G responses per prompt, score them, assemble the training reward, filter groups)
  → advantages (the configured estimator over the whole batch)
  → shaping statistics (adaptive length thresholds)
  → updates (one optimizer step per minibatch of whole groups)
  → metrics.

The stage loop (resume, preemption, checkpoint cadence) is `loop.run_stage`, shared with SFT;
evaluation runs every `config.eval.every` steps. Randomness is a pure function of (seed, step), and
the state, the shaping statistics and the data iterator are checkpointed, so a run resumed from step
k reproduces the uninterrupted run's steps k+1, k+2, … exactly.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any

import jax
import numpy as np
import optax

from openvlthinker import configuration, multihost, taxonomy
from openvlthinker.errors import RunError
from openvlthinker.eval.evaluation import Evaluation
from openvlthinker.rl import advantages as advantages_lib
from openvlthinker.sampler import Sampler
from openvlthinker.train import loop, packing, rl, rl_metrics
from openvlthinker.train import rollout as rollout_lib
from openvlthinker.train.batch import RolloutBatch, RowSummary
from openvlthinker.train.context import Context, task_key_ids
from openvlthinker.train.reward import LengthShaping, OverlongPenalty, TrainingReward
from openvlthinker.train.state import (TrainState, create_train_state, make_optimizer,
                                       train_state_shardings)

# The update's response width is rounded up to a multiple of this (few shapes compile).
RESPONSE_BUCKET = 16
# Rollout counts that add up over processes (the rest are the same everywhere, or timings).
_SUMMED_STATS = ("groups_sampled", "groups_kept", "groups_invalid", "records_dropped",
                 "generated_tokens")


def gathered_rows(batch: RolloutBatch) -> RowSummary:
  """The per-row figures of every process's rows of the rollout, in global row order."""
  return multihost.gather_tree(batch.summary())


def check_layout(c, data_shards) -> None:
  """Raises ValueError naming the field when the RL batch does not split over the data shards
  and processes (checked before anything compiles, `preflight`, and by the stage)."""
  r = c.rl
  per_shard = r.prompts_per_step // data_shards.count
  if per_shard % r.updates_per_rollout:
    raise ValueError(f"rl.updates_per_rollout: expected a divisor of each data shard's "
                     f"{per_shard} prompts (rl.prompts_per_step / {data_shards.count} "
                     f"data.shards), got {r.updates_per_rollout}")
  n = multihost.count()
  rows_per_micro = configuration.build_packing(c).rows_per_micro
  if r.packing.enabled and rows_per_micro % n:
    raise ValueError(f"rl.packing.rows_per_micro: expected a multiple of the {n} processes (each "
                     f"packs its rows into its part of a micro-batch), got {rows_per_micro}")


def rl_optimizer(r) -> optax.GradientTransformation:
  """AdamW of the `config.rl` section (no warmup: RL starts from a trained policy)."""
  return make_optimizer(r.learning_rate, b1=r.b1, b2=r.b2, weight_decay=r.weight_decay,
                        grad_clip=r.grad_clip)


class RLStage:
  """Builds the RL machinery from a Context; `run(initial_params)` trains and returns params."""

  def __init__(self, ctx: Context, metrics_writer, evaluation: Evaluation | None = None):
    c = ctx.config
    r = c.rl
    self.ctx, self.c, self.writer = ctx, c, metrics_writer
    self.tx = rl_optimizer(r)
    tok = ctx.tokenizer
    self.sampler_config = configuration.build_sampler(c, tok)
    self.sampler = Sampler(ctx.graphdef, self.sampler_config, ctx.sharder)
    self.loss_config = configuration.build_loss(c)
    self.entropy = configuration.build_entropy(c)
    self.reward = TrainingReward(LengthShaping.from_config(r.length, r.sampler.max_new_tokens),
                                 OverlongPenalty.from_config(r.overlong, r.sampler.max_new_tokens))
    self.advantage_fn = jax.jit(advantages_lib.batch_estimator(r.advantage))
    self.rows = r.prompts_per_step * r.group_size // r.updates_per_rollout  # global minibatch
    check_layout(c, ctx.data_shards)
    self.local_prompts = r.prompts_per_step // ctx.data_shards.count * ctx.data_shards.owned
    self.packing = configuration.build_packing(c)
    # Each process packs its own rows into its part of every packed micro-batch.
    self.local_packing = dataclasses.replace(
        self.packing, rows_per_micro=self.packing.rows_per_micro // multihost.count())
    self.state_shardings = train_state_shardings(ctx.initial_params, self.tx, ctx.sharder,
                                                 self.reward.init_stats())
    self.update = rl.make_update(
        ctx.graphdef, self.tx, state_shardings=self.state_shardings,
        sampler_config=self.sampler_config, loss_config=self.loss_config,
        num_micro=self.rows // r.micro_batch_size, entropy=self.entropy,
        nan_at_step=c.debug.nan_loss_at_rl_step,
        group_size=r.group_size if r.share_prompt_forward else 1, packed=self.packing.enabled)
    self.task_gradient_norms = rl.make_task_gradient_norms(
        ctx.graphdef, sampler_config=self.sampler_config, loss_config=self.loss_config,
        num_micro=self.rows // r.micro_batch_size, num_tasks=taxonomy.NUM_TASKS,
        group_size=r.group_size if r.share_prompt_forward else 1, packed=self.packing.enabled)
    if self.packing.enabled:
      self.reference_logprobs = jax.jit(
          lambda p, pk: rl.packed_reference_logprobs(p, ctx.graphdef, pk, self.sampler_config))
    else:
      self.reference_logprobs = jax.jit(
          lambda p, mb: rl.policy_logprobs(p, ctx.graphdef, mb, self.sampler_config)[0])
    self._evaluation = evaluation
    self.empty_streak = 0  # consecutive steps whose filter kept nothing (checkpointed)

  @property
  def evaluation(self) -> Evaluation:
    if self._evaluation is None:  # Built on first use: renders and tokenises the eval sets.
      self._evaluation = Evaluation.from_context(self.ctx)
    return self._evaluation

  def evaluate(self, params, step: int) -> dict[str, np.ndarray]:
    """Evaluates every set (eval/rl_<step>/); returns the per-task results."""
    results, summaries = self.evaluation(params, f"rl_{step}", {"stage": "rl", "step": step})
    self.writer.write("eval", step, rl_metrics.eval_metrics(results)
                      | self.evaluation.set_metrics(summaries))
    return results

  # ------------------------------------------------------------------------------ one step

  def rollout(self, params, data_iter, rng, thresholds) -> rollout_lib.Rollout:
    r = self.c.rl
    key = r.advantage_task_key
    return rollout_lib.collect(
        self.sampler, params, data_iter, self.ctx.tokenizer, rng, prompts=self.local_prompts,
        shards=self.ctx.data_shards.owned, group_size=r.group_size,
        filter_groups=r.filter.enabled, low=r.filter.low, high=r.filter.high,
        max_tries=r.filter.max_tries,
        reward_fn=lambda scores, lengths, task_ids: self.reward(scores, lengths, task_ids,
                                                                thresholds),
        task_key_fn=lambda problem_types, task_ids: task_key_ids(problem_types, task_ids, key),
        use_images=self.ctx.uses_images)

  def advantages(self, batch: RolloutBatch, rows: RowSummary | None = None) -> RolloutBatch:
    """`batch` (this process's rows) with the estimator's advantages, computed over the whole
    global batch, `rows` (`gathered_rows(batch)` when None); zero on invalid rows."""
    rows = gathered_rows(batch) if rows is None else rows
    group_ids = np.arange(len(rows.reward), dtype=np.int32) // self.c.rl.group_size
    # Dense task ids in [0, B), the estimators' contract (a task or problem-type id can exceed a
    # small batch); the stage-2 grouping by equal key is unchanged.
    _, task_ids = np.unique(rows.task_keys, return_inverse=True)
    # The reward's parts, for the estimators that normalise each separately (GDPO, GS-GDPO).
    parts = np.stack([rows.accuracy, rows.format, rows.structure], axis=1)
    adv = self.advantage_fn(rows.reward, group_ids, task_ids.astype(np.int32), rows.valid,
                            parts=parts, lengths=rows.lengths)
    mine = multihost.block(len(rows.reward))
    return batch.replace(advantages=np.asarray(adv, np.float32)[mine])

  def minibatch_rows(self, rows: int, u: int, shards: int | None = None) -> np.ndarray:
    """The rows of optimizer minibatch u among `rows` rows of `shards` data shards (default: this
    process's rows and shards): the u-th slice of each shard's rows (with one shard, rows
    [u·m, (u+1)·m))."""
    shards = self.ctx.data_shards.owned if shards is None else shards
    per_shard = rows // shards
    m = per_shard // self.c.rl.updates_per_rollout
    return np.concatenate([np.arange(j * per_shard + u * m, j * per_shard + (u + 1) * m)
                           for j in range(shards)])

  def updates(self, state: TrainState, batch: RolloutBatch, ref_params, rows: RowSummary,
              task_balance: bool = False) -> tuple[TrainState, list[dict], dict[str, float]]:
    """One optimizer step per minibatch of `self.rows` rows (whole groups of every data shard);
    `rows`: the whole batch's per-row figures. With `task_balance`, each task's policy-gradient
    norm on the first minibatch, before its update (`task_balance_metrics`)."""
    # Every process trims to the global batch's longest response and pads to its widest prompt.
    batch = batch.left_pad_prompts(multihost.max_over_processes(batch.response_start))
    batch = batch.trim(RESPONSE_BUCKET, int(rows.lengths.max()))
    metrics, balance = [], {}
    for u in range(self.c.rl.updates_per_rollout):
      mb = self.place(batch.rows(self.minibatch_rows(batch.size, u)))
      if self.loss_config.kl_coef > 0:
        mb = mb.replace(ref_logprobs=self.reference_logprobs(ref_params, mb))
      if task_balance and u == 0:
        first = self.minibatch_rows(len(rows.reward), 0, self.ctx.data_shards.count)
        balance = rl_metrics.task_balance_metrics(
            np.asarray(self.task_gradient_norms(state.params, mb)),
            rows.task_ids[first][rows.valid[first]])
      state, m = self.update(state, mb)
      metrics.append(jax.device_get(m))
    return state, metrics, balance

  def place(self, mb: RolloutBatch):
    """A host minibatch on the mesh, as the update takes it: rows padded to the longest
    response, or packed (`rl.packing`)."""
    shd = self.ctx.sharder
    if not self.packing.enabled:
      return jax.tree.map(shd.put_batch, mb)
    image_token_id = getattr(self.ctx.model.cfg, "image_token_id", None)
    # Each process packs its own rows into its block of every micro-batch's R rows.
    n = multihost.count()
    packed, _ = packing.pack(mb, self.local_packing, group_size=self.c.rl.group_size,
                             shards=max(shd.shards("batch") // n, 1),
                             image_token_id=image_token_id if mb.images is not None else None,
                             agree=multihost.max_over_processes)
    return packing.put(packing.for_process(packed, multihost.index(), mb.size), shd)

  def count_empty(self, step: int, rows: RowSummary, sampled_groups: int) -> bool:
    """Whether the filter kept no group this step (`rows`: the whole batch's): warns, and raises
    RunError after `rl.filter.max_empty_steps` such steps in a row."""
    if rows.valid.any():
      self.empty_streak = 0
      return False
    self.empty_streak += 1
    f = self.c.rl.filter
    print(f"warning: rl step {step + 1}: the filter kept 0 of {sampled_groups} sampled groups "
          f"(each group's accuracy was outside ({f.low}, {f.high})), so this step trains on "
          f"nothing ({self.empty_streak} in a row; the run stops at {f.max_empty_steps})",
          file=sys.stderr, flush=True)
    if self.empty_streak >= f.max_empty_steps:
      raise RunError(
          f"rl.filter: {self.empty_streak} steps in a row kept no group (every group's mean "
          f"accuracy was outside ({f.low}, {f.high})): widen rl.filter.low/high, raise rl.filter.max_tries, "
          "change data.difficulty, or raise rl.filter.max_empty_steps")
    return True

  def step(self, state: TrainState, data_iter, step: int, ref_params
           ) -> tuple[TrainState, dict[str, float]]:
    start = time.perf_counter()
    rng = jax.random.fold_in(jax.random.key(self.c.seed + 1), step)
    ro = self.rollout(state.params, data_iter, rng, self.reward.thresholds(state.extra))
    rows = gathered_rows(ro.batch)  # every process's per-row figures: small, gathered once
    batch = self.advantages(ro.batch, rows)
    state = state.replace(extra=self.reward.update_stats(
        state.extra, rows.lengths, rows.task_ids, rows.accuracy, rows.valid))
    update_start = time.perf_counter()
    stats = _global_stats(ro.stats)
    empty = self.count_empty(step, rows, stats["groups_sampled"])
    update_metrics = {}
    if not empty:  # An update on no rows would still move the weights (momentum, decay).
      every = self.c.rl.task_balance_every
      state, updates, balance = self.updates(state, batch, ref_params, rows,
                                             task_balance=bool(every) and step % every == 0)
      update_metrics = {**rl_metrics.reduce_updates(updates, rows), **balance}
    sampled = multihost.gather_tree(ro.sampled)
    metrics = {**stats, "update_s": time.perf_counter() - update_start, **update_metrics,
               "empty_step": float(empty),
               **rl_metrics.rollout_metrics(rows, sampled, self.c.rl.length.enabled),
               "skipped_steps_total": int(state.skipped)}
    metrics["step_s"] = time.perf_counter() - start
    metrics["tokens_per_s"] = metrics["generated_tokens"] / metrics["step_s"]
    return state, metrics

  # ----------------------------------------------------------------------------------- run

  def initial_state(self, params) -> TrainState:
    return create_train_state(params, self.tx, self.ctx.sharder, extra=self.reward.init_stats())[0]

  def run(self, initial_params) -> tuple[Any, dict[str, dict[str, np.ndarray]]]:
    """Trains from `initial_params` (or resumes); returns (params, {eval name: results})."""
    c = self.c
    data_iter = self.ctx.rl_batches()
    state = self.initial_state(initial_params)
    evals: dict[str, dict[str, np.ndarray]] = {}

    def load_meta(meta):
      self.empty_streak = int(meta.get("empty_streak", 0))
      evals.update({k: {m: np.asarray(v, np.float64) for m, v in res.items()}
                    for k, res in meta.get("evals", {}).items()})

    def save_meta():
      return {"empty_streak": self.empty_streak, "evals": {k: {m: np.asarray(v).tolist() for m, v in res.items()}
                        for k, res in evals.items()}}

    def after_step(done_steps, state, done):
      if done:
        evals["after_rl"] = self.evaluate(state.params, done_steps)
      elif done_steps % c.eval.every == 0:
        self.evaluate(state.params, done_steps)

    def rl_step(state, step):
      if "before_rl" not in evals:  # Also after a resume from a run that had not evaluated yet.
        evals["before_rl"] = self.evaluate(state.params, 0)
      return self.step(state, data_iter, step, initial_params)

    state = loop.run_stage(
        "rl", c.rl.steps, state, rl_step, data_iter,
        loop.StageCheckpoints(self.ctx.workdir, "rl", c.checkpoint.keep), self.writer,
        checkpoint_every=c.checkpoint.every, progress_bar=c.progress_bar,
        postfix=("reward/mean", "reward_accuracy/mean"), after_step=after_step,
        save_meta=save_meta, load_meta=load_meta, truncate=("eval",))
    if "before_rl" not in evals:  # rl.steps == 0.
      evals["before_rl"] = self.evaluate(state.params, 0)
    if "after_rl" not in evals:  # Finished earlier; the final evaluation is in the checkpoint.
      evals["after_rl"] = self.evaluate(state.params, c.rl.steps)
    return state.params, evals


def _global_stats(stats: dict[str, float]) -> dict[str, float]:
  """A rollout's stats with the counts summed over processes (timings stay this process's)."""
  if multihost.count() == 1:
    return stats
  totals = multihost.concat(np.asarray([[stats[k] for k in _SUMMED_STATS]], np.float64)).sum(0)
  return {**stats, **{k: int(v) for k, v in zip(_SUMMED_STATS, totals)}}
