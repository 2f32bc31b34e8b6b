"""Decoding that stops paying for finished rows: the sampler's decode loops as separate jitted
calls, with the prompt groups whose rows are all done dropped from the live batch as they finish.

A loop ends at its phase's last step (the response cache must grow), when every row is done, or
as soon as the groups with a row still running fit the next smaller live bucket: the batch
shrinks when the rows do, not only at phase ends (at benchmarks/length_mix.py's mix, compacting
only at the 4 phase ends kept 0.62 of the decoded slots real; these exits keep 0.78).
`generate` runs the prefill and the first loop in one call (`_begin`, all B rows). At each
boundary the host reads the step and which groups are live (`live_groups`, the boundary's one
read of the rows); on a drop, `_compact` scatters the current rows' results into the full
[B, Lr] outputs and gathers the live groups (loop state, response cache and their prompts'
prefix rows: `take_cache_rows` of the model contract) into the smallest bucket that holds them;
`_decode` grows the cache for the phase and runs the next loop; `_finish` scatters the last rows
and builds the SamplerOutput.

Whole prompt groups, so the prefix cache stays one row per prompt. Buckets are few
(`live_buckets`: powers of two of groups, each filling the mesh's batch shards, then P), so a
batch compiles a loop per (phase, bucket) it meets and a gather per drop; the padding groups of
a bucket are marked done (they compute, are counted in `decoded_row_steps`, and are dropped when
scattered). Every row runs the per-row computation of `sampler._generate` with the same key and
cache contents (the `sampler` module docstring says when that gives the same bits).
"""
from __future__ import annotations

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from openvlthinker import multihost
from openvlthinker import sampler as sampler_lib
from openvlthinker.sharding import Sharder


