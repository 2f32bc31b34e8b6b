"""chart_figure_qa: the plotted data read back from the pixels, and each answer recomputed from
that data by this test's own formulas."""
import re

import numpy as np
import pytest

from openvlthinker.tasks import registry


def _check_drawn(ex, read_blobs):
  """Asserts the pixels show meta["data"]: bar heights and marker heights linear in the values,
  pie areas proportional to the shares."""
  data = ex.meta["data"]
  values = np.array(data["values"], float)
  blobs = read_blobs(ex.images[0])
  if data["chart"] == "bar":
    bars = sorted(blobs, key=lambda b: b.box[0])
    assert [b.color for b in bars] == data["labels"]
    heights = np.array([b.box[3] - b.box[1] for b in bars], float)
    bottoms = {b.box[3] for b in bars}
    assert len(bottoms) == 1  # one baseline
    unit = heights.max() / values.max()
    assert np.abs(heights - values * unit).max() <= 1.0, (heights, values)
  elif data["chart"] == "line":
    markers = sorted(blobs, key=lambda b: b.box[0])
    assert {b.color for b in markers} == set(data["labels"]) and len(markers) == len(values)
    ys = np.array([b.center[1] for b in markers])
    slope, offset = np.polyfit(values, ys, 1)
    assert slope < 0 and np.abs(ys - (slope * values + offset)).max() <= 1.0
  else:
    area = {}
    for b in blobs:
      area[b.color] = area.get(b.color, 0) + b.area
    total = sum(area.values())
    shares = np.array([area[c] / total for c in data["labels"]])
    assert np.abs(shares - values / 100).max() < 0.03, (shares, values)


def _expected(question, labels, values):
  """(kind, value) computed from the plotted data."""
  v = dict(zip(labels, values))
  if m := re.fullmatch(r"What is the value of the (\w+) bar\?", question):
    return "number", v[m[1]]
  if m := re.fullmatch(r"How much taller is the (\w+) bar than the (\w+) bar\?", question):
    assert v[m[1]] > v[m[2]]
    return "number", v[m[1]] - v[m[2]]
  if m := re.fullmatch(r"Which bar is the (tallest|shortest)\?", question):
    pick = max if m[1] == "tallest" else min
    return "option", pick(v, key=v.get)
  if m := re.fullmatch(r"What is the value at x = (\d)\?", question):
    return "number", values[int(m[1]) - 1]
  if question == "At which x is the value highest?":
    return "number", 1 + max(range(len(values)), key=values.__getitem__)
  if m := re.fullmatch(r"How much does the value change from x = 1 to x = (\d)\?", question):
    assert int(m[1]) == len(values)
    return "number", values[-1] - values[0]
  if m := re.fullmatch(r"What percentage of the pie is (\w+)\?", question):
    return "number", v[m[1]]
  if question == "Which colour has the largest share?":
    return "option", max(v, key=v.get)
  raise AssertionError(f"unknown question {question!r}")


@pytest.mark.parametrize("difficulty", [0, 1, 2, 3])
def test_plotted_data_and_answers(difficulty, read_blobs, option_text):
  charts = set()
  for index in range(60):
    ex = registry.generate("chart_figure_qa", "train", index, difficulty)
    _check_drawn(ex, read_blobs)
    data = ex.meta["data"]
    labels = data["labels"] if data["chart"] != "line" else [str(i + 1) for i in
                                                                range(len(data["values"]))]
    kind, value = _expected(ex.question, labels, data["values"])
    if kind == "number":
      assert ex.problem_type == "numerical" and ex.answer == str(value), ex.uid
    else:
      assert ex.problem_type == "multiple choice" and option_text(ex) == value, ex.uid
    charts.add(data["chart"])
  assert charts == {"bar", "line", "pie"}


def test_values_are_printed_only_at_low_difficulty(drawn_text, sample_directly):
  for difficulty, printed in ((0, True), (1, True), (2, False), (3, False)):
    for seed in range(10):
      drawn_text.clear()
      ex = sample_directly("chart_figure_qa", seed, difficulty)
      data = ex.meta["data"]
      if data["chart"] != "bar":
        continue
      shown = [t for t in drawn_text if t not in ("0", "5", "10")]
      assert (shown == [str(v) for v in data["values"]]) == printed, (seed, drawn_text)
