"""The config schema (every field with its default) and its validation.

`configs/*.py` start from `base_config()` and change values; because the schema is locked, a
misspelled field is an error, and `validate` checks values before anything compiles, raising a
`ConfigError` whose one-line message names the field and what was expected.
"""
from __future__ import annotations

import math
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


def validate(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Runs every registered rule; raises ConfigError naming the first bad field."""
  for fn in _CHECKS:
    try:
      fn(c)
    except (KeyError, AttributeError) as e:
      raise ConfigError(f"config: missing field {e}") from None
  return c


def num_devices_for(c: ml_collections.ConfigDict) -> int:
  sizes = [c.mesh[a] for a in sharding.MESH_AXES]
  return math.prod(s for s in sizes if s > 0)
