"""HF checkpoint ↔ our parameters, for any family that lists `mapping.Rule`s.

`load_state` places every tensor straight into its sharding on the mesh: each device's block is
assembled on the host from at most one HF tensor at a time (one layer of a stacked parameter at
a time), reading only the block where the rule's hook allows it. `export_tensors` goes back: one
parameter (one layer of a stacked one) on the host at a time, in HF's layout.

A rule's per-layer path (`decoder.blocks.{0}.attn.q`) lands on its own parameter when the model
keeps a list of layers, or on one index of the leading axis of the stacked parameter
(`decoder.blocks.attn.q`) when it scans them; the number dropped from the path is that index.
"""
from __future__ import annotations

import re
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from openvlthinker.models.hf import mapping
from openvlthinker.models.hf.mapping import Rule
from openvlthinker.models.hf.safetensors_io import CheckpointReader, HFCheckpointError

_SHOWN = 5  # names listed in an error before "…"

# Hooks under which a block of our parameter is a block of the HF tensor: how our index maps to
# HF's. Any other hook reads the whole HF tensor (once per parameter, or per layer).
_SLICEABLE = {
    mapping.same: lambda index: index,
    mapping.norm_to_ours: lambda index: index,  # elementwise
    mapping.transpose: lambda index: index[::-1],
}


def _path(keys: Sequence[Any]) -> str:
  return ".".join(str(k) for k in keys)


