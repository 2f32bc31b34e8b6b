"""The task registry: the Example contract, determinism, random access and the held-out split."""
import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from openvlthinker import taxonomy
from openvlthinker.rl import shaping
from openvlthinker.tasks import registry
from openvlthinker.tasks.base import Example

# Task ids key checkpoints, metrics and seed streams: this order must never change.
HISTORIC_TASK_TYPES = ("spatial_grounding", "spatial_reasoning", "general_vqa", "math_reasoning",
                       "chart_figure_qa", "ocr")


def test_every_task_type_is_registered_with_its_problem_types():
  assert registry.all_task_types() == taxonomy.TASK_TYPES
  for name in taxonomy.TASK_TYPES:
    spec = registry.get_task(name)
    assert spec.name == name and set(spec.problem_types) <= set(taxonomy.PROBLEM_TYPES)
  assert registry.get_task("general_vqa_science_stem").name == "general_vqa"


@pytest.mark.parametrize("task_type", taxonomy.TASK_TYPES)
@pytest.mark.parametrize("image_size", [48, 64, 80])
def test_examples_honour_the_contract(task_type, image_size):
  spec = registry.get_task(task_type)
  for index in range(12):
    ex = registry.generate(task_type, "train", index, index % 4, image_size)
    assert isinstance(ex, Example) and ex.task_type == task_type
    (image,) = ex.images
    assert image.dtype == np.uint8 and image.shape == (image_size, image_size, 3)
    assert ex.problem_type in spec.problem_types
    assert ex.question and ex.answer and ex.answer == ex.answer.strip()
    assert ex.reasoning == f"<thinking>{_thinking(ex)}</thinking><answer>{ex.answer}</answer>"
    if ex.problem_type == "multiple choice":
      letters = "ABCDEFGHIJ"[:len(ex.options)]
      assert [o[:3] for o in ex.options] == [f"{c}. " for c in letters]
      assert ex.answer in letters and len(ex.options) >= 2
    else:
      assert ex.options == ()
    assert ex.uid == f"{task_type}/train/d{index % 4}/s{image_size}/{index}"
    assert ex.meta["split"] == "train" and ex.meta["index"] == index
    # Plain Python values only, so records serialise (JSON, TFDS) without numpy types.
    assert json.loads(json.dumps(ex.meta))["scene"] == ex.meta["scene"]
    assert "np." not in ex.meta["scene"]


def _thinking(ex):
  return re.fullmatch(r"<thinking>(.*)</thinking><answer>.*</answer>", ex.reasoning, re.S)[1]


@pytest.mark.parametrize("task_type", taxonomy.TASK_TYPES)
def test_generation_is_a_pure_function_of_its_arguments(task_type):
  forward = [registry.generate(task_type, "eval", i, 2) for i in range(8)]
  backward = [registry.generate(task_type, "eval", i, 2) for i in reversed(range(8))][::-1]
  for a, b in zip(forward, backward):
    assert np.array_equal(a.images[0], b.images[0])
    assert dataclasses.replace(a, images=()) == dataclasses.replace(b, images=())
  assert len({ex.meta["scene"] for ex in forward}) == 8  # distinct indices, distinct samples


@pytest.mark.parametrize("task_type", taxonomy.TASK_TYPES)
def test_held_out_split_is_disjoint_from_train(task_type):
  train = [registry.generate(task_type, "train", i, i % 4) for i in range(400)]
  held = [registry.generate(task_type, "eval", i, i % 4) for i in range(100)]
  # By construction: each scene's split is a fixed hash of the scene, whatever the seed.
  assert all(registry.split_of(task_type, ex.meta["scene"]) == "train" for ex in train)
  assert all(registry.split_of(task_type, ex.meta["scene"]) == "eval" for ex in held)
  # And observably: no shared scene, and no shared (image, question) pair.
  assert not {ex.meta["scene"] for ex in train} & {ex.meta["scene"] for ex in held}
  key = lambda ex: (ex.images[0].tobytes(), ex.question)  # noqa: E731
  assert not {key(ex) for ex in train} & {key(ex) for ex in held}


def test_seed_streams_of_the_splits_differ_in_their_first_word():
  a = registry.seed_entropy("ocr", "train", 7, 1, 64, 0)
  b = registry.seed_entropy("ocr", "eval", 7, 1, 64, 0)
  assert a[0] != b[0] and a[1:] == b[1:]


@pytest.mark.parametrize("kwargs, field", [
    ({"task_type": "poetry"}, "task_type"),
    ({"split": "test"}, "split"),
    ({"index": -1}, "index"),
    ({"index": 1.5}, "index"),
    ({"difficulty": 4}, "difficulty"),
    ({"difficulty": True}, "difficulty"),
    ({"image_size": 16}, "image_size"),
])
def test_bad_arguments_name_the_field(kwargs, field):
  args = {"task_type": "ocr", "split": "train", "index": 0, "difficulty": 0, "image_size": 64}
  args.update(kwargs)
  with pytest.raises(ValueError, match=field):
    registry.generate(**args)


