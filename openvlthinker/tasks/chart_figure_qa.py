"""chart_figure_qa: bar, line and pie charts drawn with PIL, and questions that read a value,
compare values or compute a difference.

Charts are drawn directly with PIL (a 64 px matplotlib bar chart costs ~15 ms here; this ~0.3 ms)
and sized for 64 px: few bars or points, values 1-9, big digits. At difficulty <= 1 each value is
printed on the chart; from difficulty 2 it must be read against unit gridlines. Pie shares are
multiples of 10 (of 5 at difficulty 3) and are read from angles. `meta["data"]` keeps the plotted
values.
"""
import numpy as np

from openvlthinker.tasks import answers, render, registry
from openvlthinker.tasks.base import Example

_NUM_BARS = (3, 4, 4, 5)
_NUM_POINTS = (4, 4, 5, 5)
_NUM_SLICES = (2, 3, 3, 4)
_GRID = (215, 215, 215)
_LINE = (120, 120, 120)


def _cap(text: str) -> str:
  return text[:1].upper() + text[1:]


def _plot_box(size: int, labelled: bool, x_ticks: bool):
  """(left, top, right, bottom) of the plot area; labelled charts leave room above for values,
  gridded ones room on the left for tick labels."""
  s = lambda v: render.scale(size, v)  # noqa: E731 - 64 px units
  left = s(3) if labelled else s(14)
  top = s(12) if labelled else s(5)
  bottom = size - (s(12) if x_ticks else s(3))
  return left, top, size - s(3), bottom


def _grid(draw, size, box, unit):
  left, top, right, bottom = box
  for v in range(1, 11):
    y = bottom - round(v * unit)
    draw.line([(left, y), (right, y)], fill=_GRID, width=1)
  for v in (0, 5, 10):
    render.draw_centered(draw, (left - render.scale(size, 7), bottom - v * unit), str(v),
                         render.scale(size, 9))


def _draw_bar(draw, size, labelled, colors, values):
  box = _plot_box(size, labelled, x_ticks=False)
  left, top, right, bottom = box
  unit = (bottom - top) / 10
  if not labelled:
    _grid(draw, size, box, unit)
  slot = (right - left) / len(values)
  width = max(2, round(slot * 0.7))
  for i, (c, v) in enumerate(zip(colors, values)):
    x1 = left + round(i * slot + (slot - width) / 2)
    height = round(v * unit)
    draw.rectangle([x1, bottom - height, x1 + width - 1, bottom - 1], fill=render.COLORS[c])
    if labelled:
      render.draw_centered(draw, (x1 + width / 2, bottom - height - render.scale(size, 5)),
                           str(v), render.scale(size, 10))
  draw.line([(left, bottom), (right, bottom)], fill=render.BLACK, width=1)


def _ask_bar(rng, difficulty, colors, values):
  labelled, n = difficulty <= 1, len(values)
  ask = answers.pick(rng, ("value", "difference", "tallest", "shortest"))
  if ask == "value":
    i = int(rng.integers(n))
    how = "is labelled" if labelled else "reaches gridline"
    return (f"What is the value of the {colors[i]} bar?", (), str(values[i]),
            f"The {colors[i]} bar {how} {values[i]}.", {"ask": ask, "target": colors[i]})
  if ask == "difference":
    i, j = (int(k) for k in rng.choice(n, size=2, replace=False))
    if values[i] < values[j]:
      i, j = j, i
    diff = values[i] - values[j]
    return (f"How much taller is the {colors[i]} bar than the {colors[j]} bar?", (), str(diff),
            f"{_cap(colors[i])} {values[i]}, {colors[j]} {values[j]}; "
            f"{values[i]} - {values[j]} = {diff}.", {"ask": ask, "target": [colors[i], colors[j]]})
  best = colors[int(np.argmax(values) if ask == "tallest" else np.argmin(values))]
  options, letter = answers.choices(rng, colors, best, shuffle=difficulty >= 1)
  seen = ", ".join(f"{c} {v}" for c, v in zip(colors, values))
  return (f"Which bar is the {ask}?", options, letter,
          f"Bars: {seen}. {_cap(ask)}: {best} ({letter}).", {"ask": ask})


def _draw_line(draw, size, labelled, color, values):
  box = _plot_box(size, labelled, x_ticks=True)
  left, top, right, bottom = box
  unit = (bottom - top) / 10
  if not labelled:
    _grid(draw, size, box, unit)
  n, pad = len(values), render.scale(size, 5)
  xs = [round(left + pad + i * (right - left - 2 * pad) / (n - 1)) for i in range(n)]
  ys = [bottom - round(v * unit) for v in values]
  draw.line([(left, bottom), (right, bottom)], fill=render.BLACK, width=1)
  draw.line(list(zip(xs, ys)), fill=_LINE, width=render.scale(size, 2))
  half = render.scale(size, 3)
  for i, (x, y, v) in enumerate(zip(xs, ys, values)):
    # Markers are drawn last, in a palette colour, so each is a clean square of that colour.
    draw.rectangle([x - half, y - half, x + half - 1, y + half - 1], fill=render.COLORS[color])
    render.draw_centered(draw, (x, bottom + render.scale(size, 6)), str(i + 1),
                         render.scale(size, 9))
    if labelled:
      render.draw_centered(draw, (x, y - render.scale(size, 8)), str(v), render.scale(size, 10))


