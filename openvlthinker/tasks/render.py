"""Drawing helpers shared by the task generators: palette, shapes, placement, fonts, text, noise.

Shapes are drawn by PIL without anti-aliasing in flat palette colours, so every pixel of a shape has
exactly its colour and its box can be recovered from the image. Text is anti-aliased (it is read,
not measured). Sizes are in pixels of the caller's canvas; generators scale them by image_size / 64.
"""
import dataclasses
import functools
import importlib.util
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Saturated colours that stay distinct at 64 px and against the white background.
COLORS = {
    "red": (230, 25, 25),
    "green": (20, 160, 40),
    "blue": (30, 70, 230),
    "yellow": (235, 195, 0),
    "purple": (150, 40, 190),
    "orange": (255, 125, 0),
}
COLOR_NAMES = tuple(COLORS)
SHAPES = ("circle", "square", "triangle", "diamond")
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)


@dataclasses.dataclass(frozen=True)
class Shape:
  """A filled shape inside the square pixel box [x1, y1, x2, y2) (x2, y2 exclusive)."""
  kind: str
  color: str
  box: tuple[int, int, int, int]

  @property
  def name(self) -> str:
    return f"{self.color} {self.kind}"

  @property
  def size(self) -> int:
    return self.box[2] - self.box[0]

  @property
  def center(self) -> tuple[int, int]:
    # Sizes are even, so the centre of [x1, x2) is an integer.
    x1, y1, x2, y2 = self.box
    return (x1 + x2) // 2, (y1 + y2) // 2


def scale(image_size: int, value: float) -> int:
  """`value` pixels of a 64 px canvas, in pixels of an `image_size` canvas (at least 1)."""
  return max(1, int(round(value * image_size / 64)))


def even_size(rng: np.random.Generator, lo: int, hi: int) -> int:
  """An even integer in [lo, hi] (both rounded to even), so box centres are integers."""
  lo2, hi2 = (lo + 1) // 2, max((lo + 1) // 2, hi // 2)
  return 2 * int(rng.integers(lo2, hi2 + 1))


def place_boxes(rng: np.random.Generator, sizes, image_size: int, gap: int = 2,
                margin: int = 1, avoid_x: int | None = None,
                avoid_y: int | None = None, tries: int = 60):
  """Non-overlapping square boxes of the given sizes, or None when they do not fit.

  Boxes keep `gap` pixels between each other (so shapes are separate connected components) and
  `margin` from the border. With `avoid_x` (`avoid_y`), no box comes within `gap` of that column
  (row), so every shape is clearly on one side of it. Returns a list of (x1, y1, x2, y2).
  """
  boxes = []
  for size in sizes:
    hi = image_size - size - margin
    if hi < margin:
      return None
    for _ in range(tries):
      x1, y1 = (int(v) for v in rng.integers(margin, hi + 1, size=2))
      box = (x1, y1, x1 + size, y1 + size)
      if avoid_x is not None and x1 - gap < avoid_x < x1 + size + gap:
        continue
      if avoid_y is not None and y1 - gap < avoid_y < y1 + size + gap:
        continue
      if all(box[0] >= b[2] + gap or b[0] >= box[2] + gap or box[1] >= b[3] + gap
             or b[1] >= box[3] + gap for b in boxes):
        boxes.append(box)
        break
    else:
      return None
  return boxes


def canvas(image_size: int, color=WHITE):
  """A fresh RGB canvas and its drawing context."""
  img = Image.new("RGB", (image_size, image_size), color)
  return img, ImageDraw.Draw(img)


def draw_shape(draw: ImageDraw.ImageDraw, shape: Shape) -> None:
  """Fills `shape` so that its drawn pixels span exactly its box."""
  x1, y1, x2, y2 = shape.box
  xr, yb = x2 - 1, y2 - 1  # PIL takes inclusive corner coordinates.
  cx, cy = (x1 + xr) / 2, (y1 + yb) / 2
  fill = COLORS[shape.color]
  if shape.kind == "square":
    draw.rectangle([x1, y1, xr, yb], fill=fill)
  elif shape.kind == "circle":
    draw.ellipse([x1, y1, xr, yb], fill=fill)
  elif shape.kind == "triangle":
    draw.polygon([(x1, yb), (xr, yb), (cx, y1)], fill=fill)
  elif shape.kind == "diamond":
    draw.polygon([(cx, y1), (xr, cy), (cx, yb), (x1, cy)], fill=fill)
  else:
    raise ValueError(f"shape.kind: got {shape.kind!r}, expected one of {SHAPES}")


def render_shapes(image_size: int, shapes) -> np.ndarray:
  """uint8[S, S, 3]: the shapes on a white canvas."""
  img, draw = canvas(image_size)
  for shape in shapes:
    draw_shape(draw, shape)
  return to_array(img)


@functools.lru_cache(maxsize=None)
def _font_path() -> str | None:
  # matplotlib ships DejaVu; find its data folder without importing matplotlib (slow import).
  spec = importlib.util.find_spec("matplotlib")
  for folder in (spec.submodule_search_locations or []) if spec else []:
    path = os.path.join(folder, "mpl-data", "fonts", "ttf", "DejaVuSans-Bold.ttf")
    if os.path.exists(path):
      return path
  return None


@functools.lru_cache(maxsize=None)
def font(size: int) -> ImageFont.FreeTypeFont:
  """A bold sans font of `size` pixels (DejaVu Sans Bold, else Pillow's built-in font)."""
  path = _font_path()
  if path is None:
    return ImageFont.load_default(size=size)
  return ImageFont.truetype(path, size, layout_engine=ImageFont.Layout.BASIC)


@functools.lru_cache(maxsize=4096)
def text_box(text: str, size: int) -> tuple[int, int, int, int]:
  """The ink box (left, top, right, bottom) of `text` drawn at the origin in `font(size)`."""
  return font(size).getbbox(text)


def fit_font_size(lines, max_width: int, max_height: int, start: int, smallest: int) -> int:
  """The largest size <= start (>= smallest) at which every line fits the width and all fit the
  height, stacked with 15% leading."""
  for size in range(start, smallest - 1, -1):
    widths = [text_box(line, size)[2] - text_box(line, size)[0] for line in lines]
    if max(widths) <= max_width and len(lines) * size * 1.15 <= max_height:
      return size
  return smallest


def draw_centered(draw: ImageDraw.ImageDraw, xy, text: str, size: int, fill=BLACK) -> None:
  """Draws `text` with its ink box centred on xy."""
  left, top, right, bottom = text_box(text, size)
  x = xy[0] - (left + right) / 2
  y = xy[1] - (top + bottom) / 2
  draw.text((round(x), round(y)), text, font=font(size), fill=fill)


def to_array(img: Image.Image) -> np.ndarray:
  """uint8[H, W, 3] copy of an RGB PIL image."""
  return np.asarray(img, dtype=np.uint8).copy()


def add_noise(image: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
  """Adds N(0, sigma²) pixel noise; uint8[H, W, 3] -> uint8[H, W, 3]."""
  if sigma <= 0:
    return image
  noise = rng.normal(0.0, sigma, size=image.shape).astype(np.float32)
  return np.clip(image.astype(np.float32) + noise, 0, 255).astype(np.uint8)
