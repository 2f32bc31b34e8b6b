"""The config schema (every field with its default) and its validation.

`configs/*.py` start from `base_config()` and change values; because the schema is locked, a
misspelled field is an error, and `validate` checks values before anything compiles, raising a
`ConfigError` whose one-line message names the field and what was expected.
"""
from __future__ import annotations

from typing import Any, Callable

import ml_collections

from openvlthinker import sharding, taxonomy


class ConfigError(ValueError):
  """A config field holds a value the run cannot use."""


def _per_task(value) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({t: value for t in taxonomy.TASK_TYPES})


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  c.sharding_rules = tuple((k, v) for k, v in sharding.DEFAULT_RULES)

  c.model = ml_collections.ConfigDict(dict(
      vocab_size=1024, width=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
      mlp_dim=1024, rope_theta=10_000.0, tie_embeddings=True, dtype="float32",
      param_dtype="float32", remat=False, image_token_id=3, merge_patches=True,
      prefix_full_attention=False))
  c.model.vision = ml_collections.ConfigDict(dict(
      enabled=True, image_size=64, patch_size=8, width=128, num_layers=2, num_heads=4,
      mlp_dim=512))

  # Data: image_size and num_image_tokens follow the model; the rest maps onto DataConfig.
  c.data = ml_collections.ConfigDict(dict(
      source="suite", path="", image_root="", tfds_config="small", seq_len=192,
      batch_size=16, prompt_buckets=(64, 96, 128), max_images=1, worker_count=0,
      skip_missing_images=False))
  c.data.mixture = _per_task(1.0)
  c.data.difficulty = _per_task(0)
  c.tokenizer = ml_collections.ConfigDict(dict(path=""))  # '' = the shipped suite tokenizer.

  c.sft = ml_collections.ConfigDict(dict(
      steps=300, learning_rate=1e-3, warmup_steps=20, weight_decay=0.01, grad_clip=1.0))

  c.rl = ml_collections.ConfigDict(dict(
      steps=40,
      prompts_per_step=8,        # P prompts per rollout ...
      group_size=8,              # ... × G responses each.
      updates_per_rollout=1,     # optimizer minibatches per rollout (REFERENCE: 4).
      micro_batch_size=32,       # rows per gradient-accumulation micro-batch.
      share_prompt_forward=True,  # run each prompt once per group in the update (exact).
      learning_rate=2e-5, b1=0.9, b2=0.999, weight_decay=0.01, grad_clip=1.0,
      advantage="g2rpo",         # any name in rl.advantages' registry.
      advantage_task_key="task_type",  # 'task_type' or 'problem_type' (the public code's key).
      policy_loss="ppo_dual_clip",
      clip_low=0.2, clip_high=0.3, dual_clip=3.0, log_ratio_clamp=20.0,
      aggregation="token_mean",  # 'token_mean' | 'seq_mean_token_mean' | 'fixed_denominator'.
      kl_coef=0.0,               # k3 KL to the initial (reference) policy; 0 = off, as the paper.
      temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=96,
      decode_phases=4))          # the sampler's decode loop grows its cache in this many phases.
  c.rl.filter = ml_collections.ConfigDict(dict(enabled=True, low=0.01, high=0.99, max_tries=3))
  # Length shaping: static thresholds below, or adaptive ones (quantiles of the lengths of correct
  # responses, rl/shaping.py) that start from them.
  c.rl.length = ml_collections.ConfigDict(dict(enabled=False, weight=0.1, adaptive=True,
                                               decay=0.9, min_count=16.0))
  c.rl.length.thresholds = _per_task((8, 24, 72, 96))  # (L_min, L_low, L_high, L_max) tokens.
  c.rl.entropy = ml_collections.ConfigDict(dict(
      enabled=False, coef=0.02, estimator="exact"))  # 'exact' or 'sampled_token' (-log π(y)).
  c.rl.entropy.h_min = _per_task(0.2)
  c.rl.entropy.h_max = _per_task(0.6)

  c.eval = ml_collections.ConfigDict(dict(every=20, num_per_task=32, batch_size=64,
                                          max_new_tokens=96))
  c.checkpoint = ml_collections.ConfigDict(dict(every=20, keep=2))
  c.debug = ml_collections.ConfigDict(dict(nan_loss_at_rl_step=-1))  # Test hook; -1 = off.
  c.progress_bar = True
  return c


