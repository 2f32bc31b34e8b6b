"""JsonSource reads the public OpenVLThinkerV2 format (JSON in fixtures/, images made here)."""
import json
import os
import shutil

import numpy as np
from PIL import Image
import pytest

from openvlthinker.data import json_source
from openvlthinker.data import prompts

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
# The pixels each fixture path must hold: distinct sizes and colours.
IMAGES = {
    "imgs/red.png": np.full((8, 6, 3), (255, 0, 0), np.uint8),
    "imgs/green.png": np.full((5, 5, 3), (0, 255, 0), np.uint8),
    "imgs/white.png": np.full((4, 4, 3), 255, np.uint8),
    "imgs/sub/black.png": np.zeros((3, 7, 3), np.uint8),
    "imgs/wide.png": np.arange(2 * 9 * 3, dtype=np.uint8).reshape(2, 9, 3),
}


def _write_images(root, names=tuple(IMAGES)):
  for name in names:
    os.makedirs(os.path.join(root, os.path.dirname(name)), exist_ok=True)
    Image.fromarray(IMAGES[name]).save(os.path.join(root, name))


@pytest.fixture(params=["public_format.jsonl", "public_format.json"])
def fixture_file(request, tmp_path):
  path = tmp_path / request.param
  shutil.copy(os.path.join(FIXTURES, request.param), path)
  return path


def test_reads_public_format(fixture_file, tmp_path):
  _write_images(tmp_path)
  source = json_source.JsonSource(str(fixture_file))
  assert len(source) == 4 and source.num_skipped == 0
  got = {source[i].uid: source[i] for i in range(len(source))}
  assert sorted(got) == ["1", "2", "3", "4"]
  # Expected values written out by hand from the fixture text.
  assert [got[u].answer for u in "1234"] == ["3", "B", "A", "naïve café  ∑ x_{0}"]
  assert [got[u].problem_type for u in "1234"] == ["numerical", "multiple choice",
                                                   "multiple choice", "ocr"]
  assert [got[u].task_type for u in "1234"] == ["spatial_reasoning", "general_vqa",
                                                "general_vqa", "ocr"]
  assert got["2"].options == ("A. red", "B. green", "C. blue") and got["4"].options == ()
  assert got["3"].question == "Compare <image> with <image>: which is brighter?"
  assert got["1"].meta["data_source"] == "fixture" and got["1"].reasoning == ""
  assert got["3"].meta["image_sizes"] == [[4, 4], [3, 7]]
  for uid, names in {"1": ["imgs/red.png"], "2": ["imgs/green.png"], "4": ["imgs/wide.png"],
                     "3": ["imgs/white.png", "imgs/sub/black.png"]}.items():
    assert len(got[uid].images) == len(names)
    for image, name in zip(got[uid].images, names):
      np.testing.assert_array_equal(image, IMAGES[name])
  # Placeholders in the question are used in place: no extra <image> prefix.
  assert prompts.prompt_text(got["3"]).startswith("Compare <image> with <image>: which")
  assert prompts.prompt_text(got["1"]).count("<image>") == 1


def test_by_task_groups_records(fixture_file, tmp_path):
  _write_images(tmp_path)
  by_task = json_source.JsonSource(str(fixture_file)).by_task()
  uids = {t: sorted(s[i].uid for i in range(len(s))) for t, s in by_task.items()}
  assert uids == {"spatial_reasoning": ["1"], "general_vqa": ["2", "3"], "ocr": ["4"]}


def test_missing_image_names_record_and_path(fixture_file, tmp_path):
  _write_images(tmp_path, names=[n for n in IMAGES if n != "imgs/sub/black.png"])
  with pytest.raises(FileNotFoundError, match=r"problem_id 3.*imgs/sub/black\.png"):
    json_source.JsonSource(str(fixture_file))
  source = json_source.JsonSource(str(fixture_file), skip_missing_images=True)
  assert source.num_skipped == 1 and len(source) == 3
  assert "problem_id 3" in source.skipped[0][0]
  assert sorted(source[i].uid for i in range(3)) == ["1", "2", "4"]


def test_image_root_overrides_the_file_directory(fixture_file, tmp_path):
  _write_images(tmp_path / "elsewhere")
  source = json_source.JsonSource(str(fixture_file), image_root=str(tmp_path / "elsewhere"))
  np.testing.assert_array_equal(source[0].images[0], IMAGES["imgs/red.png"])


def test_shared_sample_names_its_first_missing_file(tmp_path):
  # A copy of shared/data/openvlthinker_v2_format_sample.json, whose images are not shipped.
  path = os.path.join(FIXTURES, "openvlthinker_v2_format_sample.json")
  missing = r"problem_id 7.*Spatial-Grounding/train2014/COCO_train2014_000000355231\.jpg"
  with pytest.raises(FileNotFoundError, match=missing):
    json_source.JsonSource(path, image_root=str(tmp_path))
  source = json_source.JsonSource(path, image_root=str(tmp_path), skip_missing_images=True)
  with open(path) as f:
    assert source.num_skipped == len(json.load(f)) and len(source) == 0


def _one_record(tmp_path, **changes):
  record = {"problem_id": 9, "problem": "<image> q?", "problem_type": "numerical",
            "task_type": "chart_figure_qa", "answer": "<answer>1</answer>",
            "images": ["a.png"], **changes}
  record = {k: v for k, v in record.items() if v is not Ellipsis}
  path = tmp_path / "one.json"
  path.write_text(json.dumps([record]))
  _write_images(tmp_path, names=["imgs/red.png"])
  shutil.copy(tmp_path / "imgs/red.png", tmp_path / "a.png")
  return str(path)


@pytest.mark.parametrize("changes, pattern", [
    ({"answer": ...}, r"one\.json\[0\] \(problem_id 9\): missing field 'answer'"),
    ({"problem": 5}, r"problem_id 9.*field 'problem' must be str"),
    ({"images": "a.png"}, r"problem_id 9.*field 'images' must be list"),
    ({"options": ["A. x", 3]}, r"problem_id 9.*field 'options' must be a list of strings"),
    ({"task_type": "cooking"}, r"problem_id 9.*task_type: got 'cooking'"),
    ({"problem_type": "essay"}, r"problem_id 9.*problem_type: got 'essay'"),
    ({"problem": "<image><image> q?"}, r"problem_id 9.*2 <image> placeholders.*1 files"),
])
def test_malformed_record_names_record_and_field(tmp_path, changes, pattern):
  path = _one_record(tmp_path, **changes)
  with pytest.raises(ValueError, match=pattern):
    json_source.JsonSource(path)


def test_valid_single_record_reads(tmp_path):
  example = json_source.JsonSource(_one_record(tmp_path))[0]
  assert (example.answer, example.task_type, example.uid) == ("1", "chart_figure_qa", "9")


def test_bad_jsonl_line_and_bad_top_level(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"problem": "x"}\n\n{oops\n')
  with pytest.raises(ValueError, match=r"bad\.jsonl:3: not valid JSON"):
    json_source.JsonSource(str(bad))
  obj = tmp_path / "obj.json"
  obj.write_text('{"problem": "x"}')
  with pytest.raises(ValueError, match=r"obj\.json: expected a JSON list"):
    json_source.JsonSource(str(obj))


def test_unreadable_image_names_record(tmp_path):
  path = _one_record(tmp_path)
  (tmp_path / "a.png").write_bytes(b"not a png")
  source = json_source.JsonSource(path)
  with pytest.raises(ValueError, match=r"problem_id 9.*cannot read image .*a\.png"):
    source[0]
