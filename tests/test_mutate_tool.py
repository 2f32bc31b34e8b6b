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
  out = mutate.summary(names, status, equivalent={names[1]})
  assert out["all"]["ran"] == 4 and out["all"]["killed"] == 2  # a timeout is a kill
  assert out["all"]["kill_rate"] == 0.5  # "no tests" counts against, "skipped" not at all
  assert out["all"]["equivalent"] == 1 and out["all"]["score"] == 2 / 3  # killed / non-equivalent
  assert out["all"]["score_interval_95"] == list(mutate.wilson(2, 3))
  assert out["openvlthinker/rl"]["kill_rate"] == 0.5 and out["openvlthinker/rl"]["score"] == 1.0
  assert out["openvlthinker/train"]["score"] == 0.5
  assert out["openvlthinker/sampler.py"]["ran"] == 0
  assert out["openvlthinker/sampler.py"]["kill_rate"] is None
  assert out["openvlthinker/sampler.py"]["score"] is None


def test_the_equivalent_list_is_read_block_by_block(tmp_path):
  path = tmp_path / "eq.txt"
  path.write_text("# a comment\n\nopenvlthinker.rl.a.x_f__mutmut_1\n+    x = 1  \nwhy, line one\n"
                  "line two\n\nopenvlthinker.rl.a.x_f__mutmut_2\n+    y = None\nwhy\n")
  assert mutate.read_equivalents(str(path)) == {"openvlthinker.rl.a.x_f__mutmut_1": "+    x = 1",
                                                "openvlthinker.rl.a.x_f__mutmut_2": "+    y = None"}
  for bad in ("openvlthinker.rl.a.x_f__mutmut_1\n+    x = 1\n",  # no reason
              "openvlthinker.rl.a.x_f__mutmut_1\n    x = 1\nwhy\n"):  # no changed line
    path.write_text(bad)
    with pytest.raises(ValueError, match="openvlthinker.rl.a.x_f__mutmut_1: expected one block"):
      mutate.read_equivalents(str(path))


def test_the_projects_equivalent_list_reads_and_names_mutants():
  listed = mutate.read_equivalents()
  assert len(listed) >= 20
  for name, changed in listed.items():
    assert name.startswith("openvlthinker.") and "__mutmut_" in name, name
    assert changed.startswith("+") and changed[1:].strip(), name
    assert mutate.area(name) in ("openvlthinker/rl", "openvlthinker/train",
                                 "openvlthinker/sampler.py"), name


def test_changed_lines_are_the_diffs_additions():
  diff = ("# name: survived\n--- a.py\n+++ a.py\n@@ -1,3 +1,3 @@\n def f():\n-    x = 1\n"
          "+    x = 2   \n")
  assert mutate.changed_lines(diff) == ["+    x = 2"]


def test_patterns_select_mutants():
  assert mutate.matches("openvlthinker.rl.a.x_f__mutmut_1", [])
  assert mutate.matches("openvlthinker.rl.a.x_f__mutmut_1", ["openvlthinker.rl.*"])
  assert not mutate.matches("openvlthinker.train.b.x_g__mutmut_1", ["openvlthinker.rl.*"])
