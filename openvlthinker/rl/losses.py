"""Policy losses (REFERENCE §4) as deferred (numerator, denominator) reductions, with metrics.

Owns the registry of per-token policy losses (`ppo_dual_clip`, `gspo`, `cispo`; REFERENCE §4,
"Other policy losses"), the optional k3 KL penalty to a
reference policy, the aggregation modes, and the metrics of one micro-batch. Gradient accumulation
stays exact: sum the numerators and the denominators of the micro-batches, divide once
(`loss_value`); metrics come as sums, counts, minima and maxima that `accumulate_metrics` combines
and `finalize_metrics` turns into means.
"""
from collections.abc import Callable
import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from openvlthinker.taxonomy import NUM_TASKS
from openvlthinker.fields import check, positive_int
from openvlthinker.registry import Registry

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "fixed_denominator")


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
  """Defaults are the public code's (REFERENCE §4).

  Attributes:
    name: a registered per-token loss: "ppo_dual_clip" (the public code's), "gspo" (sequence-level
      ratio; needs aggregation "seq_mean_token_mean", and the GSPO paper's clips are ~3e-4 / 4e-4)
      or "cispo" (clipped, stop-gradient importance weight on log π_θ; only clip_high applies).
    clip_low, clip_high: ε_low, ε_high of the ratio clip [1 - ε_low, 1 + ε_high].
    dual_clip: c of the dual clip for A < 0 (the loss is capped at -A·c; ppo_dual_clip only);
      None turns it off.
    log_ratio_clamp: log π_θ - log π_old is clipped to ±this before exponentiating.
    aggregation: "token_mean" (mean over all response tokens of the optimizer minibatch),
      "seq_mean_token_mean" (the paper's mean over sequences of per-sequence token means) or
      "fixed_denominator" (token sum / (sequences × fixed_length), Dr.GRPO's constant normaliser).
    fixed_length: tokens per sequence for "fixed_denominator"; None uses the mask's width L.
    kl_coef: weight of the k3 KL estimate to the reference policy; 0 turns it off (the paper's
      setting), > 0 requires ref_logp.
    num_tasks: size of the per-task advantage metrics.
  """
  name: str = "ppo_dual_clip"
  clip_low: float = 0.2
  clip_high: float = 0.3
  dual_clip: float | None = 3.0
  log_ratio_clamp: float = 20.0
  aggregation: str = "token_mean"
  fixed_length: int | None = None
  kl_coef: float = 0.0
  num_tasks: int = NUM_TASKS

  def __post_init__(self):
    check(self.name in _POLICY_LOSSES, "name", f"one of {_POLICY_LOSSES.names()}", self.name)
    check(0 <= self.clip_low < 1, "clip_low", "0 <= clip_low < 1", self.clip_low)
    check(0 <= self.clip_high <= 10, "clip_high", "a number in [0, 10]", self.clip_high)
    check(self.dual_clip is None or self.dual_clip > 1 + self.clip_high, "dual_clip",
          f"None or a number > 1 + clip_high={self.clip_high}", self.dual_clip)
    check(self.log_ratio_clamp > 0, "log_ratio_clamp", "a number > 0", self.log_ratio_clamp)
    check(self.aggregation in AGGREGATIONS, "aggregation", f"one of {AGGREGATIONS}",
          self.aggregation)
    check(self.name != "gspo" or self.aggregation == "seq_mean_token_mean", "aggregation",
          "'seq_mean_token_mean' with name='gspo' (its loss is a mean over sequences)",
          self.aggregation)
    check(self.fixed_length is None or positive_int(self.fixed_length), "fixed_length",
          "None or a positive integer", self.fixed_length)
    check(self.kl_coef >= 0, "kl_coef", "a number >= 0", self.kl_coef)
    check(positive_int(self.num_tasks), "num_tasks", "a positive integer", self.num_tasks)


# ---------------------------------------------------------------------------------- registry