def _check(cond: bool, field: str, expected: str, got: Any):
  if not cond:
    raise ConfigError(f"{field}: expected {expected}, got {got!r}")


def _positive(c, field: str):
  value = _get(c, field)
  _check(isinstance(value, int) and not isinstance(value, bool) and value > 0, field,
         "a positive integer", value)


def _get(c, field: str):
  node = c
  for part in field.split("."):
    node = node[part]
  return node


_CHECKS: list[Callable[[ml_collections.ConfigDict], None]] = []


def check(fn):
  """Registers a validation rule; rules run in registration order."""
  _CHECKS.append(fn)
  return fn


@check
def _mesh(c):
  sizes = [c.mesh[a] for a in sharding.MESH_AXES]
  for axis, size in zip(sharding.MESH_AXES, sizes):
    _check(isinstance(size, int) and (size == -1 or size > 0), f"mesh.{axis}",
           "a positive integer or -1", size)
  _check(sizes.count(-1) <= 1, "mesh", "at most one axis set to -1", dict(c.mesh))


@check
def _model(c):
  m = c.model
  for f in ("vocab_size", "width", "num_layers", "num_heads", "num_kv_heads", "head_dim",
            "mlp_dim"):
    _positive(c, f"model.{f}")
  _check(m.width % m.num_heads == 0, "model.num_heads",
         f"a divisor of model.width={m.width}", m.num_heads)
  _check(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads",
         f"a divisor of model.num_heads={m.num_heads}", m.num_kv_heads)
  _check(m.head_dim % 2 == 0, "model.head_dim", "an even number (rotary embeddings)", m.head_dim)
  for f in ("dtype", "param_dtype"):
    _check(m[f] in ("float32", "bfloat16"), f"model.{f}", "'float32' or 'bfloat16'", m[f])
  _check(0 <= m.image_token_id < m.vocab_size, "model.image_token_id",
         f"an id in [0, model.vocab_size={m.vocab_size})", m.image_token_id)
  v = m.vision
  if v.enabled:
    for f in ("image_size", "patch_size", "width", "num_layers", "num_heads", "mlp_dim"):
      _positive(c, f"model.vision.{f}")
    _check(v.image_size % v.patch_size == 0, "model.vision.patch_size",
           f"a divisor of model.vision.image_size={v.image_size}", v.patch_size)
    _check(v.width % v.num_heads == 0, "model.vision.num_heads",
           f"a divisor of model.vision.width={v.width}", v.num_heads)
    grid = v.image_size // v.patch_size
    _check(not m.merge_patches or grid % 2 == 0, "model.merge_patches",
           f"False when the patch grid ({grid}) is odd", m.merge_patches)


def _choice(c, field: str, choices):
  value = _get(c, field)
  _check(value in choices, field, f"one of {tuple(choices)}", value)


def _fraction(c, field: str, low: float = 0.0, high: float = 1.0):
  value = _get(c, field)
  _check(isinstance(value, (int, float)) and low <= value <= high, field,
         f"a number in [{low}, {high}]", value)


@check
def _data(c):
  _choice(c, "data.source", ("suite", "tfds", "json"))
  _check(c.data.source == "suite" or bool(c.data.path), "data.path",
         f"a path for data.source={c.data.source!r}", c.data.path)
  for f in ("seq_len", "batch_size", "max_images"):
    _positive(c, f"data.{f}")
  buckets = tuple(c.data.prompt_buckets)
  _check(bool(buckets) and list(buckets) == sorted(set(buckets)) and buckets[0] > 0,
         "data.prompt_buckets", "increasing positive lengths", buckets)
  for task, weight in c.data.mixture.items():
    _check(isinstance(weight, (int, float)) and weight >= 0, f"data.mixture.{task}",
           "a weight >= 0", weight)
  _check(sum(c.data.mixture.values()) > 0, "data.mixture", "at least one positive weight",
         dict(c.data.mixture))