def _ask_line(rng, difficulty, values):
  labelled, n = difficulty <= 1, len(values)
  ask = answers.pick(rng, ("value", "highest", "change"))
  how = "labelled" if labelled else "at gridline"
  if ask == "value":
    i = int(rng.integers(n))
    return (f"What is the value at x = {i + 1}?", (), str(values[i]),
            f"The point at x = {i + 1} is {how} {values[i]}.", {"ask": ask, "target": i + 1})
  if ask == "highest":
    i = int(np.argmax(values))
    seen = ", ".join(str(v) for v in values)
    return ("At which x is the value highest?", (), str(i + 1),
            f"Values for x = 1-{n}: {seen}. Highest {values[i]} at x = {i + 1}.", {"ask": ask})
  change = values[-1] - values[0]
  return (f"How much does the value change from x = 1 to x = {n}?", (), str(change),
          f"x = 1 is {how} {values[0]}, x = {n} {how} {values[-1]}; "
          f"{values[-1]} - {values[0]} = {change}.", {"ask": ask})


def _shares(rng, k, step):
  """k distinct multiples of `step`, each >= 10, summing to 100."""
  units = 100 // step
  while True:
    cuts = np.sort(rng.choice(np.arange(1, units), size=k - 1, replace=False))
    parts = np.diff(np.concatenate([[0], cuts, [units]])) * step
    if parts.min() >= 10 and len(set(parts.tolist())) == k:
      return [int(p) for p in parts]


def _draw_pie(draw, size, colors, values):
  c, radius = size / 2, size * 0.44
  start = -90.0  # the first slice starts at 12 o'clock; slices run clockwise
  for color, v in zip(colors, values):
    draw.pieslice([c - radius, c - radius, c + radius, c + radius], start, start + 3.6 * v,
                  fill=render.COLORS[color])
    start += 3.6 * v


def _ask_pie(rng, difficulty, colors, values):
  if rng.random() < 0.5:
    i = int(rng.integers(len(values)))
    degrees = round(3.6 * values[i])
    return (f"What percentage of the pie is {colors[i]}?", (), str(values[i]),
            f"{_cap(colors[i])} spans {degrees} of 360 degrees: {degrees}/360 = {values[i]}%.",
            {"ask": "share", "target": colors[i]})
  best = colors[int(np.argmax(values))]
  options, letter = answers.choices(rng, colors, best, shuffle=difficulty >= 1)
  seen = ", ".join(f"{col} {v}" for col, v in zip(colors, values))
  return ("Which colour has the largest share?", options, letter,
          f"Shares: {seen}. Largest: {best} ({letter}).", {"ask": "largest"})


# Length: the paper saw 800-1000 tokens of reasoning.
@registry.register_task("chart_figure_qa", ("numerical", "multiple choice"),
                        length_thresholds=(400, 800, 1000, 1500))
def sample(rng: np.random.Generator, difficulty: int = 0, image_size: int = 64) -> Example:
  """One chart (bar, line or pie) and one question about its values."""
  chart = answers.pick(rng, ("bar", "line", "pie"))
  labelled = difficulty <= 1
  img, draw = render.canvas(image_size)
  if chart == "bar":
    labels = answers.pick(rng, render.COLOR_NAMES, _NUM_BARS[difficulty])
    values = [int(v) for v in rng.choice(np.arange(1, 10), size=len(labels), replace=False)]
    _draw_bar(draw, image_size, labelled, labels, values)
    asked = _ask_bar(rng, difficulty, labels, values)
  elif chart == "line":
    labels = [answers.pick(rng, render.COLOR_NAMES)]  # the series colour
    values = [int(v) for v in rng.choice(np.arange(1, 10), size=_NUM_POINTS[difficulty],
                                         replace=False)]
    _draw_line(draw, image_size, labelled, labels[0], values)
    asked = _ask_line(rng, difficulty, values)
  else:
    labels = answers.pick(rng, render.COLOR_NAMES, _NUM_SLICES[difficulty])
    values = _shares(rng, len(labels), 5 if difficulty == 3 else 10)
    _draw_pie(draw, image_size, labels, values)
    asked = _ask_pie(rng, difficulty, labels, values)
  question, options, answer, thinking, query = asked
  return Example(
      images=(render.to_array(img),),
      question=question,
      answer=answer,
      problem_type="multiple choice" if options else "numerical",
      task_type="chart_figure_qa",
      options=options,
      reasoning=answers.respond(thinking, answer),
      meta={
          "scene": repr((chart, labels, values, question, options)),
          "data": {"chart": chart, "labels": labels, "values": values},
          "query": query,
      },
  )