TokenLossFn = Callable[[jax.Array, jax.Array, jax.Array, PolicyLossConfig], jax.Array]
# fn(log_ratio float32[B, L], advantages float32[B, 1] or [B, L], mask float32[B, L], cfg)
#   -> float32[B, L]; log_ratio = log π_θ - log π_old (clamped), differentiable through log π_θ.
_POLICY_LOSSES: Registry[TokenLossFn] = Registry("policy loss")
register_policy_loss = _POLICY_LOSSES.register
policy_losses = _POLICY_LOSSES.names


def _clipped(log_ratio, cfg):
  """r̂ = exp(clip(Δ, ln(1 - ε_low), ln(1 + ε_high)))."""
  return jnp.exp(jnp.clip(log_ratio, math.log1p(-cfg.clip_low), math.log1p(cfg.clip_high)))


@register_policy_loss("ppo_dual_clip")
def ppo_dual_clip(log_ratio, advantages, mask, cfg):
  """max(-A·r, -A·r̂), and for A < 0 also capped at -A·c (REFERENCE §4)."""
  del mask
  ratio = jnp.exp(log_ratio)
  loss = jnp.maximum(-advantages * ratio, -advantages * _clipped(log_ratio, cfg))
  if cfg.dual_clip is not None:
    loss = jnp.where(advantages < 0, jnp.minimum(loss, -advantages * cfg.dual_clip), loss)
  return loss


@register_policy_loss("gspo")
def gspo(log_ratio, advantages, mask, cfg):
  """GSPO: s_i = exp(mean of Δ over i's response tokens); -min(s_i·A_i, clip(s_i)·A_i) on each
  of i's tokens, so "seq_mean_token_mean" averages it over sequences. A is per sequence."""
  seq_log_ratio = (jnp.sum(log_ratio * mask, axis=1, keepdims=True)
                   / jnp.maximum(mask.sum(axis=1, keepdims=True), 1.0))
  adv = jnp.sum(advantages * mask, axis=1, keepdims=True) / jnp.maximum(
      mask.sum(axis=1, keepdims=True), 1.0)  # a per-token advantage: its sequence mean
  seq = jnp.maximum(-adv * jnp.exp(seq_log_ratio), -adv * _clipped(seq_log_ratio, cfg))
  return jnp.broadcast_to(seq, log_ratio.shape)


@register_policy_loss("cispo")
def cispo(log_ratio, advantages, mask, cfg):
  """CISPO: -sg(min(r, 1 + ε_high))·A·log π_θ. Written on Δ = log π_θ - log π_old, which has the
  same gradient (log π_old is a constant); the value is then 0 at r = 1 (offset from the paper's
  by sg(w)·A·log π_old)."""
  del mask
  weight = jax.lax.stop_gradient(jnp.minimum(jnp.exp(log_ratio), 1.0 + cfg.clip_high))
  return -weight * advantages * log_ratio


# --------------------------------------------------------------------------------- the loss


class PolicyLoss(NamedTuple):
  """One micro-batch's loss terms: the loss is Σ numerator / Σ denominator over micro-batches."""
  numerator: jax.Array  # float32[]
  denominator: jax.Array  # float32[]
  metrics: dict[str, jax.Array]


def loss_value(numerator, denominator):
  """numerator / denominator, 0 for a batch without response tokens."""
  return jnp.where(denominator > 0, numerator / jnp.maximum(denominator, 1e-30), 0.0)


