"""The next-token sampling distribution: banned tokens, temperature, top-k, top-p, and what is read
off it (log-probs, exact entropy, a draw).

Shared by the sampler (one [B, V] row of logits per decode step) and the trainer (teacher-forced
[B, L, V] logits), so both see the same distribution. Every function works over any leading axes.
Filters are chosen at trace time from the static config: with top-k and top-p off nothing is sorted.
"""
from __future__ import annotations

from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp

# A draw inverts the CDF at one uniform per row: one random number instead of V Gumbel variates
# (the PRNG dominated a decode step's sampling cost). The CDF is searched in two levels, block sums
# then one block, because a cumulative sum over the whole vocabulary lowers to a multi-pass
# reduce-window on CPU; this reads the probabilities once.
_BLOCK = 64


class DistributionConfig(Protocol):
  temperature: float
  top_k: int
  top_p: float
  banned_tokens: tuple[int, ...]


class Candidates(NamedTuple):
  """The sampling distribution over a set of candidate tokens.

  log_probs: float32[..., C], normalised; -inf for tokens the filters removed.
  ids: int32[..., C] vocabulary ids of the candidates (sorted by probability, descending), or None
    when the candidates are the whole vocabulary in id order (C = V).
  """
  log_probs: jax.Array
  ids: jax.Array | None


def candidates(logits: jax.Array, cfg: DistributionConfig) -> Candidates:
  """float32[..., V] model logits → the sampling distribution (see `Candidates`)."""
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  if cfg.banned_tokens:
    banned = jnp.zeros((vocab,), bool).at[jnp.asarray(cfg.banned_tokens)].set(True)
    logits = jnp.where(banned, -jnp.inf, logits)
  if cfg.temperature != 1.0:
    logits = logits / cfg.temperature
  ids = None
  k = cfg.top_k if 0 < cfg.top_k < vocab else (vocab if cfg.top_p < 1.0 else 0)
  if k:
    logits, ids = jax.lax.top_k(logits, k)  # Sorted, descending; ties keep the lower id first.
  if cfg.top_p < 1.0:
    probs = jax.nn.softmax(logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # The nucleus: the shortest prefix of the sorted tokens whose mass reaches top_p.
    logits = jnp.where(mass_before < cfg.top_p, logits, -jnp.inf)
  return Candidates(jax.nn.log_softmax(logits, axis=-1), ids)


def entropy(c: Candidates) -> jax.Array:
  """Exact entropy −Σ p log p of the distribution, float32[...]. A removed token (log p = −inf)
  adds 0, and so does its gradient: the `where` sits inside the product, since `where(p > 0,
  p · log p, 0)` differentiates its unused branch too, 0 · −inf = NaN (every update with entropy
  shaping was skipped for it whenever a token is banned, as the image tokens always are)."""
  p = jnp.exp(c.log_probs)
  return -jnp.sum(p * jnp.where(p > 0, c.log_probs, 0.0), axis=-1)


def log_prob_of(c: Candidates, tokens: jax.Array) -> jax.Array:
  """log p(token) for int32[...] vocabulary ids; -inf for a token the filters removed."""
  if c.ids is None:
    return jnp.take_along_axis(c.log_probs, tokens[..., None], axis=-1)[..., 0]
  hit = c.ids == tokens[..., None]
  return jnp.max(jnp.where(hit, c.log_probs, -jnp.inf), axis=-1)


class Draw(NamedTuple):
  tokens: jax.Array     # int32[...] vocabulary ids
  log_probs: jax.Array  # float32[...] log p of the drawn tokens
  entropy: jax.Array    # float32[...]


def draw(c: Candidates, uniform: jax.Array | None) -> Draw:
  """A token from the distribution: its mode when `uniform` is None, else the inverse CDF at
  `uniform` (float32[...] in [0, 1)). A token of zero probability is never returned."""
  logp = c.log_probs
  if uniform is None:
    index = jnp.argmax(logp, axis=-1)
  else:
    index = _inverse_cdf(jnp.exp(logp), uniform)
  chosen = jnp.take_along_axis(logp, index[..., None], axis=-1)[..., 0]
  tokens = index if c.ids is None else jnp.take_along_axis(c.ids, index[..., None], axis=-1)[..., 0]
  return Draw(tokens.astype(jnp.int32), chosen, entropy(c))


def _inverse_cdf(probs: jax.Array, uniform: jax.Array) -> jax.Array:
  """The first index whose cumulative probability exceeds uniform · total, int32[...]."""
  *lead, n = probs.shape
  block = min(_BLOCK, n)
  pad = -n % block
  if pad:
    probs = jnp.pad(probs, [(0, 0)] * len(lead) + [(0, pad)])
  blocks = probs.reshape(*lead, -1, block)
  block_mass = jnp.sum(blocks, axis=-1)
  block_cdf = jnp.cumsum(block_mass, axis=-1)
  target = uniform * block_cdf[..., -1]
  # Blocks of zero mass never satisfy cdf > target ≥ previous cdf, so j has positive mass; when
  # rounding lets uniform · total reach the total, take the last block that has any.
  last_block = jnp.max(jnp.where(block_mass > 0, jnp.arange(block_mass.shape[-1]), 0), axis=-1)
  j = jnp.minimum(jnp.sum(block_cdf <= target[..., None], axis=-1), last_block)
  # Mass before block j, read from the same cumulative sums that chose j, so `rest` >= 0.
  before = jnp.pad(block_cdf, [(0, 0)] * len(lead) + [(1, 0)])[..., :-1]
  rest = target - jnp.take_along_axis(before, j[..., None], axis=-1)[..., 0]
  inner = jnp.take_along_axis(blocks, j[..., None, None], axis=-2)[..., 0, :]
  i = jnp.sum(jnp.cumsum(inner, axis=-1) <= rest[..., None], axis=-1)
  # Rounding can leave `rest` at or past the block's summed mass: fall back to the block's last
  # token of positive probability rather than run into a removed one.
  last = jnp.max(jnp.where(inner > 0, jnp.arange(block), 0), axis=-1)
  return (j * block + jnp.minimum(i, last)).astype(jnp.int32)