@check
def _sft_rl(c):
  for f in ("steps", "warmup_steps"):
    value = c.sft[f]
    _check(isinstance(value, int) and value >= 0, f"sft.{f}", "an integer >= 0", value)
  r = c.rl
  _check(isinstance(r.steps, int) and r.steps >= 0, "rl.steps", "an integer >= 0", r.steps)
  for f in ("prompts_per_step", "group_size", "updates_per_rollout", "micro_batch_size",
            "max_new_tokens", "decode_phases"):
    _positive(c, f"rl.{f}")
  _check(r.group_size >= 2, "rl.group_size", "at least 2 (advantages compare within a group)",
         r.group_size)
  _check(r.prompts_per_step % r.updates_per_rollout == 0, "rl.updates_per_rollout",
         f"a divisor of rl.prompts_per_step={r.prompts_per_step}", r.updates_per_rollout)
  rows = r.prompts_per_step * r.group_size // r.updates_per_rollout
  _check(rows % r.micro_batch_size == 0, "rl.micro_batch_size",
         f"a divisor of the minibatch rows ({rows} = prompts_per_step * group_size / "
         "updates_per_rollout)", r.micro_batch_size)
  _check(not r.share_prompt_forward or r.micro_batch_size % r.group_size == 0,
         "rl.micro_batch_size", f"a multiple of rl.group_size={r.group_size} (whole groups) when "
         "rl.share_prompt_forward is on", r.micro_batch_size)
  from openvlthinker.rl import advantages, losses, shaping  # Registries (pure jnp).
  _choice(c, "rl.advantage", advantages.advantage_estimators())
  _choice(c, "rl.policy_loss", losses.policy_losses())
  _choice(c, "rl.advantage_task_key", ("task_type", "problem_type"))
  _choice(c, "rl.aggregation", losses.AGGREGATIONS)
  _fraction(c, "rl.clip_low", 0.0, 1.0)
  _fraction(c, "rl.clip_high", 0.0, 10.0)
  _check(r.dual_clip > 1.0 + r.clip_high, "rl.dual_clip",
         f"a number > 1 + rl.clip_high={r.clip_high}", r.dual_clip)
  _check(r.temperature > 0, "rl.temperature", "a number > 0", r.temperature)
  _fraction(c, "rl.top_p", 0.0, 1.0)
  _check(0.0 <= r.filter.low < r.filter.high <= 1.0, "rl.filter.low",
         f"0 <= low < rl.filter.high={r.filter.high}", r.filter.low)
  _positive(c, "rl.filter.max_tries")
  _choice(c, "rl.entropy.estimator", shaping.ENTROPY_ESTIMATORS)
  for task in taxonomy.TASK_TYPES:
    lo, hi = r.entropy.h_min[task], r.entropy.h_max[task]
    _check(0 <= lo <= hi, f"rl.entropy.h_min.{task}", f"0 <= h_min <= h_max={hi}", lo)
    th = tuple(r.length.thresholds[task])
    _check(len(th) == 4 and th[0] < th[1] <= th[2] < th[3], f"rl.length.thresholds.{task}",
           "(L_min, L_low, L_high, L_max) with L_min < L_low <= L_high < L_max", th)
  for f in ("every", "num_per_task", "batch_size", "max_new_tokens"):
    _positive(c, f"eval.{f}")
  _positive(c, "checkpoint.every")
  _positive(c, "checkpoint.keep")


def validate(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Runs every registered rule; raises ConfigError naming the first bad field."""
  for fn in _CHECKS:
    try:
      fn(c)
    except (KeyError, AttributeError) as e:
      raise ConfigError(f"config: missing field {e}") from None
  return c