def live_buckets(num_groups: int, group_size: int, shards: int = 1) -> tuple[int, ...]:
  """The live batch sizes, in prompt groups, that a batch of `num_groups` may shrink to,
  ascending: `num_groups` (the full batch) and, below it, powers of two rounded up to fill the
  `shards` batch shards evenly with at least 2 rows each (a shard of one row makes the model's
  matmuls matrix-vector products, which XLA:CPU sums in another order)."""
  unit = shards // math.gcd(shards, group_size)  # groups that fill the shards evenly
  least = -(-2 * shards // group_size)  # groups that give every shard 2 rows
  sizes, n = {num_groups}, 1
  while n < num_groups:
    sizes.add(-(-max(n, least) // unit) * unit)
    n *= 2
  return tuple(sorted(k for k in sizes if k <= num_groups))


def live_groups(done: jax.Array, group_size: int) -> np.ndarray:
  """The host read of a boundary: int[N] indices (ascending) of the groups of `group_size`
  consecutive rows of `done` bool[R] that still have a row running. Every process reads every
  row's flag (the rows of a global batch span all hosts) and so picks the same groups."""
  return np.flatnonzero(~multihost.all_rows(done).reshape(-1, group_size).all(axis=1))


@flax.struct.dataclass
class _Rows:
  """Per-row constants of the live batch (R rows)."""
  keys: jax.Array           # key[R]
  caps: jax.Array | None    # int32[R] length caps, or None
  origin: jax.Array         # int32[R] the row of the full batch; B for a padding row


@flax.struct.dataclass
class _Out:
  """The full batch's results, filled in as rows leave the live batch."""
  tokens: jax.Array     # int32[B, Lr]
  logprobs: jax.Array   # float32[B, Lr]
  entropies: jax.Array  # float32[B, Lr]
  lengths: jax.Array    # int32[B]


def _scatter(out: _Out, s, origin: jax.Array) -> _Out:
  """`out` with the live rows' results written at their rows (padding rows, origin B, dropped)."""
  put = lambda full, x: full.at[origin].set(x, mode="drop")
  return _Out(tokens=put(out.tokens, s.tokens), logprobs=put(out.logprobs, s.logprobs),
              entropies=put(out.entropies, s.entropies), lengths=put(out.lengths, s.lengths))


def _begin(state, tokens, mask, images, prompt_ids, rng, max_lengths, *, graphdef, config,
           sharder, group_size, end, exit_at):
  """The prefill and the first loop over all B rows (until step `end`, or until at most
  `exit_at` groups are live) → (loop state, rows, empty outputs, row steps, decode tables)."""
  model = nnx.merge(graphdef, state)
  s, keys, caps, tables = sampler_lib._start(model, tokens, mask, images, prompt_ids, rng,
                                             max_lengths, config, sharder, group_size)
  _, body = sampler_lib._steps(model, config, keys, caps, tables)
  s, row_steps = sampler_lib._phase(s, body, end, jnp.zeros((), jnp.int32),
                                    group_size=group_size, exit_at=exit_at)
  rows = lambda x: sampler_lib._rows(sharder, x)
  out = _Out(tokens=rows(jnp.full_like(s.tokens, config.pad_id)),
             logprobs=rows(jnp.zeros_like(s.logprobs)),
             entropies=rows(jnp.zeros_like(s.entropies)), lengths=rows(jnp.zeros_like(s.lengths)))
  b = s.done.shape[0]
  return s, _Rows(keys, caps, rows(jnp.arange(b, dtype=jnp.int32))), out, row_steps, tables


def _compact(state, s, rows: _Rows, out: _Out, groups, pad, *, graphdef, config, sharder,
             group_size):
  """The live batch of groups int32[N] (of the current live batch, in the order they will run)
  with pad bool[N] marking the bucket's padding → (s, rows, out), the leaving rows' results
  written to `out`."""
  del config
  model = nnx.merge(graphdef, state)
  out = _scatter(out, s, rows.origin)
  g = group_size
  index = (groups[:, None] * g + jnp.arange(g, dtype=groups.dtype)).reshape(-1)
  pad = jnp.repeat(pad, g)
  take = lambda x: sampler_lib._rows(sharder, x[index])
  s = sampler_lib._Loop(
      step=s.step, token=take(s.token), position=take(s.position), done=take(s.done) | pad,
      lengths=take(s.lengths), cache=model.take_cache_rows(s.cache, index, groups),
      tokens=take(s.tokens), logprobs=take(s.logprobs), entropies=take(s.entropies))
  rows = _Rows(keys=take(rows.keys), caps=None if rows.caps is None else take(rows.caps),
               origin=jnp.where(pad, out.lengths.shape[0], take(rows.origin)))
  return s, rows, out


def _decode(state, s, rows: _Rows, row_steps, tables, *, graphdef, config, sharder, group_size,
            end, exit_at):
  """One loop over the live batch with its response cache grown for the phase that ends at step
  `end` (unchanged inside it), until step `end`, every row done, or at most `exit_at` groups
  live → (s, row steps)."""
  del sharder
  model = nnx.merge(graphdef, state)
  _, body = sampler_lib._steps(model, config, rows.keys, rows.caps, tables)
  s = s.replace(cache=model.grow_cache(s.cache, end - 1))
  return sampler_lib._phase(s, body, end, row_steps, group_size=group_size, exit_at=exit_at)


def _finish(state, tokens, mask, s, rows: _Rows, out: _Out, row_steps, *, graphdef, config,
            sharder, group_size) -> sampler_lib.SamplerOutput:
  """The SamplerOutput, with the last live rows scattered into the full outputs."""
  del config
  model = nnx.merge(graphdef, state)
  return sampler_lib._output(model, tokens, mask, _scatter(out, s, rows.origin), group_size,
                             sharder, row_steps)


# The full outputs are donated to the calls that write them (in place). The loop state is not:
# the cache changes shape in a compaction and at a phase's start, so no output could reuse it.
# One loop compiles per (phase, bucket, cache size in: the phase's or the one before).
_LOOP = sampler_lib.STATIC + ("end", "exit_at")
_BEGIN = sampler_lib.RowJit(_begin, _LOOP)
_COMPACT = sampler_lib.RowJit(_compact, donate_argnames=("out",))
_DECODE = sampler_lib.RowJit(_decode, _LOOP)
_FINISH = sampler_lib.RowJit(_finish, donate_argnames=("out",))


def generate(state, tokens, mask, images, prompt_ids, max_lengths, rng, *, graphdef, config,
             sharder: Sharder, group_size: int) -> sampler_lib.SamplerOutput:
  """`sampler._generate`'s output, with finished groups compacted out as they finish. Arguments
  as `Sampler._prepare` returns them, then the key."""
  static = dict(graphdef=graphdef, config=config, sharder=sharder, group_size=group_size)
  begin, compact, decode, finish = (f.on(sharder) for f in (_BEGIN, _COMPACT, _DECODE, _FINISH))
  ends = sampler_lib.decode_phase_ends(config.max_new_tokens, config.decode_phases)
  # Buckets fill the rows' full split (a bucket is a multiple of it, so split that many ways).
  buckets = live_buckets(tokens.shape[0], group_size, sharder.shards("batch"))
  below = lambda size: max((k for k in buckets if k < size), default=0)
  size = buckets[-1]
  s, rows, out, row_steps, tables = begin(state, tokens, mask, images, prompt_ids, rng,
                                          max_lengths, end=ends[0], exit_at=below(size), **static)
  while True:
    # The step (a replicated scalar) says whether the loop ended at its phase's end or on a drop.
    step = int(s.step)
    live = live_groups(s.done, group_size)
    if step >= ends[-1] or not live.size:
      break
    fit = next(k for k in buckets if k >= live.size)
    if fit < size:  # else the loop ended at its phase's end: the next starts as the batch is
      size, groups = fit, np.full(fit, live[0], np.int32)
      groups[:live.size] = live
      s, rows, out = compact(state, s, rows, out, groups, np.arange(fit) >= live.size, **static)
    end = next(e for e in ends if e > step)
    s, row_steps = decode(state, s, rows, row_steps, tables, end=end, exit_at=below(size),
                          **static)
  return finish(state, tokens, mask, s, rows, out, row_steps, **static)
