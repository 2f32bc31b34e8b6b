"""JsonSource reads the public OpenVLThinkerV2 format (JSON in fixtures/, images made here)."""
import io
import json
import os
import re
import shutil
import struct
import zlib

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
  source = json_source.JsonSource(str(fixture_file), skip_bad_records=True)
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
  # Skipping them all leaves nothing to train on: that is an error too, saying so.
  with pytest.raises(ValueError, match=r"openvlthinker_v2_format_sample\.json: all 7 records were "
                     r"skipped \(7 missing image; first: .*problem_id 7.*COCO_train2014"):
    json_source.JsonSource(path, image_root=str(tmp_path), skip_bad_records=True)


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


# ---------------------------------------------------------------------- ground truth


@pytest.mark.parametrize("answer, pattern", [
    ("<answer>3", r"closing </answer> is missing"),
    ("3</answer>", r"opening <answer> is missing"),
    ("<answer>1</answer> <answer>2</answer>", r"one <answer>…</answer> pair"),
])
@pytest.mark.parametrize("skip", [False, True])
def test_broken_answer_tags_name_record_and_field(tmp_path, answer, pattern, skip):
  # A malformed file, not a bad problem: an error even when skipping bad records.
  path = _one_record(tmp_path, answer=answer)
  with pytest.raises(ValueError, match=r"^record one\.json\[0\] \(problem_id 9\): field "
                     r"'answer': expected .*" + pattern):
    json_source.JsonSource(path, skip_bad_records=skip)


def _two_records(tmp_path, problem_type, answer, options):
  """one.jsonl: line 1 a good record, line 3 (problem_id 7) the one under test."""
  good = {"problem_id": 1, "problem": "<image> q?", "problem_type": "numerical",
          "task_type": "ocr", "answer": "<answer>1</answer>", "images": ["a.png"]}
  bad = dict(good, problem_id=7, problem_type=problem_type, answer=answer, options=options)
  path = tmp_path / "one.jsonl"
  path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
  Image.fromarray(IMAGES["imgs/red.png"]).save(tmp_path / "a.png")
  return str(path)


@pytest.mark.parametrize("problem_type, answer, options, reason", [
    ("OCR", "<answer></answer>", [], r"expected a non-empty ocr answer"),
    ("math", "<answer>  </answer>", [], r"expected a non-empty math answer"),
    ("open-ended", "<answer>?!</answer>", [], r"expected at least one word"),
    ("multiple choice", "<answer>E</answer>", ["A. x", "B. y"], r"option letter \(A, B\), got 'E'"),
    ("numerical", "<answer>three</answer>", [], r"expected a finite number, got 'three'"),
    ("regression", "<answer>nan</answer>", [], r"expected a finite number"),
    ("spatial grounding", '<answer>{"boxes": [9, 9, 1, 1]}</answer>', [], r"x2 > x1 and y2 > y1"),
])
def test_unusable_ground_truth_is_rejected_or_skipped(tmp_path, problem_type, answer, options,
                                                      reason):
  path = _two_records(tmp_path, problem_type, answer, options)
  with pytest.raises(ValueError, match=r"^record one\.jsonl:3 \(problem_id 7\): field 'answer': .*"
                     + reason + r".*\(set data\.skip_bad_records to skip such records\)$"):
    json_source.JsonSource(path)
  source = json_source.JsonSource(path, skip_bad_records=True)
  assert len(source) == 1 and source[0].uid == "1"
  assert source.num_skipped == 1 and source.skipped[0][0] == "one.jsonl:3 (problem_id 7)"
  assert re.search(reason, source.skipped[0][1])


# ---------------------------------------------------------------------- data-file errors


@pytest.mark.parametrize("name", ["bad.jsonl", "bad.json"])
def test_non_utf8_bytes_name_file_line_and_column(tmp_path, name):
  good = json.dumps({"problem": "x"}).encode()
  bad = '{"problem": "ü'.encode() + b"\xff" + b'"}'  # column counts characters: ü is one
  if name.endswith(".jsonl"):
    body = good + b"\n\n" + bad
  else:
    body = b"[\n" + good + b",\n" + bad + b"]"
  (tmp_path / name).write_bytes(body)
  with pytest.raises(ValueError, match=r"^" + re.escape(name) + r":3: not valid UTF-8 \(byte 0xff "
                     r"at column 15\)$"):
    json_source.JsonSource(str(tmp_path / name))


