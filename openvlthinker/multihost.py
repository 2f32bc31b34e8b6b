"""Several JAX processes (multi-controller JAX: one per host of a TPU pod; several on one machine
in the tests): start-up, and moving rows between each process's host and the global arrays.

Rows. Every global batch of B rows is split between the n processes in process order: process
i holds rows `block(B)` = [i·B/n, (i+1)·B/n), reads them from its own data shards, decodes and
scores them. `global_rows` makes the global array from each process's block, `local_rows` brings a
process its block back, `all_rows` brings every row to every process (only for small per-row
arrays: rewards, lengths, flags). When the mesh puts each process's block on that process's own
devices (the usual layout: devices in process order along the data axes) no row crosses hosts;
otherwise (rows replicated over a mesh axis that spans hosts, say) the rows are gathered first,
which is correct, only slower.

With one process every function here is a plain local operation (no collective runs), so the
single-host code path is what it was. Every function that gathers is a collective: all processes
must call it, in the same order, with arrays of the same shape.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any

import jax
import numpy as np

# The environment of `launch/local_multiprocess.sh` (and of any CPU/GPU cluster without its own
# discovery): JAX reads the coordinator address itself, not the process count or id.
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def _env_int(name: str) -> int:
  value = os.environ.get(name, "")
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name}: expected an integer, got {value!r}") from None


def initialize(distributed: bool) -> bool:
  """Starts the multi-controller runtime, before anything touches a device; returns whether it
  started. `distributed` (the `--distributed` flag): on a TPU pod JAX finds the coordinator,
  process count and id itself; elsewhere they come from JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES and JAX_PROCESS_ID, which also start it without the flag."""
  kwargs = {}
  if ENV_NUM_PROCESSES in os.environ:
    missing = [v for v in (ENV_COORDINATOR, ENV_PROCESS_ID) if v not in os.environ]
    if missing:
      raise ValueError(f"{missing[0]}: expected it beside {ENV_NUM_PROCESSES} (the coordinator's "
                       "host:port, and this process's id in [0, JAX_NUM_PROCESSES))")
    kwargs = dict(coordinator_address=os.environ[ENV_COORDINATOR],
                  num_processes=_env_int(ENV_NUM_PROCESSES), process_id=_env_int(ENV_PROCESS_ID))
    if not 0 <= kwargs["process_id"] < kwargs["num_processes"]:
      raise ValueError(f"{ENV_PROCESS_ID}: expected an id in [0, {kwargs['num_processes']}), got "
                       f"{kwargs['process_id']}")
  elif not distributed:
    return False
  jax.distributed.initialize(**kwargs)
  return True


def count() -> int:
  return jax.process_count()


def index() -> int:
  return jax.process_index()


def is_primary() -> bool:
  """Process 0: the one that writes metrics, plots, reports and the run's files."""
  return jax.process_index() == 0


def block(rows: int) -> slice:
  """This process's rows of a global batch of `rows` rows."""
  n = jax.process_count()
  if rows % n:
    raise ValueError(f"a global batch of {rows} rows does not split evenly between {n} processes")
  per = rows // n
  return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


@functools.lru_cache(maxsize=256)
def _blocks_on_own_devices(sharding: jax.sharding.Sharding, shape: tuple[int, ...],
                           axis: int = 0) -> bool:
  """Whether `sharding` of `shape` puts exactly process p's block of `axis` on p's devices, for
  every p (then nothing needs to cross hosts). The same answer on every process."""
  n = jax.process_count()
  per = shape[axis] // n
  spans: dict[int, set[tuple[int, int]]] = {}
  for device, index in sharding.devices_indices_map(shape).items():
    start, stop, _ = index[axis].indices(shape[axis])
    spans.setdefault(device.process_index, set()).add((start, stop))
  for p, rows in spans.items():
    covered = np.zeros(shape[axis], bool)
    for start, stop in rows:
      covered[start:stop] = True
    if not (covered[p * per:(p + 1) * per].all() and covered.sum() == per):
      return False
  return True