def test_registering_a_name_twice_fails():
  registry.get_task("ocr")
  with pytest.raises(ValueError, match="already registered"):
    registry.register_task("ocr", ("ocr",), length_thresholds=(1, 2, 3, 4))(
        lambda rng, d, s: None)
  with pytest.raises(ValueError, match="already registered"):  # an alias is a name too
    registry.register_task("vqa", ("ocr",), length_thresholds=(1, 2, 3, 4),
                           aliases=("general_vqa_science_stem",))(lambda rng, d, s: None)


def test_registering_from_a_module_outside_task_modules_fails():
  with pytest.raises(ValueError, match="TASK_MODULES"):
    registry.register_task("poetry", ("open-ended",), length_thresholds=(1, 2, 3, 4))(
        lambda rng, d, s: None)
  assert "poetry" not in registry.TASKS


def test_taxonomy_is_the_registry_in_task_module_order_with_every_default():
  specs = registry.task_specs()
  assert taxonomy.TASK_TYPES == HISTORIC_TASK_TYPES == tuple(s.name for s in specs)
  assert tuple(s.module for s in specs) == registry.TASK_MODULES
  assert tuple(taxonomy.LENGTH_THRESHOLDS) == tuple(taxonomy.ENTROPY_BOUNDS) == HISTORIC_TASK_TYPES
  for spec in specs:
    assert spec.module.rsplit(".", 1)[1] == spec.name  # one module per task type, named for it
    l_min, l_low, l_high, l_max = spec.length_thresholds
    assert 0 <= l_min < l_low <= l_high < l_max
    h_min, h_max = spec.entropy_bounds
    assert 0 <= h_min <= h_max
  # The shaping defaults are the declared ones, row t for task id t.
  np.testing.assert_array_equal(shaping.static_thresholds(),
                                [s.length_thresholds for s in specs])
  np.testing.assert_array_equal(np.stack(shaping.EntropyShapingConfig().bounds(), 1),
                                np.float32([s.entropy_bounds for s in specs]))


# A seventh task type, as a contributor would add it: one module, one TASK_MODULES entry. It runs
# in a subprocess, so the registry and every table derived from it at import stay untouched here.
_TOY_MODULE = """
import numpy as np
from openvlthinker.tasks import registry
from openvlthinker.tasks.base import Example

@registry.register_task("toy_count", ("numerical",), length_thresholds=(1, 2, 3, 4),
                        entropy_bounds=(0.1, 0.3), aliases=("toy_counting",))
def sample(rng, difficulty=0, image_size=64):
  n = int(rng.integers(1, 100))
  return Example(images=(np.zeros((image_size, image_size, 3), np.uint8),),
                 question="How many?", answer=str(n), problem_type="numerical",
                 task_type="toy_count", meta={"scene": str(n)})
"""

_TOY_RUN = """
import json
from openvlthinker.tasks import registry
registry.TASK_MODULES += ("toy_task",)
from openvlthinker import configuration, taxonomy
from openvlthinker.rl import shaping
c = configuration.validate(configuration.base_config())
print(json.dumps({
    "task_types": taxonomy.TASK_TYPES,
    "id": taxonomy.task_id("toy_counting"),
    "thresholds": shaping.static_thresholds().tolist(),
    "entropy": [b.tolist() for b in shaping.EntropyShapingConfig().bounds()],
    "config": sorted(c.rl.length.thresholds) == sorted(c.rl.entropy.h_min) == sorted(
        c.data.mixture) == sorted(taxonomy.TASK_TYPES),
    "uid": registry.generate("toy_count", "eval", 3).uid,
}))
"""


def test_a_new_task_module_and_its_entry_reach_every_per_task_table(tmp_path):
  (tmp_path / "toy_task.py").write_text(_TOY_MODULE)
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), root]), JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", textwrap.dedent(_TOY_RUN)], env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  got = json.loads(out.stdout.strip().splitlines()[-1])
  assert tuple(got["task_types"]) == HISTORIC_TASK_TYPES + ("toy_count",)
  assert got["id"] == 6
  assert got["thresholds"][:6] == shaping.static_thresholds().tolist()
  assert got["thresholds"][6] == [1.0, 2.0, 3.0, 4.0]
  np.testing.assert_allclose([got["entropy"][0][6], got["entropy"][1][6]], [0.1, 0.3])
  assert got["config"]
  assert got["uid"] == "toy_count/eval/d0/s64/3"
