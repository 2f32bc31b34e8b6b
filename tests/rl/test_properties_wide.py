"""Wider property tests than test_advantages.py / test_sampling.py draw: continuous rewards for the
baselines too, prompt-major batches with group sizes that are not powers of two (the trainer's
layout, row b in group b // G), ties, all-equal groups and extreme magnitudes; sampling with tied
logits, logits of ±1e4, all-equal rows, vocabularies that are not multiples of the CDF block, and
random (not derandomised) examples. Every check is against a float64 numpy reference written
here, with tolerances derived from float32 rounding of the quantities involved.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from advantage_reference import per_segment, ref_drgrpo, ref_grpo, ref_q, ref_rloo
from openvlthinker import sampling
from openvlthinker.rl import advantages as adv
from openvlthinker.sampler import SamplerConfig

U32 = 2.0 ** -24  # float32 unit roundoff
B_PAD = 160  # >= 12 prompts x 13 responses
SETTINGS = settings(max_examples=60, deadline=None)

# ------------------------------------------------------------------------- advantage estimators


_BASELINES = {"grpo": ref_grpo, "drgrpo": ref_drgrpo, "rloo": ref_rloo}


@functools.cache
def estimator(name):
  return jax.jit(adv.get_advantage_estimator(name))


def _group_rewards(draw, g):
  kind = draw(st.sampled_from(["continuous", "wide", "close", "ties", "equal", "extreme"]))
  if kind == "continuous":
    # No subnormals: XLA:CPU flushes them to zero (1e-45 ties with 0; test_advantages excludes
    # them too).
    r = draw(st.lists(st.floats(-3, 3, width=32, allow_subnormal=False), min_size=g,
                      max_size=g))
  elif kind == "wide":  # magnitudes from 1e-3 to 1e4 in one group
    r = [s * 10.0 ** e for s, e in zip(
        draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=g, max_size=g)),
        draw(st.lists(st.floats(-3, 4), min_size=g, max_size=g)))]
  elif kind == "close":  # a few float32 ulps apart around a large value
    base = draw(st.sampled_from([1.0, 1e3, -1e4]))
    r = [float(np.float32(base) + np.float32(k) * np.spacing(np.float32(base)))
         for k in draw(st.lists(st.integers(0, 3), min_size=g, max_size=g))]
  elif kind == "ties":
    r = draw(st.lists(st.sampled_from([0.0, 0.3, 1.0, 1.5]), min_size=g, max_size=g))
  elif kind == "equal":
    r = [draw(st.floats(-1e4, 1e4, width=32, allow_subnormal=False))] * g
  else:
    r = draw(st.lists(st.sampled_from([-1e4, 0.0, 1e-4, 1e4]), min_size=g, max_size=g))
  return np.asarray(r, np.float32)


@st.composite
def prompt_major(draw):
  """P prompts × G responses (G not a power of two), rows b = p·G + g, a task per prompt."""
  g = draw(st.sampled_from([2, 3, 5, 6, 7, 9, 12, 13]))
  p = draw(st.integers(1, 12))
  b = p * g
  rewards = np.concatenate([_group_rewards(draw, g) for _ in range(p)])
  tasks = np.repeat(np.asarray(draw(st.lists(st.integers(0, 5), min_size=p, max_size=p)),
                              np.int32), g)
  valid = np.ones(b, bool)
  if draw(st.booleans()):
    valid = np.asarray(draw(st.lists(st.booleans(), min_size=b, max_size=b)))
  # Padded with invalid rows to one size, so each estimator compiles once.
  pad = B_PAD - b
  return dict(rewards=np.concatenate([rewards, np.full(pad, np.nan, np.float32)]),
              groups=np.arange(B_PAD, dtype=np.int32) // g,
              tasks=np.concatenate([tasks, np.zeros(pad, np.int32)]),
              valid=np.concatenate([valid, np.zeros(pad, bool)]), g=g)


def run(name, b, rewards=None):
  r = b["rewards"] if rewards is None else rewards
  return np.asarray(estimator(name)(r, b["groups"], b["tasks"], b["valid"]), np.float64)


@SETTINGS
@given(prompt_major())
def test_g2rpo_matches_numpy_on_prompt_major_batches(b):
  r = b["rewards"].astype(np.float64)
  stage1 = per_segment(ref_q, r, b["groups"], b["valid"])
  np.testing.assert_allclose(run("g2rpo_group", b), stage1, rtol=0, atol=2e-6)
  # Stage-1 values equal in exact arithmetic are exact ties (test_advantages checks the premise).
  want = per_segment(ref_q, np.round(stage1, 9), b["tasks"], b["valid"])
  got = run("g2rpo", b)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
  assert np.all(got[~b["valid"]] == 0)


@SETTINGS
@given(prompt_major())
def test_g2rpo_depends_only_on_the_order_within_groups(b):
  """Q sees ranks and ties only: within a group, a larger reward gets a larger stage-1 value and
  equal rewards bitwise-equal ones; an increasing affine map of all rewards changes nothing."""
  s = run("g2rpo_group", b)
  r, v = b["rewards"], b["valid"]
  for grp in np.unique(b["groups"][v]):
    rows = np.flatnonzero(v & (b["groups"] == grp))
    x, y = r[rows], s[rows]
    i, j = np.nonzero(x[:, None] < x[None])
    assert np.all(y[i] < y[j])
    i, j = np.nonzero(x[:, None] == x[None])
    assert np.all(y[i] == y[j])
  mapped = (r.astype(np.float64) * 0.5 + 3.0).astype(np.float32)
  rv, mv = r[v], mapped[v]
  assume(np.array_equal(rv[:, None] < rv[None], mv[:, None] < mv[None]))
  assume(np.array_equal(rv[:, None] == rv[None], mv[:, None] == mv[None]))
  np.testing.assert_array_equal(run("g2rpo", b, mapped), run("g2rpo", b))


def _baseline_tolerance(name, x):
  """float32 error bound of a group's baseline advantages, from the group's range and std.

  r - mean is formed relative to a pivot in the group, so its error is a few roundings of the
  group's range times n (the sum), not of the rewards' magnitude; GRPO divides it by std + 1e-6.
  """
  n = len(x)
  spread = x.max() - x.min() if n else 0.0
  err = 8 * n * U32 * spread + 1e-7
  if name == "grpo" and n > 1:
    return err / (x.std(ddof=1) + 1e-6) * 4 + 1e-5
  return 2 * err if name == "rloo" else err


@pytest.mark.parametrize("name", sorted(_BASELINES))
@SETTINGS
@given(b=prompt_major())
def test_baselines_match_numpy_on_continuous_rewards(name, b):
  r = b["rewards"].astype(np.float64)
  want = per_segment(_BASELINES[name], r, b["groups"], b["valid"])
  got = run(name, b)
  assert np.all(got[~b["valid"]] == 0)
  for grp in np.unique(b["groups"][b["valid"]]):
    rows = np.flatnonzero(b["valid"] & (b["groups"] == grp))
    tol = _baseline_tolerance(name, r[rows])
    np.testing.assert_allclose(got[rows], want[rows], rtol=1e-5, atol=tol,
                               err_msg=f"group {grp}: {r[rows]}")
    if np.all(r[rows] == r[rows][0]):  # an all-equal group gets exactly 0, at any magnitude
      np.testing.assert_array_equal(got[rows], 0.0)


# ----------------------------------------------------------------------------------- sampling


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  finite = np.isfinite(x)
  top = np.max(np.where(finite, x, -np.inf), axis=-1, keepdims=True)
  z = np.where(finite, np.exp(x - top), 0.0)
  return np.where(finite, x - top - np.log(z.sum(-1, keepdims=True)), -np.inf)


def np_distribution(logits, temperature, top_k, top_p, banned):
  """(log p float64[N, V], candidate order int[N, V] or None, ambiguous bool[N]): the sampling
  distribution; the order its CDF is searched in (None: token id order); rows whose nucleus
  boundary lies within float32 rounding of top_p (the kept set may differ there)."""
  x = np.asarray(logits, np.float64).copy()
  n, v = x.shape
  if banned:
    x[:, list(banned)] = -np.inf
  x = x / temperature
  keep = np.isfinite(x)
  order = np.argsort(-x, axis=1, kind="stable")  # ties: the lower id first
  rank = np.argsort(order, axis=1, kind="stable")
  if 0 < top_k < v:
    keep &= rank < top_k
  ambiguous = np.zeros(n, bool)
  if top_p < 1.0:
    p = np.exp(np_log_softmax(np.where(keep, x, -np.inf)))
    sorted_p = np.take_along_axis(p, order, 1)
    before = np.cumsum(sorted_p, 1) - sorted_p
    ambiguous = (np.abs(before - top_p) < 1e-5 * max(1.0, v / 64)).any(1)
    keep &= np.take_along_axis(before < top_p, rank, 1)
  sorted_candidates = (0 < top_k < v) or top_p < 1.0
  return np_log_softmax(np.where(keep, x, -np.inf)), order if sorted_candidates else None, ambiguous


def np_entropy(logp):
  p = np.exp(logp)
  return -np.sum(np.where(p > 0, p * np.where(p > 0, logp, 0.0), 0.0), axis=-1)


@st.composite
def logit_rows(draw):
  v = draw(st.sampled_from([5, 7, 64, 65, 130]))
  rows = []
  for _ in range(4):
    kind = draw(st.sampled_from(["normal", "ties", "equal", "extreme", "one_huge"]))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 31 - 1)))
    if kind == "normal":
      row = rng.normal(size=v) * draw(st.sampled_from([0.1, 3.0, 30.0]))
    elif kind == "ties":
      row = rng.choice([-1.0, 0.0, 0.0, 2.0], size=v)
    elif kind == "equal":
      row = np.full(v, draw(st.sampled_from([0.0, -7.5, 1e4])))
    elif kind == "extreme":
      row = rng.choice([-1e4, 0.0, 1e4], size=v)
    else:
      row = rng.normal(size=v)
      row[rng.integers(v)] = draw(st.sampled_from([1e4, -1e4]))
    rows.append(row)
  return np.asarray(rows, np.float32)


@st.composite
def configs(draw, v):
  top_k = draw(st.sampled_from([0, 1, 3, v - 1, v + 5]))
  return dict(temperature=draw(st.sampled_from([0.3, 1.0, 2.5])), top_k=top_k,
              top_p=draw(st.sampled_from([1.0, 0.95, 0.5, 0.1])),
              banned=draw(st.sampled_from([(), (0,), (1, 3)])))


def sampler_config(c):
  return SamplerConfig(max_new_tokens=1, stop_tokens=(), temperature=c["temperature"],
                       top_k=c["top_k"], top_p=c["top_p"], banned_tokens=c["banned"])


K = 24  # uniforms per row of logits


def check_sampling(logits, c, seed):
  n, v = logits.shape
  cfg = sampler_config(c)
  want, order, ambiguous = np_distribution(logits, c["temperature"], c["top_k"], c["top_p"],
                                           c["banned"])
  dist = sampling.candidates(jnp.asarray(logits), cfg)
  every = jnp.broadcast_to(jnp.arange(v), (n, v))
  spread = sampling.Candidates(dist.log_probs[:, None],
                               None if dist.ids is None else dist.ids[:, None])
  got = np.asarray(sampling.log_prob_of(spread, every), np.float64)
  ent = np.asarray(sampling.entropy(dist), np.float64)
  scale = np.abs(logits).max() / c["temperature"]
  atol = 1e-5 + 8 * U32 * scale  # float32 log-softmax of logits up to `scale`
  for i in np.flatnonzero(~ambiguous):
    np.testing.assert_array_equal(np.isinf(got[i]), np.isinf(want[i]), err_msg=f"row {i}")
    kept = np.isfinite(want[i])
    np.testing.assert_allclose(got[i][kept], want[i][kept], rtol=0, atol=atol)
    np.testing.assert_allclose(ent[i], np_entropy(want[i]), rtol=0, atol=1e-4 + atol)
    np.testing.assert_allclose(np.exp(got[i][kept]).sum(), 1.0, atol=1e-5)
  # Greedy: the most likely token, the lowest id among ties.
  greedy = sampling.draw(dist, None)
  for i in np.flatnonzero(~ambiguous):
    assert int(greedy.tokens[i]) == int(np.argmax(want[i])), (i, logits[i])
  # Inverse-CDF draws: a kept token of positive probability, the one numpy's inverse CDF picks
  # unless the uniform is within rounding of a CDF step, and monotone in the uniform.
  rng = np.random.default_rng(seed)
  uniform = np.sort(np.concatenate([[0.0, 1 - 2 ** -24], rng.random(K - 2)])).astype(np.float32)
  rows = np.repeat(np.arange(n), K)
  rep = sampling.Candidates(jnp.repeat(dist.log_probs, K, axis=0),
                            None if dist.ids is None else jnp.repeat(dist.ids, K, axis=0))
  drawn = sampling.draw(rep, jnp.asarray(np.tile(uniform, n)))
  tokens = np.asarray(drawn.tokens)
  p32 = np.exp(np.asarray(rep.log_probs))
  cand_index = (tokens if rep.ids is None
                else (np.asarray(rep.ids) == tokens[:, None]).argmax(1))
  assert np.all(p32[np.arange(n * K), cand_index] > 0), "drew a token of probability 0"
  np.testing.assert_allclose(np.asarray(drawn.log_probs), got[rows, tokens], rtol=0, atol=atol)
  for i in range(n):
    assert np.all(np.diff(cand_index[i * K:(i + 1) * K]) >= 0)
    if ambiguous[i]:
      continue
    p = np.exp(want[i])
    seq = order[i] if order is not None else np.arange(v)
    cdf = np.cumsum(p[seq])
    for u, t in zip(uniform, tokens[i * K:(i + 1) * K]):
      target = u * cdf[-1]
      if np.min(np.abs(cdf - target)) < 1e-5:
        continue  # at a step of the CDF: either neighbour is right
      assert t == seq[np.searchsorted(cdf, target, side="right")], (i, u, t)


@SETTINGS
@given(data=st.data())
def test_sampling_distribution_and_draws_match_numpy(data):
  logits = data.draw(logit_rows())
  check_sampling(logits, data.draw(configs(logits.shape[1])), data.draw(st.integers(0, 2 ** 31)))


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (2, 1.0), (0, 0.6), (40, 0.99)])
def test_sampling_edge_rows(top_k, top_p):
  """Two tokens tied at +1e4 (the rest at -1e4: probability 0 in float32), a flat row, one token
  at +1e4 in the last (partial) CDF block, and alternating ties."""
  logits = np.full((4, 65), -1e4, np.float32)
  logits[0, [3, 40]] = 1e4
  logits[1] = 0.0
  logits[2, 64] = 1e4
  logits[3] = np.arange(65) % 2
  check_sampling(logits, dict(temperature=1.0, top_k=top_k, top_p=top_p, banned=()), seed=0)
  dist = sampling.candidates(jnp.asarray(logits), sampler_config(
      dict(temperature=1.0, top_k=top_k, top_p=top_p, banned=())))
  ent = np.asarray(sampling.entropy(dist))
  np.testing.assert_allclose(ent[0], np.log(2), atol=1e-6)  # two tokens at 1/2
  assert int(sampling.draw(dist, None).tokens[0]) == 3      # the lower id of the tie
  np.testing.assert_allclose(ent[2], 0.0, atol=1e-6)


@pytest.mark.parametrize("top_p, kept", [(0.5, 4), (0.25, 2), (0.3, 3), (1.0, 8)])
def test_nucleus_is_the_shortest_prefix_reaching_top_p(top_p, kept):
  """Eight equal logits: each token has probability 1/8 exactly, so the prefix masses are exact
  and the nucleus boundary is not a matter of rounding."""
  dist = sampling.candidates(jnp.zeros((1, 8)), sampler_config(
      dict(temperature=1.0, top_k=0, top_p=top_p, banned=())))
  logp = np.asarray(sampling.log_prob_of(
      sampling.Candidates(dist.log_probs[:, None], None if dist.ids is None else dist.ids[:, None]),
      jnp.arange(8)[None]))[0]
  np.testing.assert_array_equal(np.isfinite(logp), np.arange(8) < kept)  # ties: lower ids first
  np.testing.assert_allclose(logp[:kept], -np.log(kept), atol=1e-6)
  np.testing.assert_allclose(sampling.entropy(dist), [np.log(kept)], atol=1e-6)


@pytest.mark.parametrize("top_k", [1, 3])
def test_top_k_ties_keep_the_lowest_ids(top_k):
  logits = jnp.asarray([[0.0, 2.0, 2.0, 1.0, 2.0, 2.0]])
  dist = sampling.candidates(logits, sampler_config(
      dict(temperature=1.0, top_k=top_k, top_p=1.0, banned=())))
  np.testing.assert_array_equal(np.asarray(dist.ids)[0], [1, 2, 4][:top_k])
  assert int(sampling.draw(dist, None).tokens[0]) == 1