def global_rows(sharding: jax.sharding.Sharding, local: np.ndarray, axis: int = 0) -> jax.Array:
  """The global array, laid out by `sharding`, whose rows (entries along `axis`) are every
  process's `local` rows in process order (each process passes its block; all the same shape)."""
  local = np.asarray(local)
  if jax.process_count() == 1:
    return jax.device_put(local, sharding)
  shape = list(local.shape)
  shape[axis] *= jax.process_count()
  shape = tuple(shape)
  if _blocks_on_own_devices(sharding, shape, axis):
    return jax.make_array_from_process_local_data(sharding, local, shape)
  full = concat(local, axis)
  return jax.make_array_from_callback(shape, sharding, lambda index: full[index])


def replicated(sharding: jax.sharding.Sharding, value) -> jax.Array:
  """A value every process holds alike (a count, a scalar) as a global array on `sharding`."""
  value = np.asarray(value)
  if jax.process_count() == 1:
    return jax.device_put(value, sharding)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's block of the rows of a global array, on the host (a scalar as it is)."""
  if x.ndim == 0:
    return np.asarray(all_rows(x))
  if jax.process_count() == 1 or x.is_fully_addressable:
    return np.asarray(x)[block(x.shape[0])]
  rows = block(x.shape[0])
  if not _blocks_on_own_devices(x.sharding, tuple(x.shape)):
    return all_rows(x)[rows]
  out = np.empty((rows.stop - rows.start,) + tuple(x.shape[1:]), x.dtype)
  for shard in x.addressable_shards:
    start, stop, _ = shard.index[0].indices(x.shape[0])
    out[(slice(start - rows.start, stop - rows.start),) + tuple(shard.index[1:])] = (
        np.asarray(shard.data))
  return out


def all_rows(x: jax.Array) -> np.ndarray:
  """Every row of a global array on every process (for small per-row arrays)."""
  if jax.process_count() == 1 or x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  if x.dtype == bool:  # gathered as bytes: not every collective backend reduces booleans
    return np.asarray(multihost_utils.process_allgather(x.astype(np.uint8), tiled=True)) > 0
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def concat(local: np.ndarray, axis: int = 0) -> np.ndarray:
  """Every process's host rows (the same shape on each), concatenated in process order along
  `axis`."""
  local = np.asarray(local)
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  wire = local.astype(np.uint8) if local.dtype == bool else local
  stacked = np.asarray(multihost_utils.process_allgather(wire)).astype(local.dtype)  # [n, ...]
  return np.concatenate(list(stacked), axis=axis)


def gather_tree(tree: Any) -> Any:
  """`concat` of every leaf of a pytree of host row arrays (None leaves stay None)."""
  if jax.process_count() == 1:
    return tree
  return jax.tree.map(concat, tree)


def allgather_json(value: Any) -> list[Any]:
  """[every process's `value`] in process order, for small JSON-able values (data-iterator
  states)."""
  if jax.process_count() == 1:
    return [value]
  data = np.frombuffer(json.dumps(value).encode(), np.uint8)
  sizes = concat(np.asarray([data.size], np.int64))
  # Padded to a power of two: a gather compiles once per shape, and states vary in length.
  padded = np.zeros(1 << int(sizes.max() - 1).bit_length(), np.uint8)
  padded[:data.size] = data
  rows = concat(padded[None])
  return [json.loads(bytes(row[:size]).decode()) for row, size in zip(rows, sizes)]


def any_process(flag: bool) -> bool:
  """Whether `flag` is true on any process (a SIGTERM one host received, say)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(concat(np.asarray([flag], bool)).any())


def max_over_processes(value):
  """The largest `value` (an int, or a tuple of ints taken entry by entry) of all processes:
  shapes that must agree (a prompt bucket, a packing's sizes)."""
  if jax.process_count() == 1:
    return value
  values = concat(np.asarray(value, np.int64).reshape(1, -1)).max(axis=0)
  return tuple(int(v) for v in values) if isinstance(value, tuple) else int(values[0])


def first_error(message: str | None) -> str | None:
  """The first process's error message (in process order) when any process has one; lets every
  process stop on an error only one of them met (the workdir lock, say) instead of the others
  waiting in their next collective."""
  if jax.process_count() == 1:
    return message
  return next((m for m in allgather_json(message or "") if m), None)
