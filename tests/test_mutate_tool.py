"""`tools/mutate.py`'s arithmetic (`make mutate`): which area a mutant belongs to, the kill rate
over the mutants that ran, and its Wilson interval against known values."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))
import mutate  # noqa: E402


def test_area_of_a_mutant():
  assert mutate.area("openvlthinker.rl.advantages.x_gdpo_advantages__mutmut_3") == \
      "openvlthinker/rl"
  assert mutate.area("openvlthinker.sampler.xǁSamplerǁ__call____mutmut_1") == \
      "openvlthinker/sampler.py"
  assert mutate.area("openvlthinker.train.batch.x_collate__mutmut_12") == "openvlthinker/train"


def test_wilson_interval_is_where_the_score_test_rejects():
  # Its bounds are the p at which |k/n - p| = z * sqrt(p (1 - p) / n): solved here directly.
  for k, n in ((90, 100), (3, 40), (199, 200)):
    for p in mutate.wilson(k, n):
      assert (k / n - p) ** 2 == pytest.approx(1.96 ** 2 * p * (1 - p) / n, rel=1e-9)
  assert mutate.wilson(90, 100) == pytest.approx((0.8256, 0.9448), abs=1e-4)
  assert mutate.wilson(0, 10)[0] == 0.0 and mutate.wilson(10, 10)[1] == 1.0
  assert mutate.wilson(0, 0) == (0.0, 1.0)


def test_kill_rate_counts_the_mutants_that_ran():
  names = ["openvlthinker.rl.a.x_f__mutmut_1", "openvlthinker.rl.a.x_f__mutmut_2",
           "openvlthinker.train.b.x_g__mutmut_1", "openvlthinker.train.b.x_g__mutmut_2",
           "openvlthinker.sampler.x_h__mutmut_1"]
  status = dict(zip(names, ["killed", "survived", "timeout", "no tests", "skipped"]))
  out = mutate.summary(names, status)
  assert out["all"]["ran"] == 4 and out["all"]["killed"] == 2  # a timeout is a kill
  assert out["all"]["kill_rate"] == 0.5  # "no tests" counts against, "skipped" not at all
  assert out["openvlthinker/rl"]["kill_rate"] == 0.5
  assert out["openvlthinker/sampler.py"]["ran"] == 0
  assert out["openvlthinker/sampler.py"]["kill_rate"] is None


def test_patterns_select_mutants():
  assert mutate.matches("openvlthinker.rl.a.x_f__mutmut_1", [])
  assert mutate.matches("openvlthinker.rl.a.x_f__mutmut_1", ["openvlthinker.rl.*"])
  assert not mutate.matches("openvlthinker.train.b.x_g__mutmut_1", ["openvlthinker.rl.*"])
