"""Independent readers for the task tests: objects recovered from pixels, and a spy on PIL text.

Nothing here uses the generators' own geometry or palette: colours are named from their hue,
shapes from their pixel footprint, and drawn strings are taken from PIL's text call itself.
"""
import colorsys
import dataclasses

import numpy as np
import pytest
from PIL import ImageDraw
from scipy import ndimage

from openvlthinker.tasks import registry

# Hue in degrees that each colour word means, for naming pixels without the generators' palette.
_HUES = {"red": 0, "orange": 29, "yellow": 50, "green": 128, "blue": 228, "purple": 284}


def hue_name(rgb) -> str | None:
  """The colour word of a saturated RGB value, None for greys and white."""
  h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
  if s < 0.5 or v < 0.3:
    return None
  deg = h * 360
  return min(_HUES, key=lambda k: min(abs(deg - _HUES[k]), 360 - abs(deg - _HUES[k])))


@dataclasses.dataclass
class Blob:
  color: str
  kind: str
  box: tuple[int, int, int, int]  # [x1, y1, x2, y2), x2/y2 exclusive
  area: int

  @property
  def name(self):
    return f"{self.color} {self.kind}"

  @property
  def center(self):
    return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2

  @property
  def width(self):
    return self.box[2] - self.box[0]


def _kind(mask: np.ndarray) -> str:
  """circle / square / triangle / diamond from a shape's cropped boolean mask."""
  h, w = mask.shape
  fill = mask.sum() / (h * w)
  if fill > 0.93:
    return "square"
  if fill > 0.65:
    return "circle"
  rows = mask.sum(1)
  return "triangle" if rows[-1] >= 0.8 * w else "diamond"


def blobs(image: np.ndarray, min_area: int = 4) -> list[Blob]:
  """Connected regions of one saturated colour, named by hue and footprint."""
  flat = image.reshape(-1, 3)
  uniq, inverse = np.unique(flat, axis=0, return_inverse=True)
  lookup = np.array([hue_name(c) or "" for c in uniq], dtype=object)
  names = lookup[inverse.reshape(-1)].reshape(image.shape[:2])
  out = []
  for color in _HUES:
    labels, n = ndimage.label(names == color)
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
      mask = labels[sl] == k
      if mask.sum() < min_area:
        continue
      box = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
      out.append(Blob(color, _kind(mask), box, int(mask.sum())))
  return out


@pytest.fixture
def read_blobs():
  return blobs


@pytest.fixture
def drawn_text(monkeypatch):
  """Records every string drawn with PIL's ImageDraw.text while the test runs."""
  calls = []
  original = ImageDraw.ImageDraw.text

  def spy(self, xy, text, *args, **kwargs):
    calls.append(text)
    return original(self, xy, text, *args, **kwargs)

  monkeypatch.setattr(ImageDraw.ImageDraw, "text", spy)
  return calls


@pytest.fixture
def sample_directly():
  """Examples from a task's own sampler, without the split filter (which draws rejected samples
  too, so a spy would see their text as well)."""

  def run(task_type, seed, difficulty=0, image_size=64):
    rng = np.random.default_rng(seed)
    return registry.get_task(task_type).sample(rng, difficulty, image_size)

  return run


@pytest.fixture
def option_text():
  """The text of the option that a letter answer names."""

  def lookup(example):
    texts = {o[0]: o[3:] for o in example.options}
    return texts[example.answer]

  return lookup