def _names(items: Sequence[str]) -> str:
  shown = ", ".join(items[:_SHOWN])
  return shown + (f", … ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else "")


def _at(layer: int | None) -> str:
  return "" if layer is None else f" layer {layer}"


def _resolve(path: str, params: dict[str, Any]) -> tuple[str, int | None] | None:
  """(our parameter, layer index or None) for a rule's per-layer `path`: the path itself, or the
  stacked parameter named by the path without one of its numbers."""
  if path in params:
    return path, None
  parts = path.split(".")
  for i, part in enumerate(parts):
    if part.isdigit():
      stacked = ".".join(parts[:i] + parts[i + 1:])
      if stacked in params:
        return stacked, int(part)
  return None


def _work_dtype(hf: np.dtype, ours: np.dtype) -> np.dtype:
  """The dtype hooks run in: the wider float of the two (a bfloat16 norm gain becomes a float32
  scale without rounding w - 1 in bfloat16)."""
  if np.issubdtype(hf, np.floating) or hf.kind == "V":  # ml_dtypes floats are kind "V"
    return hf if hf.itemsize >= ours.itemsize else ours
  return hf


class _Layer:
  """One HF tensor filling our parameter (or one layer of it): gives blocks in our layout."""

  def __init__(self, reader, name: str, rule: Rule, cfg: Any, shape: tuple[int, ...],
               dtype: np.dtype, where: str):
    self.reader, self.name, self.rule, self.cfg = reader, name, rule, cfg
    self.shape, self.dtype, self.where = shape, dtype, where
    self.work = _work_dtype(np.dtype(reader.dtype(name)), dtype)
    self.index_map = _SLICEABLE.get(rule.to_ours)
    self.whole = None  # the converted tensor, for hooks that need all of it
    if self.index_map is not None:  # The shape is known before reading: check it first.
      hf_shape = tuple(reader.shape(name))
      # These index maps are their own inverses, and map a shape as they map an index.
      if hf_shape != tuple(self.index_map(shape)):
        self._mismatch(hf_shape, self.index_map(hf_shape))

  def _mismatch(self, hf_shape, converted):
    raise HFCheckpointError(
        f"load_state: HF tensor {self.name} of shape {tuple(hf_shape)} becomes "
        f"{tuple(converted)} for our {self.where}, which has shape {self.shape}")

  def block(self, index: tuple[slice, ...]) -> np.ndarray:
    if self.index_map is not None:
      x = self.reader.read_slice(self.name, self.index_map(index), dtype=self.work)
      return np.asarray(self.rule.to_ours(x, self.cfg)).astype(self.dtype, copy=False)
    if self.whole is None:
      x = self.reader.read(self.name, dtype=self.work)
      hf_shape = x.shape
      x = np.asarray(self.rule.to_ours(x, self.cfg))
      if x.shape != self.shape:
        self._mismatch(hf_shape, x.shape)
      self.whole = x.astype(self.dtype, copy=False)
    return self.whole[index]


def _key(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def _place(shape: tuple[int, ...], dtype: np.dtype, sharding: jax.sharding.Sharding,
           sources: dict[int | None, tuple[str, Rule]], reader, cfg, path: str) -> jax.Array:
  """Our parameter as a global array with `sharding`, built from its HF tensor(s): every block
  this process's devices hold is filled on the host one source tensor at a time."""
  blocks = {}
  for index in sharding.addressable_devices_indices_map(shape).values():
    key = _key(index, shape)
    blocks.setdefault(key, tuple(slice(a, b) for a, b in key))
  buffers = {key: np.empty([b.stop - b.start for b in index], dtype)
             for key, index in blocks.items()}
  for layer, (name, rule) in sorted(sources.items(), key=lambda s: -1 if s[0] is None else s[0]):
    layer_shape = shape if layer is None else shape[1:]
    source = _Layer(reader, name, rule, cfg, layer_shape, dtype, path + _at(layer))
    for key, index in blocks.items():
      if layer is None:
        buffers[key][...] = source.block(index)
      elif index[0].start <= layer < index[0].stop:
        buffers[key][layer - index[0].start] = source.block(index[1:])
    del source  # Its whole tensor, if any, goes before the next one is read.
  return jax.make_array_from_callback(shape, sharding, lambda index: buffers[_key(index, shape)])


def load_state(abstract_state: nnx.State, shardings, rules: Sequence[Rule],
               reader: CheckpointReader, cfg: Any, *, ignore: Sequence[str] = ()) -> nnx.State:
  """Our parameters from an HF checkpoint, each created in its target sharding.

  abstract_state: `nnx.state` of `nnx.eval_shape(...)` of the model (every leaf is filled: pass
  `nnx.state(model, nnx.Param)` to leave other variables out); shardings: the matching tree of
  `NamedSharding`s (`sharding.state_shardings`), or None for the default device. `ignore`:
  regexes (full match) of HF tensors that are expected to be left unused (a tied lm_head).
  Every other HF tensor must map to a parameter and every parameter (every layer of a stacked
  one) must be filled, else one error lists what is left over on both sides.
  """
  flat = list(nnx.to_flat_state(abstract_state))
  params = {_path(keys): v for keys, v in flat}
  targets = {}
  if shardings is not None:
    for keys, s in nnx.to_flat_state(shardings):
      targets[_path(keys)] = s.get_value() if isinstance(s, nnx.Variable) else s
  where = getattr(reader, "directory", "the checkpoint")

  sources: dict[str, dict[int | None, tuple[str, Rule]]] = {}
  unmapped = []
  for name in reader.names():
    found = mapping.find_rule(rules, name)
    if found is None:
      if not any(re.fullmatch(pattern, name) for pattern in ignore):
        unmapped.append(name)
      continue
    rule, path = found
    resolved = _resolve(path, params)
    if resolved is None:
      unmapped.append(f"{name} (→ {path})")
      continue
    param, layer = resolved
    if layer is not None and layer >= params[param].shape[0]:
      raise HFCheckpointError(f"load_state: HF tensor {name} fills layer {layer} of our {param}, "
                              f"which has {params[param].shape[0]} layers")
    slot = sources.setdefault(param, {})
    # Taken already, or a parameter filled whole by one tensor and by layers by others.
    if layer in slot or (slot and (layer is None) != (None in slot)):
      other = slot.get(layer, next(iter(slot.values())))[0]
      raise HFCheckpointError(f"load_state: HF tensors {other} and {name} both fill our "
                              f"{param}{_at(layer)}")
    slot[layer] = (name, rule)

  unfilled = []
  for path, v in params.items():
    slot = sources.get(path)
    if not slot:
      unfilled.append(path)
    elif None not in slot:
      unfilled += [f"{path}{_at(i)}" for i in range(v.shape[0]) if i not in slot]
  if unmapped or unfilled:
    parts = []
    if unmapped:
      parts.append(f"{len(unmapped)} HF tensor(s) that no rule maps: {_names(unmapped)}")
    if unfilled:
      parts.append(f"{len(unfilled)} of our parameter(s) that no HF tensor fills: "
                   f"{_names(unfilled)}")
    raise HFCheckpointError(f"load_state from {where}: " + "; ".join(parts))

  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  out = []
  for keys, v in flat:
    path = _path(keys)
    array = _place(tuple(v.shape), np.dtype(v.dtype), targets.get(path, default), sources[path],
                   reader, cfg, path)
    out.append((keys, v.replace(array)))
  return nnx.from_flat_state(out)


def _hf_names(path: str, ndim: int, rules: Sequence[Rule]):
  """(rule, HF name) for our `path`, or for a stacked one a function of the layer; None when no
  rule maps it."""
  for rule in rules:
    name = rule.hf_name(path)
    if name is not None:
      return rule, name
  if ndim == 0:
    return None
  parts = path.split(".")
  for i in range(len(parts) + 1):
    at = lambda layer, i=i: ".".join(parts[:i] + [str(layer)] + parts[i:])
    for rule in rules:
      if rule.hf_name(at(0)) is not None:
        return rule, lambda layer, rule=rule, at=at: rule.hf_name(at(layer))
  return None


@jax.jit
def _layer_of(x: jax.Array, layer: jax.Array) -> jax.Array:
  return jax.lax.dynamic_index_in_dim(x, layer, keepdims=False)


def _to_host(x: jax.Array) -> np.ndarray:
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def export_tensors(state: nnx.State, rules: Sequence[Rule], cfg: Any, *,
                   dtype=None) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, numpy array in HF's layout) for every leaf of `state`, cast to `dtype` when
  given (e.g. "bfloat16" to publish); stacked parameters come out one layer at a time.

  One parameter (one layer) is on the host at a time. Arrays may be sharded over a mesh; on
  several processes every process must run the iteration (it gathers collectively) and one of
  them writes. Raises before yielding anything when a parameter has no rule.
  """
  plan, unmapped = [], []
  for keys, v in nnx.to_flat_state(state):
    path = _path(keys)
    found = _hf_names(path, np.ndim(v.get_value()), rules)
    if found is None:
      unmapped.append(path)
    else:
      plan.append((v, *found))
  if unmapped:
    raise HFCheckpointError(f"export_tensors: {len(unmapped)} of our parameter(s) that no rule "
                            f"maps: {_names(unmapped)}")

  def out(rule: Rule, x: jax.Array) -> np.ndarray:
    y = np.asarray(rule.to_hf(_to_host(x), cfg))
    return y if dtype is None else y.astype(dtype, copy=False)

  for v, rule, name in plan:
    x = v.get_value()
    if isinstance(name, str):
      yield name, out(rule, x)
    else:
      for layer in range(x.shape[0]):
        yield name(layer), out(rule, _layer_of(x, np.int32(layer)))