def policy_loss(new_logp, old_logp, advantages, mask, cfg: PolicyLossConfig, *, ref_logp=None,
                task_ids=None) -> PolicyLoss:
  """The policy loss of one (micro-)batch.

  Args:
    new_logp: float[B, L] log π_θ of the response tokens (differentiated).
    old_logp: float[B, L] log π_old, the sampling policy's (treated as constant).
    advantages: float[B] per response (spread over its tokens) or float[B, L] per token.
    mask: bool/float[B, L], 1 on response tokens, 0 on prompt and padding.
    cfg: PolicyLossConfig.
    ref_logp: float[B, L] log π_ref; required when cfg.kl_coef > 0.
    task_ids: optional int[B] for the per-task advantage metrics (rows with no task: -1).

  Returns:
    PolicyLoss(numerator, denominator, metrics); see `finalize_metrics` for the metric names.
  """
  new_logp = jnp.asarray(new_logp, jnp.float32)
  if new_logp.ndim != 2:
    raise ValueError(f"new_logp: expected float[B, L], got shape {new_logp.shape}")
  b, length = new_logp.shape
  old_logp = jax.lax.stop_gradient(_check("old_logp", old_logp, (b, length), jnp.float32))
  mask = _check("mask", mask, (b, length), jnp.float32)
  advantages = jax.lax.stop_gradient(jnp.asarray(advantages, jnp.float32))
  if advantages.shape == (b,):
    advantages = advantages[:, None]
  elif advantages.shape != (b, length):
    raise ValueError(f"advantages: expected shape ({b},) or ({b}, {length}), "
                     f"got {advantages.shape}")
  if cfg.kl_coef > 0 and ref_logp is None:
    raise ValueError(f"ref_logp: required when kl_coef > 0 (got kl_coef={cfg.kl_coef})")

  log_ratio = jnp.clip(new_logp - old_logp, -cfg.log_ratio_clamp, cfg.log_ratio_clamp)
  token_loss = _POLICY_LOSSES.get(cfg.name)(log_ratio, advantages, mask, cfg)
  metrics = {}
  if cfg.kl_coef > 0:
    ref_logp = jax.lax.stop_gradient(_check("ref_logp", ref_logp, (b, length), jnp.float32))
    kl = _k3(jnp.clip(ref_logp - new_logp, -cfg.log_ratio_clamp, cfg.log_ratio_clamp))
    token_loss = token_loss + cfg.kl_coef * kl
    metrics["kl_ref_sum"] = jnp.sum(kl * mask)

  seq_tokens = mask.sum(axis=1)
  has_tokens = (seq_tokens > 0).astype(jnp.float32)
  if cfg.aggregation == "token_mean":
    weights, denominator = mask, mask.sum()
  elif cfg.aggregation == "seq_mean_token_mean":
    weights, denominator = mask / jnp.maximum(seq_tokens, 1.0)[:, None], has_tokens.sum()
  else:  # fixed_denominator
    weights = mask
    denominator = has_tokens.sum() * (cfg.fixed_length or length)
  numerator = jnp.sum(token_loss * weights)

  metrics.update(_ratio_metrics(log_ratio, advantages, mask, cfg))
  metrics.update(_task_advantage_metrics(advantages, mask, task_ids, cfg.num_tasks))
  return PolicyLoss(numerator, denominator, metrics)


def _check(name, x, shape, dtype):
  x = jnp.asarray(x)
  if x.shape != shape:
    raise ValueError(f"{name}: expected shape {shape} like new_logp, got {x.shape}")
  return x.astype(dtype)


def _k3(log_q_over_p):
  """k3 estimate of KL(p‖q) from samples of p: q/p - log(q/p) - 1 (non-negative, unbiased)."""
  return jnp.exp(log_q_over_p) - log_q_over_p - 1.0


def _ratio_metrics(log_ratio, advantages, mask, cfg):
  """Token counts in each clip region (where a clip zeroes the gradient) and ratio statistics."""
  ratio = jnp.exp(log_ratio)
  on = mask > 0
  adv = jnp.broadcast_to(advantages, ratio.shape)
  count = lambda region: jnp.sum((region & on).astype(jnp.float32))
  dual = cfg.dual_clip if cfg.dual_clip is not None else jnp.inf
  return {
      "tokens_sum": mask.sum(),
      "clip_high_sum": count((adv > 0) & (ratio > 1 + cfg.clip_high)),
      "clip_low_sum": count((adv < 0) & (ratio < 1 - cfg.clip_low)),
      "dual_clip_sum": count((adv < 0) & (ratio > dual)),
      "ratio_sum": jnp.sum(ratio * mask),
      "ratio_min": jnp.min(jnp.where(on, ratio, jnp.inf)),
      "ratio_max": jnp.max(jnp.where(on, ratio, -jnp.inf)),
      # k3 estimate of KL(π_old‖π_θ) from the tokens π_old sampled.
      "approx_kl_sum": jnp.sum(_k3(log_ratio) * mask),
  }


