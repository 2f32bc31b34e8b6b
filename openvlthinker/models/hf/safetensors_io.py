"""Hugging Face safetensors checkpoints on disk: a reader for one file or a sharded set with an
index, and a streaming writer that produces what transformers' `save_pretrained` writes.

Only the `safetensors` numpy API and numpy are used (no torch). bfloat16 and float8 tensors are
numpy arrays of the `ml_dtypes` types; where safetensors' numpy API cannot produce one, the
tensor's bytes are read through the file header's offsets instead. Config and tokenizer files are
the caller's: `write_checkpoint` writes only the weights.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import types
from typing import Any, Iterable, Mapping

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from openvlthinker.errors import RunError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
DEFAULT_METADATA = types.MappingProxyType({"format": "pt"})  # what transformers writes

# safetensors dtype names → numpy dtypes (importing ml_dtypes also lets numpy resolve
# "bfloat16" by name, which is what safetensors' numpy API asks it for).
DTYPES = {
    "BOOL": np.dtype(bool), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16), "I16": np.dtype(np.int16), "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32), "U64": np.dtype(np.uint64), "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16), "F32": np.dtype(np.float32), "F64": np.dtype(np.float64),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}


class HFCheckpointError(RunError):
  """An HF checkpoint that is missing, incomplete or does not fit the model; one line that names
  the directory, file or tensor."""


class _File:
  """One .safetensors file: its parsed header (names, dtypes, shapes, byte offsets) and a lazily
  opened safetensors handle."""

  def __init__(self, path: str):
    self.path = path
    try:
      with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError) as e:
      raise HFCheckpointError(f"safetensors file {path} is unreadable: {e}") from None
    self.data_start = 8 + size
    header.pop("__metadata__", None)
    self.tensors: dict[str, dict[str, Any]] = header
    self._handle = None

  def dtype(self, name: str) -> np.dtype:
    code = self.tensors[name]["dtype"]
    if code not in DTYPES:
      raise HFCheckpointError(f"tensor {name} in {self.path} has dtype {code}, which numpy "
                              f"cannot hold (known: {', '.join(DTYPES)})")
    return DTYPES[code]

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.tensors[name]["shape"])

  def read(self, name: str, index: tuple[slice, ...] | None) -> np.ndarray:
    """The tensor, or only the block `index` (one slice per axis, step 1) of it."""
    try:
      if self._handle is None:
        self._handle = safe_open(self.path, framework="numpy")
      if index is None:
        return self._handle.get_tensor(name)
      return self._handle.get_slice(name)[index]
    except TypeError:  # This safetensors version's numpy API does not know the dtype.
      return self.read_raw(name, index)

  def read_raw(self, name: str, index: tuple[slice, ...] | None) -> np.ndarray:
    """`read` through the header's byte offsets: a memory map, so a block reads only the pages
    it touches."""
    dtype, shape = self.dtype(name), self.shape(name)
    begin, end = self.tensors[name]["data_offsets"]
    if end - begin != dtype.itemsize * int(np.prod(shape)):
      raise HFCheckpointError(f"tensor {name} in {self.path}: {end - begin} bytes for shape "
                              f"{shape} of {dtype}")
    if end == begin:
      whole = np.zeros(shape, dtype)
    else:
      whole = np.memmap(self.path, dtype=dtype, mode="r", offset=self.data_start + begin,
                        shape=(int(np.prod(shape)),)).reshape(shape)
    return np.array(whole if index is None else whole[index])

  def close(self):
    self._handle = None


_Block = tuple[tuple[slice, ...], tuple[int, ...]]


def _as_block(index: Any, shape: tuple[int, ...]) -> _Block | None:
  """(slices with step 1, axes indexed by an integer) for `index`, or None when it is not such
  a block (the caller then reads the whole tensor and indexes it)."""
  index = index if isinstance(index, tuple) else (index,)
  if len(index) > len(shape):
    return None
  slices, squeeze = [], []
  for axis, item in enumerate(index):
    if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
      i = int(item) + (shape[axis] if item < 0 else 0)
      if not 0 <= i < shape[axis]:
        return None
      slices.append(slice(i, i + 1))
      squeeze.append(axis)
    elif isinstance(item, slice) and item.step in (None, 1):
      start, stop, _ = item.indices(shape[axis])
      slices.append(slice(start, max(start, stop)))
    else:
      return None
  slices += [slice(0, n) for n in shape[len(index):]]
  return tuple(slices), tuple(squeeze)


class CheckpointReader:
  """A directory holding `model.safetensors`, or shards listed by `model.safetensors.index.json`
  (its `weight_map`: tensor name → shard file), plus `config.json`.

  Headers are read when it opens (names, dtypes and shapes cost no tensor reads); tensors are
  read one at a time, or a block of one with `read_slice`.
  """

  def __init__(self, directory: str | os.PathLike):
    self.directory = os.fspath(directory)
    if not os.path.isdir(self.directory):
      raise HFCheckpointError(f"HF checkpoint {self.directory}: no such directory")
    index_path = os.path.join(self.directory, INDEX_FILE)
    if os.path.isfile(index_path):
      try:
        with open(index_path) as f:
          weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict):
          raise ValueError("weight_map is not an object")
      except (OSError, ValueError, KeyError, TypeError) as e:
        raise HFCheckpointError(f"HF checkpoint index {index_path} is unreadable: {e!r}") from None
      for shard in sorted(set(weight_map.values())):
        if not os.path.isfile(os.path.join(self.directory, shard)):
          raise HFCheckpointError(f"HF checkpoint index {index_path} names shard {shard}, which "
                                  f"is missing")
      files = {shard: _File(os.path.join(self.directory, shard))
               for shard in sorted(set(weight_map.values()))}
      self._where = {name: files[shard] for name, shard in weight_map.items()}
    elif os.path.isfile(os.path.join(self.directory, SINGLE_FILE)):
      single = _File(os.path.join(self.directory, SINGLE_FILE))
      self._where = {name: single for name in single.tensors}
    else:
      raise HFCheckpointError(f"HF checkpoint {self.directory}: no {SINGLE_FILE} or "
                              f"{INDEX_FILE} in it")

  def names(self) -> list[str]:
    """Every tensor name, sorted."""
    return sorted(self._where)

  def _file(self, name: str) -> _File:
    file = self._where.get(name)
    if file is None:
      raise HFCheckpointError(f"HF checkpoint {self.directory} has no tensor {name}")
    if name not in file.tensors:
      raise HFCheckpointError(f"tensor {name} is not in {file.path}, the shard that "
                              f"{INDEX_FILE} names for it")
    return file

  def shape(self, name: str) -> tuple[int, ...]:
    return self._file(name).shape(name)

  def dtype(self, name: str) -> np.dtype:
    return self._file(name).dtype(name)

  def read(self, name: str, dtype=None) -> np.ndarray:
    """The whole tensor, cast to `dtype` when given."""
    x = self._file(name).read(name, None)
    return x if dtype is None else x.astype(dtype, copy=False)

  def read_slice(self, name: str, index: Any, dtype=None) -> np.ndarray:
    """`read(name)[index]`, reading only that block when `index` is integers and step-1 slices
    (what `jax.make_array_from_callback` asks for); any other index reads the whole tensor."""
    file = self._file(name)
    shape = file.shape(name)
    block = _as_block(index, shape)
    if block is None:
      x = file.read(name, None)[index]
    elif not shape:
      x = file.read(name, None)
    else:
      slices, squeeze = block
      x = file.read(name, slices)
      if squeeze:
        x = x.reshape([n for axis, n in enumerate(x.shape) if axis not in squeeze])
    return x if dtype is None else x.astype(dtype, copy=False)

  def config(self) -> dict[str, Any]:
    """config.json as a dict."""
    path = os.path.join(self.directory, CONFIG_FILE)
    try:
      with open(path) as f:
        return json.load(f)
    except FileNotFoundError:
      raise HFCheckpointError(f"HF checkpoint {self.directory}: no {CONFIG_FILE}") from None
    except (OSError, ValueError) as e:
      raise HFCheckpointError(f"HF checkpoint config {path} is unreadable: {e}") from None

  def close(self):
    for file in set(self._where.values()):
      file.close()

  def __enter__(self) -> CheckpointReader:
    return self

  def __exit__(self, *exc):
    self.close()


def _fsync(path: str):
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def write_checkpoint(directory: str | os.PathLike, tensors: Iterable[tuple[str, np.ndarray]], *,
                     max_shard_bytes: int, metadata: Mapping[str, str] = DEFAULT_METADATA,
                     overwrite: bool = False) -> dict[str, str]:
  """Writes (name, array) pairs as transformers' `save_pretrained` does: `model.safetensors`
  when they fit one shard, else `model-0000i-of-0000N.safetensors` plus
  `model.safetensors.index.json` (weight_map, metadata.total_size in bytes).

  Tensors are taken from the iterable in order and a shard is written as soon as the next tensor
  would take it past `max_shard_bytes` (a larger tensor gets a shard of its own), so at most one
  shard's tensors are held. Everything is written into a temporary sibling directory that is
  renamed to `directory` at the end: a crash leaves either no checkpoint or a complete one. An
  existing non-empty `directory` is an error unless `overwrite`, which replaces it whole (write
  config.json and the tokenizer files after this call). Returns the weight_map.

  On several processes, call it on one of them (`export_tensors` must run on all).
  """
  directory = os.path.abspath(os.fspath(directory))
  if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) \
      or max_shard_bytes <= 0:
    raise ValueError(f"write_checkpoint: max_shard_bytes: expected a positive integer, got "
                     f"{max_shard_bytes!r}")
  exists = os.path.isdir(directory)
  if os.path.exists(directory) and not exists:
    raise HFCheckpointError(f"write_checkpoint: {directory} exists and is not a directory")
  if exists and os.listdir(directory) and not overwrite:
    raise HFCheckpointError(f"write_checkpoint: {directory} exists and is not empty; pass "
                            f"overwrite=True to replace it")
  parent, base = os.path.split(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
  try:
    shards: list[list[str]] = []
    current: dict[str, np.ndarray] = {}
    current_bytes = total_bytes = total_elements = 0

    def flush():
      path = os.path.join(tmp, f"shard-{len(shards):05d}")
      save_file(current, path, metadata=dict(metadata))
      _fsync(path)
      shards.append(list(current))

    seen = set()
    for name, array in tensors:
      if not isinstance(name, str) or name in seen:
        raise ValueError(f"write_checkpoint: tensor name {name!r} is "
                         f"{'repeated' if name in seen else 'not a string'}")
      seen.add(name)
      array = np.ascontiguousarray(np.asarray(array))
      if current and current_bytes + array.nbytes > max_shard_bytes:
        flush()
        current, current_bytes = {}, 0  # A new dict: the written shard's arrays are released.
      current[name] = array
      current_bytes += array.nbytes
      total_bytes += array.nbytes
      total_elements += array.size
      del array
    if not current:
      raise ValueError("write_checkpoint: no tensors to write")
    flush()
    current = {}

    n = len(shards)
    weight_map = {}
    for i, names in enumerate(shards):
      final = SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
      os.rename(os.path.join(tmp, f"shard-{i:05d}"), os.path.join(tmp, final))
      weight_map.update((name, final) for name in names)
    if n > 1:
      index = {"metadata": {"total_size": total_bytes, "total_parameters": total_elements},
               "weight_map": weight_map}
      with open(os.path.join(tmp, INDEX_FILE), "w", encoding="utf-8") as f:
        f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync(tmp)
    if exists and os.listdir(directory):
      # Move the old checkpoint aside first: at any moment `directory` is the old one, absent,
      # or the new one, never a mix.
      old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
      os.rename(directory, os.path.join(old, base))
      os.rename(tmp, directory)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, directory)  # rename(2) replaces an empty directory
    _fsync(parent)
    return weight_map
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
