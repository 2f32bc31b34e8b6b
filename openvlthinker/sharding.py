"""Meshes, logical-axis rules and sharding helpers.

Every parameter carries logical axis names in its `logical_axes` metadata and key activations are
constrained by logical names too. One rule table (from the config) maps logical names to mesh axes
(`data`, `fsdp`, `tensor`). A mesh axis that does not divide a dimension is dropped for that
dimension (so tiny test shapes still run on any mesh), never silently mis-sharded.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from openvlthinker import multihost

MESH_AXES = ("data", "fsdp", "tensor")

# FSDP over `fsdp`, tensor parallelism over heads, MLP and vocabulary on `tensor`; batch over both
# data-parallel axes. Activations keep `embed` unsharded (FSDP gathers weights, not activations).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("cache_batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

LogicalAxes = Sequence[str | None]


def make_mesh(shape: dict[str, int] | Sequence[int], devices=None) -> Mesh:
  """Builds a (data, fsdp, tensor) mesh; one entry may be -1 to take the remaining devices."""
  sizes = [shape[a] for a in MESH_AXES] if isinstance(shape, dict) else list(shape)
  if len(sizes) != len(MESH_AXES):
    raise ValueError(f"mesh: expected sizes for {MESH_AXES}, got {sizes}")
  devices = np.asarray(jax.devices() if devices is None else devices)
  n = devices.size
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {sizes}")
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes) or n % known:
    raise ValueError(f"mesh: sizes {dict(zip(MESH_AXES, sizes))} do not fit {n} devices")
  sizes = [n // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != n:
    raise ValueError(f"mesh: sizes {dict(zip(MESH_AXES, sizes))} use {math.prod(sizes)} of "
                     f"{n} devices; set one axis to -1 to fill the rest")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices.reshape(-1).tolist())


@dataclasses.dataclass(frozen=True)
class Sharder:
  """A mesh plus the logical→mesh rule table. Hashable, so modules may hold it as static data.

  With `mesh=None` every helper is a no-op, so the same model code runs unsharded.
  """
  mesh: Mesh | None = None
  rules: tuple[tuple[str, Any], ...] = DEFAULT_RULES

  def spec(self, axes: LogicalAxes, shape: Sequence[int] | None = None) -> P:
    """The PartitionSpec for logical `axes`; mesh axes that do not divide `shape` are dropped."""
    table = dict(self.rules)
    used: set[str] = set()
    out = []
    for i, name in enumerate(axes):
      target = table.get(name) if name is not None else None
      mesh_axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
      kept = []
      size = 1
      for m in mesh_axes:
        if self.mesh is None or m in used:
          continue
        msize = self.mesh.shape[m]
        if shape is not None and shape[i] % (size * msize):
          continue
        kept.append(m)
        size *= msize
      used.update(kept)
      out.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
    return P(*out)

  def sharding(self, axes: LogicalAxes, shape: Sequence[int] | None = None) -> NamedSharding:
    if self.mesh is None:
      raise ValueError("Sharder.sharding needs a mesh")
    return NamedSharding(self.mesh, self.spec(axes, shape))

  def replicated(self) -> NamedSharding:
    """A full copy on every device of the mesh (scalars and small statistics)."""
    if self.mesh is None:
      raise ValueError("Sharder.replicated needs a mesh")
    return NamedSharding(self.mesh, P())

  def shards(self, name: str, n: int | None = None) -> int:
    """How many ways the rule table splits a dimension (of size `n`: mesh axes that do not
    divide it are dropped, as `spec` does) on logical axis `name`; 1 without a mesh."""
    if self.mesh is None:
      return 1
    spec = self.spec((name,), None if n is None else (n,))[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
    return math.prod(self.mesh.shape[a] for a in axes)

  def put_batch(self, x) -> jax.Array:
    """This process's rows of a batch (with one process: all of them) onto the mesh as the
    global batch, rows over the data-parallel axes (`multihost.global_rows`)."""
    x = np.asarray(x)
    shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return multihost.global_rows(batch_sharding(self, x.ndim, shape), x)

  def constrain(self, x: jax.Array, axes: LogicalAxes) -> jax.Array:
    """with_sharding_constraint by logical names (a no-op without a mesh)."""
    if self.mesh is None:
      return x
    return jax.lax.with_sharding_constraint(x, self.sharding(axes, x.shape))



def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def state_shardings(state: nnx.State, sharder: Sharder):
  """NamedShardings for every leaf of an (abstract) nnx.State, from its logical axes."""
  def one(v):
    names = v.get_metadata().get("logical_axes") or (None,) * len(v.shape)
    return sharder.sharding(names, v.shape)
  return jax.tree.map(one, state, is_leaf=_is_variable)


def batch_sharding(sharder: Sharder, ndim: int, shape: Sequence[int] | None = None) -> NamedSharding:
  """Sharding for a batch-major array: leading axis over the data-parallel axes."""
  return sharder.sharding(("batch",) + (None,) * (ndim - 1), shape)