@pytest.mark.parametrize("name, body, pattern", [
    ("x.jsonl", b"", r"x\.jsonl: no records \(the file is empty\)"),
    ("x.json", b" \n\t", r"x\.json: no records \(the file is empty\)"),
    ("x.json", b"[]", r"x\.json: no records \(the file holds an empty list\)"),
    ("x.jsonl", b"\n\n  \n", r"x\.jsonl: no records \(the file is empty\)"),
    ("x.jsonl", b"\xef\xbb\xbf", r"x\.jsonl: no records \(the file is empty\)"),
    ("x.json", b"[1,\n2,\n", r"x\.json:3: not valid JSON"),
])
def test_files_without_records_say_so(tmp_path, name, body, pattern):
  (tmp_path / name).write_bytes(body)
  with pytest.raises(ValueError, match="^" + pattern):
    json_source.JsonSource(str(tmp_path / name))


def test_a_byte_order_mark_is_allowed(tmp_path):
  path = _one_record(tmp_path)
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(b"\xef\xbb\xbf" + data)
  assert json_source.JsonSource(path)[0].uid == "9"


# ---------------------------------------------------------------------- undecodable images


def _png(pixels):
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format="PNG")
  return out.getvalue()


def _huge_header():
  """A PNG header claiming 12000 x 12000 pixels over a few bytes of data."""
  png = bytearray(_png(np.zeros((1, 1, 3), np.uint8)))
  png[16:24] = struct.pack(">II", 12_000, 12_000)
  png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
  return bytes(png)


BAD_IMAGES = {
    "random bytes": (np.random.default_rng(0).bytes(300), r"not an image file PIL can identify"),
    "empty file": (b"", r"the file is empty"),
    "truncated": (_png(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))[:5000],
                  r"truncated"),
    "bomb": (_huge_header(), r"12000x12000 = 144000000 pixels, more than "
             r"data\.max_image_pixels = 100000000"),
}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("kind", BAD_IMAGES)
def test_undecodable_image_is_a_fault_of_its_record(tmp_path, kind):
  data, reason = BAD_IMAGES[kind]
  path = _one_record(tmp_path)
  (tmp_path / "a.png").write_bytes(data)
  source = json_source.JsonSource(path)  # the start-up check only sees that the file exists
  with pytest.raises(ValueError) as e:
    source[0]
  assert re.fullmatch(r"record one\.json\[0\] \(problem_id 9\): cannot read image "
                      + re.escape(str(tmp_path / "a.png")) + ": .*" + reason + ".*", str(e.value))
  assert "\n" not in str(e.value)
  bad = json_source.JsonSource(path, skip_bad_records=True)[0]
  assert isinstance(bad, json_source.BadRecord)
  assert (bad.reason, bad.uid, bad.message) == ("bad_image", "9", str(e.value))


def test_max_image_pixels_is_the_configured_limit(tmp_path):
  path = _one_record(tmp_path)  # an 8 x 6 image
  assert json_source.JsonSource(path, max_image_pixels=48)[0].images[0].shape == (8, 6, 3)
  with pytest.raises(ValueError, match=r"problem_id 9.*a\.png: 6x8 = 48 pixels, more than "
                     r"data\.max_image_pixels = 47$"):
    json_source.JsonSource(path, max_image_pixels=47)[0]
  with pytest.raises(ValueError, match=r"data\.max_image_pixels: expected a positive int"):
    json_source.JsonSource(path, max_image_pixels=0)


def test_a_16_bit_png_reads_as_its_levels(tmp_path):
  path = _one_record(tmp_path)
  levels = np.array([[0, 257, 32896, 65535]], np.uint16)
  Image.fromarray(levels).save(tmp_path / "a.png")
  assert json_source.JsonSource(path)[0].images[0][..., 0].tolist() == [[0, 1, 128, 255]]