def _task_advantage_metrics(advantages, mask, task_ids, num_tasks):
  """Per-task sums over sequences (rows with response tokens) of A and A², and their count."""
  b = mask.shape[0]
  seq_adv = jnp.sum(advantages * mask, axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)
  has_tokens = (mask.sum(axis=1) > 0).astype(jnp.float32)
  task_ids = jnp.zeros((b,), jnp.int32) if task_ids is None else jnp.asarray(task_ids, jnp.int32)
  if task_ids.shape != (b,):
    raise ValueError(f"task_ids: expected shape ({b},), got {task_ids.shape}")
  seg_sum = lambda x: jax.ops.segment_sum(x, task_ids, num_segments=num_tasks)
  return {
      "task_adv_sum": seg_sum(seq_adv * has_tokens),
      "task_adv_sq_sum": seg_sum(seq_adv**2 * has_tokens),
      "task_seqs_sum": seg_sum(has_tokens),
  }


# ---------------------------------------------------------------------------------- metrics


def _reduction(key: str):
  """(combine, identity) of a metric: *_min by minimum, *_max by maximum, the rest by sum."""
  if key.endswith("_min"):
    return jnp.minimum, jnp.inf
  if key.endswith("_max"):
    return jnp.maximum, -jnp.inf
  return jnp.add, 0.0


def accumulate_metrics(a: dict[str, jax.Array], b: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Combines two micro-batches' metrics (see `_reduction`)."""
  if a.keys() != b.keys():
    raise ValueError(f"metrics: keys differ: {sorted(a)} vs {sorted(b)}")
  return {key: _reduction(key)[0](a[key], b[key]) for key in a}


def metrics_identity(shapes: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
  """The identity of `accumulate_metrics` for metrics of these shapes (a scan's initial carry)."""
  return {k: jnp.full(s.shape, _reduction(k)[1], s.dtype) for k, s in shapes.items()}


def finalize_metrics(m: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Means from (accumulated) sums.

  Returns clip_high_frac, clip_low_frac, dual_clip_frac (fractions of response tokens where that
  clip zeroes the gradient), ratio_mean/min/max, approx_kl (k3 of KL(π_old‖π_θ)), kl_ref (k3 of
  KL(π_θ‖π_ref), when on), and task_adv_mean/std float32[num_tasks] (population std over the
  sequences of each task; 0 for an absent task).
  """
  tokens = jnp.maximum(m["tokens_sum"], 1.0)
  seqs = jnp.maximum(m["task_seqs_sum"], 1.0)
  mean = m["task_adv_sum"] / seqs
  out = {
      "clip_high_frac": m["clip_high_sum"] / tokens,
      "clip_low_frac": m["clip_low_sum"] / tokens,
      "dual_clip_frac": m["dual_clip_sum"] / tokens,
      "ratio_mean": m["ratio_sum"] / tokens,
      "ratio_min": m["ratio_min"],
      "ratio_max": m["ratio_max"],
      "approx_kl": m["approx_kl_sum"] / tokens,
      "task_adv_mean": mean,
      "task_adv_std": jnp.sqrt(jnp.maximum(m["task_adv_sq_sum"] / seqs - mean**2, 0.0)),
  }
  if "kl_ref_sum" in m:
    out["kl_ref"] = m["kl_ref_sum"] / tokens
  return out
