"""The sampling distribution (openvlthinker.sampling) against a float64 numpy reference."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import numpy_sampling as ref
from openvlthinker import sampling
from openvlthinker.sampler import SamplerConfig


def _config(**kw):
  return SamplerConfig(max_new_tokens=1, **{"stop_tokens": (), **kw})


@functools.partial(jax.jit, static_argnums=2)
def _evaluate(logits, tokens, cfg):
  """log p of every token [N, V], entropy [N] and the greedy draw of the sampling distribution."""
  dist = sampling.candidates(logits, cfg)
  spread = sampling.Candidates(dist.log_probs[:, None],
                               None if dist.ids is None else dist.ids[:, None])
  return sampling.log_prob_of(spread, tokens), sampling.entropy(dist), sampling.draw(dist, None)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2 ** 31 - 1), vocab=st.sampled_from([7, 64, 130]),
       temperature=st.sampled_from([0.5, 1.0, 1.7]), top_k=st.sampled_from([0, 1, 5, 200]),
       top_p=st.sampled_from([1.0, 0.9, 0.3]), n_banned=st.integers(0, 3))
def test_distribution_matches_numpy(seed, vocab, temperature, top_k, top_p, n_banned):
  rng = np.random.default_rng(seed)
  logits = (rng.normal(size=(3, vocab)) * 3).astype(np.float32)
  banned = tuple(int(b) for b in rng.choice(vocab, n_banned, replace=False))
  cfg = _config(temperature=temperature, top_k=top_k, top_p=top_p, banned_tokens=banned)
  want = ref.sampling_log_probs(logits, temperature, top_k, top_p, banned)

  every = np.broadcast_to(np.arange(vocab), (3, vocab))
  got, ent, greedy = _evaluate(jnp.asarray(logits), jnp.asarray(every), cfg)
  got = np.asarray(got)
  np.testing.assert_array_equal(np.isinf(got), np.isinf(want))  # The same tokens removed.
  np.testing.assert_allclose(got[np.isfinite(want)], want[np.isfinite(want)], atol=1e-5)
  np.testing.assert_allclose(ent, ref.entropy(want), atol=1e-5)
  tokens = np.argmax(want, axis=-1)
  np.testing.assert_array_equal(greedy.tokens, tokens)
  np.testing.assert_allclose(greedy.log_probs, want[np.arange(3), tokens], atol=1e-5)
  np.testing.assert_allclose(greedy.entropy, ref.entropy(want), atol=1e-5)


@pytest.mark.parametrize("top_p", [0.05, 0.5, 1.0])
def test_draw_never_returns_a_removed_token(top_p):
  """Uniforms at 0, at and just below 1, and at random, over a vocabulary that is mostly banned
  (with top-p, the removed tokens fill the last blocks): every draw has positive probability."""
  vocab = 300
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(vocab,)).astype(np.float32)
  allowed = rng.choice(vocab, 9, replace=False)
  banned = tuple(int(i) for i in np.setdiff1d(np.arange(vocab), allowed))
  cfg = _config(top_p=top_p, banned_tokens=banned)
  # 1.0 stands in for uniform · total rounding up to the total.
  edges = np.array([0.0, 1e-9, 0.5, 1 - 2 ** -24, 1 - 1e-7, 1.0], np.float32)
  uniform = np.concatenate([edges, rng.random(2000, dtype=np.float32)])
  logits = np.broadcast_to(logits, (uniform.size, vocab))
  out = sampling.draw(sampling.candidates(jnp.asarray(logits), cfg), jnp.asarray(uniform))
  want = ref.sampling_log_probs(logits[:1], top_p=top_p, banned=banned)[0]
  assert np.isfinite(want[np.asarray(out.tokens)]).all()
  np.testing.assert_allclose(out.log_probs, want[np.asarray(out.tokens)], atol=1e-5)
  # And the draw is a proper inverse CDF: token order follows the uniforms' order.
  kept = np.flatnonzero(np.isfinite(want))
  order = kept if top_p == 1.0 else kept[np.argsort(-want[kept], kind="stable")]
  position = {int(t): i for i, t in enumerate(order)}
  ranks = np.array([position[int(t)] for t in np.asarray(out.tokens)])
  assert np.all(np.diff(ranks[np.argsort(uniform, kind="stable")]) >= 0)


def test_inverse_cdf_frequencies_match_probabilities():
  """Uniforms on a fine grid hit each token in proportion to its probability."""
  rng = np.random.default_rng(1)
  vocab = 200
  logits = rng.normal(size=(vocab,)).astype(np.float32) * 2
  n = 20_000
  uniform = (np.arange(n, dtype=np.float64) + 0.5) / n
  dist = sampling.candidates(jnp.broadcast_to(jnp.asarray(logits), (n, vocab)), _config())
  counts = np.bincount(np.asarray(sampling.draw(dist, jnp.asarray(uniform, jnp.float32)).tokens),
                       minlength=vocab)
  p = np.exp(ref.log_softmax(logits))
  np.testing.assert_allclose(counts / n, p, atol=2.0 / n + 1e-6)


@pytest.mark.parametrize("kw, message", [
    (dict(temperature=0.0), "temperature: expected a number > 0 (greedy=True for argmax), got 0.0"),
    (dict(top_p=0.0), "top_p: expected a number in (0, 1] (1 = off), got 0.0"),
    (dict(top_k=-1), "top_k: expected an integer >= 0 (0 = off), got -1"),
    (dict(decode_phases=0), "decode_phases: expected a positive integer, got 0"),
    (dict(max_new_tokens=0), "max_new_tokens: expected a positive integer, got 0"),
    (dict(compact=1), "compact: expected True or False, got 1"),
])
def test_config_errors_name_the_field_and_what_was_expected(kw, message):
  with pytest.raises(ValueError) as e:
    SamplerConfig(**{"max_new_tokens": 2, **kw})
  assert str(e.value) == message

