"""mean@K, pass@k and their intervals against a direct computation (math.comb, numpy)."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from openvlthinker.eval import metrics


def direct_pass_at_k(n, c, k):
  """1 - C(n - c, k) / C(n, k) in exact integers (Chen et al., 2021)."""
  return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 40), data=st.data())
def test_pass_at_k_equals_the_binomial_formula(n, data):
  k = data.draw(st.integers(1, n))
  c = np.asarray(data.draw(st.lists(st.integers(0, n), min_size=1, max_size=6)))
  got = metrics.pass_at_k(n, c, k)
  want = [direct_pass_at_k(n, int(ci), k) for ci in c]
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_pass_at_k_rejects_k_beyond_n_and_bad_counts():
  with pytest.raises(ValueError, match="k <= n"):
    metrics.pass_at_k(4, np.array([1]), 5)
  with pytest.raises(ValueError, match=r"\[0, 4\]"):
    metrics.pass_at_k(4, np.array([5]), 2)


def test_summary_equals_numpy_on_made_up_accuracies():
  rng = np.random.default_rng(0)
  p, k = 37, 8
  # A mix of binary accuracies and partial credit (IoU-like), per problem and sample.
  accuracy = np.where(rng.random((p, k)) < 0.5, rng.integers(0, 2, (p, k)), rng.random((p, k)))
  passed = accuracy >= 0.5
  s = metrics.summarize(accuracy, passed)
  per_problem = accuracy.mean(axis=1)
  assert s["problems"] == p and s["samples"] == k
  assert s["mean@8"] == pytest.approx(per_problem.mean(), abs=1e-12)
  assert s["mean@8_ci"] == pytest.approx(
      1.959963984540054 * per_problem.std(ddof=1) / np.sqrt(p), abs=1e-12)
  counts = passed.sum(axis=1)
  for j in (1, 2, 4, 8):
    direct = np.array([direct_pass_at_k(k, int(c), j) for c in counts])
    assert s[f"pass@{j}"] == pytest.approx(direct.mean(), abs=1e-12)
    assert s[f"pass@{j}_ci"] == pytest.approx(
        1.959963984540054 * direct.std(ddof=1) / np.sqrt(p), abs=1e-12)
  # pass@1 is the mean pass rate; pass@K is the share of problems with any passing sample.
  assert s["pass@1"] == pytest.approx(passed.mean(), abs=1e-12)
  assert s["pass@8"] == pytest.approx((counts > 0).mean(), abs=1e-12)


def test_one_sample_per_problem_reduces_to_plain_accuracy():
  accuracy = np.array([[1.0], [0.0], [1.0], [1.0]])
  s = metrics.summarize(accuracy, accuracy >= 0.5)
  assert s["mean@1"] == s["pass@1"] == 0.75
  assert set(k for k in s if k.startswith("pass@") and not k.endswith("_ci")) == {"pass@1"}


def test_reported_ks_and_groups():
  assert metrics.default_ks(1) == (1,)
  assert metrics.default_ks(8) == (1, 2, 4, 8)
  assert metrics.default_ks(6) == (1, 2, 4, 6)
  accuracy = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
  groups = metrics.summarize_groups(accuracy, accuracy >= 0.5, ["a", "b", "a"])
  assert list(groups) == ["a", "b"]
  assert groups["a"]["mean@2"] == 0.75 and groups["a"]["pass@2"] == 1.0
  assert groups["b"]["problems"] == 1 and groups["b"]["pass@2_ci"] == 0.0
