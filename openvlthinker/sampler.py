"""On-device generation: prefill prompts + images, then decode in `lax.while_loop`s over a
preallocated, sharded KV cache, returning what the trainer needs.

Layout. Prompts arrive right-padded; the sampler right-aligns them in the smallest bucket of Lb
slots that fits (left padding, masked), so every response starts at slot Lb and all rows write the
cache at the same slot. Positions count real tokens only (the first real token is position 0), so
a prompt's result does not depend on how much padding its batch needed. One compile per
(P, G, Lb, image shape, config).

Rows. B = P·G rows, prompt-major: row b = p·G + g is sample g of prompt p (`out.prompt_index`).
Row b draws step t with the key fold_in(fold_in(fold_in(rng, prompt_ids[p]), g), t): its tokens
depend on (rng, prompt id, g) and on nothing else in the batch. An optional cap `max_lengths`
ends a row after that many tokens as a stop token would (a task's token budget).

Cache. Each prompt is prefilled once (P rows); that cache is the read-only shared prefix of a
[B, Lr - 1]-slot cache for the responses (`KVCache.prefix`), so a decode step reads a prompt's keys
once for its G samples. Both live on device, in the model's dtype, sharded by the `cache_batch` /
`act_kv_heads` rules; the loop updates the response cache in place (the compiled loop holds no
copy of it; tests check the HLO).

Decode. A loop stops when every row has drawn a stop token (or reached its cap) or after Lr
tokens. Filters run only when configured (see `sampling`); log-prob and entropy come from one
log-softmax per step. At small widths a step's time goes mostly to reading the KV cache, so the
loop runs in `decode_phases` consecutive loops over a response cache that grows between them (each
reads only the slots its steps can reach), and every step's rotary tables are computed once,
before the first.

Compaction (`SamplerConfig.compact`, `sampler_compact`). Response lengths differ by tens of times
across tasks, so most of the batch is done long before the last row. With compaction the loops
are separate jitted calls, and a loop also ends as soon as the prompt groups with a row still
running fit a smaller live bucket; the host reads which they are (one sync per boundary) and the
next loop runs only them, gathered (loop state, response cache, prefix rows) into that bucket.
A row computes what it computes in the single call, with the same key and cache contents: the
output is the single call's bit for bit where the platform's matmuls sum a row in the same order
at every row count (XLA:CPU at the tests' sizes, 2 to 8 rows a device); elsewhere log-probs agree
to float rounding (≤ 6e-6 at benchmarks/length_mix.py's sizes, where YNNPACK sums a
[R, 256] × [256, N] product in another order below R = 64), and a token differs only where its
uniform draw falls within that rounding of a boundary. `out.decoded_row_steps` counts the
row × step slots the loops computed. `Sampler.lower` is the single call (what the HLO checks and
the memory plan read).

The trainer recomputes log-probs with one teacher-forced forward over the returned sequences:
  logits, _ = model(out.sequence_tokens, out.sequence_positions, images[out.prompt_index],
                    input_mask=out.sequence_mask, prefix_mask=out.prefix_mask,
                    logits_from=out.response_start - 1)   # or 0: all columns
  logprobs, entropies = response_logprobs(logits, out.tokens, out.response_mask,
                                          out.response_start, config)  # = out.logprobs, .entropies
"""
from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from openvlthinker import multihost, sampling
from openvlthinker.fields import check, positive_int
from openvlthinker.models.protocol import Cache, Positions, VisionLanguageModel
from openvlthinker.sharding import Sharder


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Static generation settings (hashable: a change recompiles).

  temperature > 0 scales logits; top_k = 0 and top_p = 1 switch those filters off; greedy takes the
  mode of the (filtered, tempered) distribution, whose log-probs and entropies are still reported.
  stop_tokens end a row (the stop token is part of the response); banned_tokens get probability 0.
  A batch's prompts are right-aligned in the smallest of `prompt_buckets` that holds the longest.
  decode_phases: the decode loop runs in up to this many consecutive loops (of 8 steps or more)
  over a response cache that grows between them, so early steps do not read slots no token has
  reached yet (the cache reads dominate a step's memory traffic); each phase is one more compiled
  loop body.
  compact: with more than one phase, run the decode loops as separate jitted calls and drop each
  prompt group from the batch once its rows are all done, so the loops compute only the live
  groups (in the smallest live bucket that holds them: `sampler_compact.live_buckets`). The same
  output (see the module docstring); it costs a call and a host sync at each phase end and each
  bucket drop, and a compile per (phase, bucket) met. False: one jitted call, every row runs
  every step until all are done.
  """
  max_new_tokens: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False
  stop_tokens: tuple[int, ...] = (2,)
  banned_tokens: tuple[int, ...] = ()
  prompt_buckets: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)
  pad_id: int = 0
  decode_phases: int = 4
  compact: bool = True

  def __post_init__(self):
    for field in ("stop_tokens", "banned_tokens", "prompt_buckets"):
      object.__setattr__(self, field, tuple(int(x) for x in getattr(self, field)))
    check(positive_int(self.max_new_tokens), "max_new_tokens", "a positive integer",
          self.max_new_tokens)
    check(self.temperature > 0, "temperature", "a number > 0 (greedy=True for argmax)",
          self.temperature)
    check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "an integer >= 0 (0 = off)",
          self.top_k)
    check(0 < self.top_p <= 1, "top_p", "a number in (0, 1] (1 = off)", self.top_p)
    check(positive_int(self.decode_phases), "decode_phases", "a positive integer",
          self.decode_phases)
    check(isinstance(self.compact, bool), "compact", "True or False", self.compact)
    check(bool(self.prompt_buckets) and all(b > 0 for b in self.prompt_buckets), "prompt_buckets",
          "a non-empty tuple of positive lengths", self.prompt_buckets)
    object.__setattr__(self, "prompt_buckets", tuple(sorted(set(self.prompt_buckets))))
    check(not set(self.stop_tokens) & set(self.banned_tokens), "banned_tokens",
          f"no overlap with stop_tokens={self.stop_tokens}", self.banned_tokens)


@flax.struct.dataclass
class SamplerOutput:
  """Rows are prompt-major (b = p·G + g); Lr = max_new_tokens; Lb = response_start.

  tokens int32[B, Lr]: the response, pad_id after the stop token.
  logprobs, entropies float32[B, Lr]: log-prob of each token and the exact entropy of the sampling
    distribution it was drawn from (after banned tokens, temperature, top-k, top-p); 0 after the end.
  lengths int32[B]: response tokens through the stop token (Lr when none came).
  response_mask bool[B, Lr]: the first `lengths` tokens.
  sequence_tokens int32[B, Lb + Lr], sequence_positions (the model's positions pytree over the
    same columns; int32[B, Lb + Lr] for the built-in VLM), sequence_mask, prefix_mask
    bool[B, Lb + Lr]: right-aligned prompt then response, ready for a teacher-forced forward; the
    logits at column Lb - 1 + t predict response token t (`response_logits`).
  prompt_index int32[B]: the prompt (row of the input batch) each row answers, b // G.
  decoded_row_steps int32[]: row × step slots the decode loops computed (a padding row of a live
    bucket counts; step 0, drawn from the prefill's logits, does not): B × the steps run without
    compaction, fewer with it. The least it can be is Σ max(lengths - 1, 0).
  """
  tokens: jax.Array
  logprobs: jax.Array
  entropies: jax.Array
  lengths: jax.Array
  response_mask: jax.Array
  sequence_tokens: jax.Array
  sequence_positions: Positions
  sequence_mask: jax.Array
  prefix_mask: jax.Array
  prompt_index: jax.Array
  response_start: int = flax.struct.field(pytree_node=False)
  decoded_row_steps: jax.Array | None = None


def response_logits(logits: jax.Array, response_len: int, response_start: int) -> jax.Array:
  """Teacher-forced logits over a sequence of Lb = `response_start` prompt slots and Lr =
  `response_len` response slots → float32[B, Lr, V], row t predicting response token t. `logits`
  may cover the whole sequence (float32[B, Lb + Lr, V]) or start at any column up to Lb - 1:
  `model(..., logits_from=response_start - 1)` computes only the Lr + 1 columns needed."""
  start = logits.shape[1] - response_len - 1  # Column Lb - 1 of the sequence.
  if not 0 <= start <= response_start - 1:
    raise ValueError(f"logits: expected the last {response_len + 1} to "
                     f"{response_len + response_start} columns of the sequence, got "
                     f"{logits.shape[1]}")
  return jax.lax.slice_in_dim(logits, start, start + response_len, axis=1)


def response_logprobs(logits: jax.Array, tokens: jax.Array, response_mask: jax.Array,
                      response_start: int, config: SamplerConfig
                      ) -> tuple[jax.Array, jax.Array]:
  """Log-probs of response `tokens` int32[B, Lr] and entropies, float32[B, Lr] each, under the
  distribution the sampler draws from with `config` (the same code path), from teacher-forced
  logits over the sequence (see `response_logits`). Zero outside `response_mask` bool[B, Lr];
  -inf for a token that `config`'s filters exclude."""
  dist = sampling.candidates(response_logits(logits, tokens.shape[1], response_start), config)
  return (jnp.where(response_mask, sampling.log_prob_of(dist, tokens), 0.0),
          jnp.where(response_mask, sampling.entropy(dist), 0.0))


def align_prompts(tokens: np.ndarray, mask: np.ndarray, length: int, pad_id: int = 0):
  """Right-padded prompts int32[P, Lp] → right-aligned in `length` slots (numpy).

  Returns tokens int32[P, length] (pad_id in front), positions int32[P, length] (0 at the first real
  token, 0 on padding) and mask bool[P, length].
  """
  n = mask.sum(axis=1)
  col = np.arange(length)[None, :]
  src = col - (length - n)[:, None]  # Source column of each slot; negative on the padding.
  real = src >= 0
  gathered = np.take_along_axis(tokens, np.clip(src, 0, tokens.shape[1] - 1), axis=1)
  return (np.where(real, gathered, pad_id).astype(np.int32),
          np.where(real, src, 0).astype(np.int32), real)


_MIN_PHASE_STEPS = 8  # shorter phases save less cache traffic than their compile costs


def decode_phase_ends(max_new_tokens: int, phases: int) -> tuple[int, ...]:
  """The step each decode phase stops before: steps 1 … Lr - 1 (step 0 is drawn from the
  prefill's logits) in up to `phases` near-equal runs of at least 8 steps; the last ends at Lr."""
  steps = max_new_tokens - 1
  phases = max(1, min(phases, steps // _MIN_PHASE_STEPS))
  return tuple(1 + -(-steps * (i + 1) // phases) for i in range(phases))


@flax.struct.dataclass
class _Loop:
  """The decode loop's carry. `step` is the response column drawn next."""
  step: jax.Array       # int32[]
  token: jax.Array      # int32[B]    the last drawn token (input of the next forward)
  position: jax.Array   # int32[B]    its decode position (an index into the decode tables)
  done: jax.Array       # bool[B]     a stop token has been drawn (or the row's cap reached)
  lengths: jax.Array    # int32[B]
  cache: Cache
  tokens: jax.Array     # int32[B, Lr]
  logprobs: jax.Array   # float32[B, Lr]
  entropies: jax.Array  # float32[B, Lr]


class Sampler:
  """`Sampler(model, config, sharder)(state, prompt_tokens, prompt_mask, images, rng,
  group_size=G)` → SamplerOutput.

  `model` (or its graphdef) fixes the architecture; the parameters come in as `state`
  (`nnx.state(model)` or the trainer's current one) on every call, as arguments of the jitted
  function. One compile per (P, G, prompt bucket, images shape); see the module docstring.
  """

  def __init__(self, model, config: SamplerConfig, sharder: Sharder = Sharder()):
    self.graphdef = model if isinstance(model, nnx.GraphDef) else nnx.split(model)[0]
    self.config, self.sharder = config, sharder

  def bucket(self, longest: int) -> int:
    """The prompt length (slots) a batch whose longest prompt has `longest` tokens is padded to."""
    for b in self.config.prompt_buckets:
      if b >= longest:
        return b
    raise ValueError(f"prompt_tokens: a prompt of {longest} tokens is longer than the largest of "
                     f"sampler.prompt_buckets={self.config.prompt_buckets}")

  def __call__(self, state: nnx.State, prompt_tokens: np.ndarray, prompt_mask: np.ndarray,
               images: np.ndarray | None, rng: jax.Array, *, group_size: int = 1,
               prompt_ids: np.ndarray | None = None,
               max_lengths: np.ndarray | None = None) -> SamplerOutput:
    """prompt_tokens int32[P, Lp] right-padded, prompt_mask bool[P, Lp], images uint8[P, N, H, W, 3]
    or None, rng a PRNG key; prompt_ids int32[P] (default 0..P-1) name each prompt's random stream.
    max_lengths: None, or int[P] (per prompt) or int[P·G] (per row), each ≥ 1: a row stops after
    that many tokens even without a stop token (its length is then the cap; caps above
    max_new_tokens change nothing).
    """
    args = self._prepare(prompt_tokens, prompt_mask, images, prompt_ids, group_size, max_lengths)
    cfg = self.config
    if cfg.compact and len(decode_phase_ends(cfg.max_new_tokens, cfg.decode_phases)) > 1:
      from openvlthinker import sampler_compact  # pylint: disable=g-import-not-at-top
      return sampler_compact.generate(state, *args, rng, **self._static(group_size))
    return _GENERATE.on(self.sharder)(state, *args[:4], rng, args[4], **self._static(group_size))

  def lower(self, state, prompt_tokens, prompt_mask, images, rng, *, group_size: int = 1,
            prompt_ids=None, max_lengths=None) -> jax.stages.Lowered:
    """The single jitted generation (no compaction) for these inputs, lowered (for `.compile()`,
    cost and HLO checks)."""
    args = self._prepare(prompt_tokens, prompt_mask, images, prompt_ids, group_size, max_lengths)
    return _GENERATE.on(self.sharder).lower(state, *args[:4], rng, args[4],
                                            **self._static(group_size))

  def _static(self, group_size: int) -> dict:
    return dict(graphdef=self.graphdef, config=self.config, sharder=self.sharder,
                group_size=group_size)

  def _prepare(self, prompt_tokens, prompt_mask, images, prompt_ids, group_size, max_lengths):
    """Checks the host batch (this process's prompts: its block of the global batch), right-aligns
    it in its bucket (the global batch's: every process agrees on it) and places it on the mesh as
    the global batch: (tokens, mask, images, prompt_ids, per-row caps int32[B] or None).
    The default prompt ids are global row numbers, so with several processes each prompt keeps
    the random stream it has in a one-process run of the same global batch."""
    tokens, mask = np.asarray(prompt_tokens), np.asarray(prompt_mask, bool)
    if tokens.ndim != 2 or mask.shape != tokens.shape:
      raise ValueError(f"prompt_tokens/prompt_mask: expected equal shapes [P, Lp], got "
                       f"{tokens.shape} and {mask.shape}")
    n = mask.sum(axis=1)
    if (n == 0).any():
      raise ValueError(f"prompt_mask: rows {np.flatnonzero(n == 0).tolist()} have no tokens")
    if (mask[:, 1:] & ~mask[:, :-1]).any():
      raise ValueError("prompt_mask: expected right-padded rows (real tokens first, then padding)")
    if not isinstance(group_size, int) or group_size < 1:
      raise ValueError(f"group_size: expected a positive integer, got {group_size!r}")
    p = tokens.shape[0]
    if prompt_ids is None:
      prompt_ids = np.arange(p) + multihost.index() * p
    prompt_ids = np.asarray(prompt_ids)
    if prompt_ids.shape != (p,):
      raise ValueError(f"prompt_ids: expected shape ({p},), got {prompt_ids.shape}")
    if images is not None:
      images = np.asarray(images)
      if images.ndim != 5 or images.shape[0] != p or images.dtype != np.uint8:
        raise ValueError(f"images: expected uint8[{p}, N, H, W, 3], got {images.dtype}"
                         f"{list(images.shape)}")
    if max_lengths is not None:
      caps = np.asarray(max_lengths)
      if (caps.shape not in ((p,), (p * group_size,)) or caps.dtype.kind not in "iu"
          or (caps < 1).any()):
        raise ValueError(f"max_lengths: expected integers >= 1 of shape ({p},) (per prompt) or "
                         f"({p * group_size},) (per row), got {caps.dtype}{list(caps.shape)} "
                         f"{caps.ravel()[:8].tolist()}")
      if caps.shape[0] != p * group_size:
        caps = np.repeat(caps, group_size)
      max_lengths = np.minimum(caps, self.config.max_new_tokens).astype(np.int32)
    bucket = self.bucket(multihost.max_over_processes(int(n.max())))
    aligned, _, aligned_mask = align_prompts(tokens, mask, bucket, self.config.pad_id)
    args = (aligned, aligned_mask, images, np.asarray(prompt_ids).astype(np.int32), max_lengths)
    if self.sharder.mesh is not None:
      args = tuple(None if x is None else self.sharder.put_batch(x) for x in args)
    return args


# --- the pieces both paths trace: the prefill with step 0, a decode phase, the output ---

def _rows(shd: Sharder, x: jax.Array) -> jax.Array:
  """`x` with its leading (row) axis over the data-parallel mesh axes."""
  return shd.constrain(x, ("batch",) + (None,) * (x.ndim - 1))


def _steps(model: VisionLanguageModel, cfg: SamplerConfig, keys: jax.Array,
           caps: jax.Array | None, tables):
  """`record(s, logits)` (draw step `s.step` of every row from its logits float32[R, V]) and the
  loop `body(s)`, for R rows with PRNG keys[R] and length caps int32[R] (or None)."""
  def choose(logits, step, done):
    uniform = None
    if not cfg.greedy:
      uniform = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, step)))(keys)
    d = sampling.draw(sampling.candidates(logits, cfg), uniform)
    return (jnp.where(done, cfg.pad_id, d.tokens), jnp.where(done, 0.0, d.log_probs),
            jnp.where(done, 0.0, d.entropy))

  def record(s: _Loop, logits) -> _Loop:
    token, logp, ent = choose(logits, s.step, s.done)
    col = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x[:, None], s.step, axis=1)
    stop = jnp.isin(token, jnp.asarray(cfg.stop_tokens, jnp.int32)) if cfg.stop_tokens else False
    if caps is not None:
      stop = stop | (s.step + 1 >= caps)
    return s.replace(step=s.step + 1, token=token, position=s.position + 1,
                     done=s.done | stop, lengths=jnp.where(s.done, s.lengths, s.step + 1),
                     tokens=col(s.tokens, token), logprobs=col(s.logprobs, logp),
                     entropies=col(s.entropies, ent))

  def body(s: _Loop) -> _Loop:
    step_positions = model.response_positions(s.position, 1)
    logits, cache = model(s.token[:, None], step_positions, None, s.cache,
                          rope=model.decode_rope(tables, s.position))
    return record(s.replace(cache=cache), logits[:, 0])

  return record, body


def _start(model: VisionLanguageModel, tokens, mask, images, prompt_ids, rng, max_lengths,
           cfg: SamplerConfig, shd: Sharder, g: int):
  """Prefill and step 0 → (loop state after step 0 with a response cache sized for phase 0,
  keys[B], caps int32[B] or None, decode tables)."""
  positions, next_position = model.prompt_positions(tokens, mask)
  (p, lb), lr = tokens.shape, cfg.max_new_tokens
  b = p * g
  repeat = lambda x: _rows(shd, jnp.repeat(x, g, axis=0))

  # Prefill each prompt once; its G samples attend to that one copy (a shared prefix cache),
  # then to their own slots, so a decode step reads each prompt's keys once, not G times.
  logits, prompt_cache = model(tokens, positions, images, model.init_cache(p, lb),
                               input_mask=mask, prefix_mask=mask, logits_from=lb - 1)
  # The last response token is never fed back: Lr - 1 own slots in all. Step t (1 ≤ t < Lr) feeds
  # token t - 1 into slot t - 1, so a phase ending before step `end` needs end - 1 slots.
  ends = decode_phase_ends(lr, cfg.decode_phases)
  cache = model.init_cache(b, max(ends[0] - 1, 1), prefix=prompt_cache)

  # Row b = p·G + g: key fold_in(fold_in(rng, prompt_ids[p]), g); step t folds in t.
  keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, prompt_ids)
  keys = jax.vmap(jax.random.fold_in)(jnp.repeat(keys, g, axis=0), jnp.tile(jnp.arange(g), p))
  caps = None if max_lengths is None else _rows(shd, max_lengths)
  # Tables of every position a step can feed (< Lb + Lr), built once before the loop (~10% of
  # a step when XLA recomputed rotary angles inside it); a step reads its rows.
  tables = model.decode_tables(lb + lr)
  record, _ = _steps(model, cfg, keys, caps, tables)

  zeros = lambda dtype: _rows(shd, jnp.zeros((b, lr), dtype))
  start = _Loop(step=jnp.zeros((), jnp.int32), token=jnp.zeros((b,), jnp.int32),
                position=repeat(next_position - 1), done=jnp.zeros((b,), bool),
                lengths=jnp.zeros((b,), jnp.int32), cache=cache,
                tokens=_rows(shd, jnp.full((b, lr), cfg.pad_id, jnp.int32)),
                logprobs=zeros(jnp.float32), entropies=zeros(jnp.float32))
  return record(start, repeat(logits[:, 0])), keys, caps, tables


def _phase(s: _Loop, body, end: int, row_steps: jax.Array, *, group_size: int = 1,
           exit_at: int = 0) -> tuple[_Loop, jax.Array]:
  """Decodes until step `end`, until every row is done or, with `exit_at` > 0, until at most that
  many groups of `group_size` consecutive rows have a row running; adds the row × step slots
  run to `row_steps`."""
  def running(s):
    if not exit_at:
      return ~jnp.all(s.done)
    return jnp.sum(~jnp.all(s.done.reshape(-1, group_size), axis=1)) > exit_at

  first = s.step
  s = jax.lax.while_loop(lambda s: (s.step < end) & running(s), body, s)
  return s, row_steps + s.done.shape[0] * (s.step - first)


def _output(model: VisionLanguageModel, tokens, mask, response, g: int, shd: Sharder,
            row_steps: jax.Array) -> SamplerOutput:
  """The SamplerOutput of prompts tokens/mask [P, Lb] and `response` (anything with tokens,
  logprobs, entropies [B, Lr] and lengths [B] of all rows)."""
  (p, lb), lr = tokens.shape, response.tokens.shape[1]
  b = p * g
  positions, next_position = model.prompt_positions(tokens, mask)
  repeat = lambda x: _rows(shd, jnp.repeat(x, g, axis=0))
  response_mask = jnp.arange(lr) < response.lengths[:, None]
  response_positions = model.response_positions(repeat(next_position), lr)
  return SamplerOutput(
      tokens=response.tokens, logprobs=response.logprobs, entropies=response.entropies,
      lengths=response.lengths, response_mask=response_mask,
      sequence_tokens=jnp.concatenate([repeat(tokens), response.tokens], axis=1),
      sequence_positions=jax.tree.map(lambda a, r: jnp.concatenate([a, r], axis=1),
                                      jax.tree.map(repeat, positions), response_positions),
      sequence_mask=jnp.concatenate([repeat(mask), response_mask], axis=1),
      prefix_mask=jnp.concatenate([repeat(mask), jnp.zeros((b, lr), bool)], axis=1),
      prompt_index=jnp.repeat(jnp.arange(p, dtype=jnp.int32), g),
      response_start=lb, decoded_row_steps=row_steps)


# XLA:CPU hands a reduction above a size threshold to YNNPACK, which sums in another order than
# XLA's own loops: a row's log-probs then depend on how many rows share its batch, and compacting
# the batch would change them. With only dots handed to YNNPACK the tests' model is row-invariant
# down to 2 rows a shard (a 1-row matmul is a matrix-vector product, summed differently, so live
# buckets keep 2). YNNPACK's dots are not row-invariant at every shape (see the module
# docstring); no option found makes them so (Eigen's, with YNNPACK off, are not either).
_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
STATIC = ("graphdef", "config", "sharder", "group_size")


class RowJit:
  """`fn` jitted as is and, for XLA:CPU, with row-invariant reductions (`_CPU_OPTIONS`);
  `on(sharder)` is the one for the sharder's platform. Module level, with the static parts as
  static arguments: samplers with equal settings share compiled code (e.g. one per evaluation)."""

  def __init__(self, fn, static_argnames=STATIC, **kwargs):
    self.default = jax.jit(fn, static_argnames=static_argnames, **kwargs)
    self.cpu = jax.jit(fn, static_argnames=static_argnames, compiler_options=_CPU_OPTIONS,
                       **kwargs)

  def on(self, sharder: Sharder):
    platform = (sharder.mesh.devices.flat[0].platform if sharder.mesh is not None
                else jax.default_backend())
    return self.cpu if platform == "cpu" else self.default


def _generate_fn(state, tokens, mask, images, prompt_ids, rng, max_lengths=None, *, graphdef,
                 config: SamplerConfig, sharder: Sharder, group_size: int) -> SamplerOutput:
  """tokens int32[P, Lb] and mask bool[P, Lb] from `align_prompts`; images
  uint8[P, N, H, W, 3] or None; prompt_ids int32[P]; rng a key; max_lengths int32[B] or None.
  The whole generation in one call, no compaction. See the module docstring."""
  model: VisionLanguageModel = nnx.merge(graphdef, state)
  s, keys, caps, tables = _start(model, tokens, mask, images, prompt_ids, rng, max_lengths,
                                 config, sharder, group_size)
  _, body = _steps(model, config, keys, caps, tables)
  row_steps = jnp.zeros((), jnp.int32)
  for i, end in enumerate(decode_phase_ends(config.max_new_tokens, config.decode_phases)):
    if i:
      s = s.replace(cache=model.grow_cache(s.cache, end - 1))
    s, row_steps = _phase(s, body, end, row_steps)
  return _output(model, tokens, mask, s, group_size, sharder, row_steps)


_GENERATE = RowJit(_generate_fn)
_generate = _GENERATE.default  # what `plan` lowers for its memory figures (any platform)
