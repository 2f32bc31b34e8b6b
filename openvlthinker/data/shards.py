"""Logical data shards: what each JAX process reads, independent of how many processes there are.

The training stream is cut into S = `data.shards` shards (record i of the mixture goes to shard
i mod S; 0 means one shard per process). A global batch is the S shards' batches in shard order,
B/S rows each, and process p reads the contiguous shards [p·S/n, (p+1)·S/n), so its rows are its
block of the global batch (`multihost.block`). The rollout filters each shard's groups on its own
and an optimizer minibatch takes the same slice of every shard, so what a run computes depends on
S, not on the number of processes: a run on one host with `data.shards=2` takes the same global
batches and steps as a run on two, and a run resumed on another number of hosts continues the same
stream. The data-iterator state is every shard's state (gathered from all processes when saved).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import numpy as np

from openvlthinker import multihost
from openvlthinker.data import pipeline


@dataclasses.dataclass(frozen=True)
class ShardLayout:
  """count: S shards in all; first: this process's first shard; owned: shards per process."""
  count: int
  first: int
  owned: int

  @classmethod
  def for_processes(cls, shards: int, processes: int | None = None,
                    process: int | None = None) -> ShardLayout:
    """`data.shards` (0 = one per process) over this run's processes."""
    n = jax.process_count() if processes is None else processes
    i = jax.process_index() if process is None else process
    count = shards or n
    if count % n:
      raise ValueError(f"data.shards: expected a multiple of the {n} processes (each reads whole "
                       f"shards; 0 = one per process), got {shards}")
    owned = count // n
    return cls(count=count, first=i * owned, owned=owned)

  def per_shard(self, global_batch: int, field: str) -> int:
    """Rows of each shard's batch in a global batch of `global_batch` (`field` names it)."""
    if global_batch % self.count:
      raise ValueError(f"{field}: expected a multiple of data.shards={self.count} (each shard "
                       f"gives an equal part of the global batch), got {global_batch}")
    return global_batch // self.count

  @property
  def indices(self) -> range:
    return range(self.first, self.first + self.owned)


def concat_prompt_batches(batches: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """RL prompt batches (`pipeline.collate_rl`) of one process's shards as one: rows in shard
  order, prompts right-padded to the widest bucket among them."""
  if len(batches) == 1:
    return batches[0]
  width = max(b["prompt_tokens"].shape[1] for b in batches)
  pad = lambda x: np.pad(x, ((0, 0), (0, width - x.shape[1])))
  out = {k: np.concatenate([pad(b[k]) if k in ("prompt_tokens", "prompt_mask") else b[k]
                            for b in batches]) for k in batches[0] if k != "num_dropped"}
  out["num_dropped"] = np.asarray(sum(int(b["num_dropped"]) for b in batches), np.int32)
  return out


def concat_sft_batches(batches: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """SFT batches (`pipeline.collate_sft`, all seq_len wide) of one process's shards as one."""
  if len(batches) == 1:
    return batches[0]
  out = {k: np.concatenate([b[k] for b in batches]) for k in batches[0] if k != "num_dropped"}
  out["num_dropped"] = np.asarray(sum(int(b["num_dropped"]) for b in batches), np.int32)
  return out


class ShardedBatches:
  """This process's batches: one grain iterator per owned shard, their batches joined by
  `combine`. `get_state()` is every shard's state (a collective: all processes call it at the
  same step, when a checkpoint is saved); `set_state()` takes this process's shards from it."""

  def __init__(self, layout: ShardLayout, make_dataset: Callable[[int, int], object],
               combine: Callable[[Sequence[dict]], dict]):
    self.layout, self._combine = layout, combine
    self._iters = [iter(make_dataset(s, layout.count)) for s in layout.indices]

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return self._combine([next(it) for it in self._iters])

  def get_state(self) -> dict:
    mine = [it.get_state() for it in self._iters]
    return {"shards": [s for states in multihost.allgather_json(mine) for s in states]}

  def set_state(self, state: dict) -> None:
    shards = state.get("shards") if isinstance(state, dict) else None
    if shards is None and self.layout.count == 1:
      shards = [state]  # A checkpoint from before data shards: one iterator's own state.
    if shards is None or len(shards) != self.layout.count:
      found = "no shard states" if shards is None else f"{len(shards)} shard states"
      raise ValueError(f"data.shards: the checkpoint's data iterator holds {found}, expected "
                       f"{self.layout.count} (resume with the data.shards of the run that wrote "
                       "it)")
    for it, s in zip(self._iters, self.layout.indices):
      it.set_state(shards[s])


def sft_batches(config: pipeline.DataConfig, tokenizer, layout: ShardLayout) -> ShardedBatches:
  """This process's SFT batches; `config.batch_size` is one shard's."""
  return ShardedBatches(layout, lambda s, n: pipeline.sft_dataset(
      config, tokenizer, shard_index=s, shard_count=n), concat_sft_batches)


def rl_batches(config: pipeline.DataConfig, tokenizer, layout: ShardLayout) -> ShardedBatches:
  """This process's RL prompt batches; `config.batch_size` is one shard's prompts."""
  return ShardedBatches(layout, lambda s, n: pipeline.rl_dataset(
      config, tokenizer, shard_index=s, shard_count=n), concat_prompt_batches)
