"""The RL stage, one step as DESIGN.md draws it: rollout → host scoring → length reward →
advantages → minibatch updates → metrics, with evaluation and checkpoints every N steps.

Randomness is a pure function of (seed, step), and the state, the shaping statistics and the data
iterator are checkpointed, so a run resumed from step k reproduces the uninterrupted run's steps
k+1, k+2, … exactly.
"""
from __future__ import annotations

import functools
import time
from typing import Any

import jax
import numpy as np

from openvlthinker import taxonomy
from openvlthinker.data import pipeline
from openvlthinker.evaluate import Evaluator
from openvlthinker.rl import advantages as advantages_lib
from openvlthinker.rl import losses, rewards, shaping
from openvlthinker.sampler import Sampler, SamplerConfig
from openvlthinker.sharding import batch_sharding
from openvlthinker.train import loop, rl, rollout as rollout_lib
from openvlthinker.train.context import Context, num_task_keys, task_key_ids
from openvlthinker.train.scoring import per_task_means
from openvlthinker.train.state import create_train_state, make_optimizer

T = taxonomy.TASK_TYPES


RESPONSE_BUCKET = 16


def trim_responses(a: dict[str, np.ndarray], response_start: int, bucket: int):
  """Drops response columns past the longest response (rounded up to `bucket` columns, so few
  shapes compile): the teacher-forced update then skips the padding the sampler reserved."""
  width = a["tokens"].shape[1]
  keep = min(width, -(-max(int(a["lengths"].max()), 1) // bucket) * bucket)
  out = dict(a)
  for k in ("tokens", "old_logprobs", "entropies", "response_mask"):
    out[k] = a[k][:, :keep]
  for k in ("sequence_tokens", "sequence_positions", "sequence_mask", "prefix_mask"):
    out[k] = a[k][:, :response_start + keep]
  return out


def _per_task_metrics(prefix: str, values: np.ndarray) -> dict[str, float]:
  return {f"{prefix}/{task}": float(v) for task, v in zip(T, values) if np.isfinite(v)}


def eval_metrics(results: dict[str, np.ndarray]) -> dict[str, float]:
  out = {}
  for key in ("accuracy", "overall", "format", "length", "unparsable"):
    out.update(_per_task_metrics(key, results[key]))
    out[f"{key}/mean"] = float(np.nanmean(results[key]))
  return out


class RLStage:
  """Builds the RL machinery from a Context; `run(initial_params)` trains and returns params."""

  def __init__(self, ctx: Context, metrics_writer):
    c = ctx.config
    self.ctx, self.c, self.writer = ctx, c, metrics_writer
    r = c.rl
    self.tx = make_optimizer(r.learning_rate, b1=r.b1, b2=r.b2, weight_decay=r.weight_decay,
                             grad_clip=r.grad_clip)
    tok = ctx.tokenizer
    self.sampler_config = SamplerConfig(
        max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
        stop_tokens=(tok.eos_id,), prompt_buckets=tuple(c.data.prompt_buckets), pad_id=tok.pad_id,
        decode_phases=r.decode_phases)
    self.sampler = Sampler(ctx.graphdef, self.sampler_config, ctx.sharder)
    self.loss_config = losses.PolicyLossConfig(
        name=r.policy_loss, clip_low=r.clip_low, clip_high=r.clip_high, dual_clip=r.dual_clip,
        log_ratio_clamp=r.log_ratio_clamp, aggregation=r.aggregation,
        fixed_length=r.max_new_tokens, kl_coef=r.kl_coef)
    self.entropy = shaping.EntropyShapingConfig(
        enabled=r.entropy.enabled, coef=r.entropy.coef,
        h_min=tuple(r.entropy.h_min[t] for t in T), h_max=tuple(r.entropy.h_max[t] for t in T),
        estimator=r.entropy.estimator)
    self.static_thresholds = shaping.static_thresholds(
        {t: tuple(r.length.thresholds[t]) for t in T})
    self.adaptive = shaping.AdaptiveLengthConfig(
        max_length=r.max_new_tokens, decay=r.length.decay, min_count=r.length.min_count,
        prior=tuple(tuple(float(v) for v in row) for row in self.static_thresholds))
    # Rows come prompt-major, G per prompt: the layout hints let G²RPO skip its sorts.
    self.advantage_fn = jax.jit(functools.partial(
        advantages_lib.get_advantage_estimator(r.advantage), group_size=r.group_size,
        num_tasks=num_task_keys(r.advantage_task_key)))
    # Jitted once: these run every step on small arrays, where op-by-op dispatch dominates.
    self.length_thresholds = jax.jit(self.adaptive.thresholds)
    self.length_update = jax.jit(self.adaptive.update)
    self.length_reward = jax.jit(shaping.length_reward)
    self._evaluator = None
    self.rows = r.prompts_per_step * r.group_size // r.updates_per_rollout
    self._updates: dict[int, Any] = {}
    self._ref_logprobs = None

  # ------------------------------------------------------------------------------- pieces

  @property
  def evaluator(self) -> Evaluator:
    if self._evaluator is None:  # Built on first use: renders and tokenises the held-out set.
      c = self.c
      self._evaluator = Evaluator(
          self.ctx.graphdef, self.ctx.data_config(c.eval.batch_size, "eval"), self.ctx.tokenizer,
          num_per_task=c.eval.num_per_task, batch_size=c.eval.batch_size,
          max_new_tokens=c.eval.max_new_tokens, sharder=self.ctx.sharder)
    return self._evaluator

  def _update_fn(self, response_start: int):
    if response_start not in self._updates:  # One compile per prompt bucket.
      self._updates[response_start] = rl.make_update(
          self.ctx.graphdef, self.tx, response_start=response_start,
          sampler_config=self.sampler_config, loss_config=self.loss_config,
          num_micro=self.rows // self.c.rl.micro_batch_size, entropy=self.entropy,
          nan_at_step=self.c.debug.nan_loss_at_rl_step,
          group_size=self.c.rl.group_size if self.c.rl.share_prompt_forward else 1)
    return self._updates[response_start]

  def _reference_logprobs(self, ref_params, mb: dict, response_start: int):
    if self._ref_logprobs is None:
      self._ref_logprobs = jax.jit(
          lambda p, m, start: rl.policy_logprobs(p, self.ctx.graphdef, m, start,
                                                 self.sampler_config)[0],
          static_argnums=2)
    return self._ref_logprobs(ref_params, mb, response_start)

  def _shard(self, arrays: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: jax.device_put(v, batch_sharding(self.ctx.sharder, v.ndim, v.shape))
            for k, v in arrays.items()}

  def evaluate(self, params, step: int) -> dict[str, np.ndarray]:
    results = self.evaluator(params, jax.random.key(0))
    self.writer.write("eval", step, eval_metrics(results))
    return results

  # ---------------------------------------------------------------------------------- step

  def step(self, state, data_iter, step: int, ref_params) -> tuple[Any, dict[str, float]]:
    c, r = self.c, self.c.rl
    start_time = time.perf_counter()
    rng = jax.random.fold_in(jax.random.key(c.seed + 1), step)
    ro = rollout_lib.collect(self.sampler, state.params, data_iter, self.ctx.tokenizer, rng,
                             prompts=r.prompts_per_step, group_size=r.group_size,
                             filter_groups=r.filter.enabled, low=r.filter.low,
                             high=r.filter.high, max_tries=r.filter.max_tries,
                             use_images=self.ctx.model_config.vision is not None)
    a = ro.arrays
    b = len(ro.valid)
    lengths, task_ids = a["lengths"], a["task_ids"]
    metrics: dict[str, float] = dict(ro.stats)

    # Rewards: the length term (REFERENCE §6) joins here, with static or adaptive thresholds.
    w_len, r_len = 0.0, np.zeros(b, np.float32)
    extra = state.extra
    if r.length.enabled:
      w_len = r.length.weight
      thresholds = (self.length_thresholds(extra["length_stats"]) if r.length.adaptive
                    else self.static_thresholds)
      r_len = np.asarray(self.length_reward(lengths, task_ids, thresholds))
      if r.length.adaptive:
        correct = ro.scores["accuracy"] >= 1.0
        extra = {**extra, "length_stats": self.length_update(
            extra["length_stats"], lengths, task_ids, correct, ro.valid)}
      metrics.update(_per_task_metrics("length_reward", per_task_means(
          {"r": r_len}, task_ids, len(T), ro.valid)["r"]))
    reward = np.asarray(rewards.combine(ro.scores["accuracy"], ro.scores["format"],
                                        ro.scores["structure"], r_len, w_len), np.float32)
    keys = task_key_ids(ro.problem_types, task_ids, r.advantage_task_key)
    group_ids = np.arange(b, dtype=np.int32) // r.group_size
    adv = np.asarray(self.advantage_fn(reward, group_ids, keys, ro.valid), np.float32)
    adv = np.where(ro.valid, adv, 0.0).astype(np.float32)

    # Updates: whole groups per minibatch; invalid rows carry no response tokens in the loss.
    a = dict(a, advantages=adv, response_mask=a["response_mask"] & ro.valid[:, None])
    a = trim_responses(a, ro.response_start, RESPONSE_BUCKET)
    state = state.replace(extra=extra)
    update = self._update_fn(ro.response_start)
    update_metrics = []
    update_start = time.perf_counter()
    for u in range(r.updates_per_rollout):
      rows = slice(u * self.rows, (u + 1) * self.rows)
      mb = {k: a[k][rows] for k in rl.UPDATE_KEYS if k in a}
      mb = self._shard(mb)
      if self.loss_config.kl_coef > 0:
        mb["ref_logprobs"] = self._reference_logprobs(ref_params, mb, ro.response_start)
      state, m = update(state, mb)
      update_metrics.append(jax.device_get(m))
    metrics["update_s"] = time.perf_counter() - update_start

    for key in update_metrics[0]:
      values = np.stack([np.asarray(m[key]) for m in update_metrics])
      if key == "skipped_step":
        metrics[key] = float(values.sum())
      elif key in ("task_adv_mean", "task_adv_std"):  # Keyed by task id in the loss metrics.
        present = np.bincount(task_ids[ro.valid], minlength=len(T)) > 0
        vals = np.where(present, values.mean(0), np.nan)
        metrics.update(_per_task_metrics(key.replace("task_", ""), vals))
      else:
        metrics[key] = float(values.mean())
    sampled = per_task_means(dict(ro.sampled_scores), ro.sampled_task_ids, len(T))
    for key in ("overall", "accuracy", "format"):
      metrics.update(_per_task_metrics(f"reward_{key}" if key != "overall" else "reward",
                                       sampled[key]))
      metrics[f"reward_{key}/mean" if key != "overall" else "reward/mean"] = float(
          np.mean(ro.sampled_scores[key]))
    metrics["unparsable_frac"] = float(np.mean(ro.sampled_scores["unparsable"]))
    token_entropy = (a["entropies"] * a["response_mask"]).sum(1) / np.maximum(lengths, 1)
    metrics.update(_per_task_metrics("entropy", per_task_means(
        {"h": token_entropy}, task_ids, len(T), ro.valid)["h"]))
    metrics.update(_per_task_metrics("length", per_task_means(
        {"l": lengths.astype(np.float64)}, task_ids, len(T))["l"]))
    metrics["skipped_steps_total"] = int(state.skipped)
    metrics["step_s"] = time.perf_counter() - start_time
    metrics["tokens_per_s"] = metrics["generated_tokens"] / metrics["step_s"]
    return state, metrics

  # ----------------------------------------------------------------------------------- run

  def initial_state(self, params):
    extra = {"length_stats": self.adaptive.init()}
    return create_train_state(params, self.tx, self.c.seed + 1, extra=extra)

  def run(self, initial_params) -> tuple[Any, dict[str, dict[str, np.ndarray]]]:
    """Trains from `initial_params` (or resumes); returns (params, {eval name: results})."""
    c = self.c
    steps = c.rl.steps
    ckpts = loop.StageCheckpoints(self.ctx.workdir, "rl", c.checkpoint.keep)
    data_iter = iter(pipeline.rl_dataset(self.ctx.data_config(c.rl.prompts_per_step),
                                         self.ctx.tokenizer))
    state = self.initial_state(initial_params)
    restored = ckpts.restore(state)
    evals = {}
    if restored is not None:
      _, state, meta = restored
      data_iter.set_state(meta["data_iterator"])
      evals = {k: {m: np.asarray(v, np.float64) for m, v in res.items()}
               for k, res in meta.get("evals", {}).items()}
    start = int(state.step) // c.rl.updates_per_rollout
    self.writer.truncate_after("rl", start)
    self.writer.truncate_after("eval", start)
    if "before_rl" not in evals:
      evals["before_rl"] = self.evaluate(state.params, 0)
    preempt = loop.Preemption()
    bar = loop.progress(steps, start, "rl", c.progress_bar)
    try:
      for step in range(start, steps):
        state, metrics = self.step(state, data_iter, step, initial_params)
        self.writer.write("rl", step + 1, metrics)
        bar.update()
        bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}",
                        acc=f"{metrics['reward_accuracy/mean']:.3f}")
        done = step + 1 == steps
        if done:
          evals["after_rl"] = self.evaluate(state.params, step + 1)
        elif (step + 1) % c.eval.every == 0:
          self.evaluate(state.params, step + 1)
        if done or (step + 1) % c.checkpoint.every == 0 or preempt.requested:
          meta = {"data_iterator": data_iter.get_state(),
                  "evals": {k: {m: np.asarray(v).tolist() for m, v in res.items()}
                            for k, res in evals.items()}}
          ckpts.save(step + 1, state, meta)
        if preempt.requested and not done:
          raise loop.Preempted(f"SIGTERM: saved the RL checkpoint at step {step + 1}")
    finally:
      bar.close()
      preempt.restore()
    if "after_rl" not in evals:  # Finished earlier; the final evaluation is in the checkpoint.
      evals["after_rl"] = self.evaluate(state.params, steps)
    return state.params, evals
