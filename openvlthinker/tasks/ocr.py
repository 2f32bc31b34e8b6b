"""ocr: read 1-3 short common words, one per line; scored by 1 - WER.

Difficulty 0 is one black word in a large font on white. Higher levels add words (up to 3), text
and background colours, rotation (up to 12 degrees) and pixel noise, and shrink the largest font.
"""
import math

import numpy as np
from PIL import Image

from openvlthinker.tasks import answers, render, registry
from openvlthinker.tasks.base import Example

WORDS = tuple("""
cat dog sun red blue tree book fish bird milk cake door road rain snow star moon lamp ship frog
king game hand home jump kite leaf lion map nest park pen rice rock rose salt sand seed shoe sock
song soup tea time toy van wall wind wolf yard zoo bag bus cup egg fan hat ink jar key leg mud
net owl pig rug sky box car bed bee ant arm ear eye ice jam web oak pie hen cow fox bat apple
bread chair clock cloud dream earth field glass grass heart horse house lemon light money mouse
music night ocean paper piano plant river robot sheep smile stone sugar table tiger train water
whale world zebra green black white gold pink
""".split())

# (words min, words max, max rotation in degrees, noise sigma, largest font at 64 px)
_LEVELS = ((1, 1, 0.0, 0.0, 24), (1, 2, 5.0, 0.0, 22), (2, 3, 8.0, 12.0, 20),
           (3, 3, 12.0, 24.0, 18))
_INKS = ((0, 0, 0), (20, 40, 140), (140, 20, 20), (20, 100, 30))
_PAPERS = ((255, 255, 255), (250, 240, 210), (225, 240, 255), (235, 235, 235))


def _fit(lines, size, angle, start):
  """The largest font size whose text block, rotated by `angle`, fits the canvas with a margin."""
  cos, sin = abs(math.cos(math.radians(angle))), abs(math.sin(math.radians(angle)))
  room = size - render.scale(size, 6)
  for font_size in range(start, render.scale(size, 7) - 1, -1):
    width = max(render.text_box(w, font_size)[2] - render.text_box(w, font_size)[0]
                for w in lines)
    height = len(lines) * font_size * 1.15
    if width * cos + height * sin <= room and width * sin + height * cos <= room:
      return font_size, width * cos + height * sin, width * sin + height * cos
  raise ValueError(f"ocr: lines {lines} do not fit a {size} px image")


# Length: reading needs little reasoning; the paper saw 30-50 tokens.
@registry.register_task("ocr", ("ocr",), length_thresholds=(15, 30, 50, 75))
def sample(rng: np.random.Generator, difficulty: int = 0, image_size: int = 64) -> Example:
  """1-3 words drawn one per line; the answer is the words in reading order."""
  lo, hi, max_angle, sigma, start = _LEVELS[difficulty]
  lines = answers.pick(rng, WORDS, int(rng.integers(lo, hi + 1)))
  angle = float(np.round(rng.uniform(-max_angle, max_angle), 1)) if max_angle else 0.0
  ink, paper = render.BLACK, render.WHITE
  if difficulty >= 1:
    ink, paper = answers.pick(rng, _INKS), answers.pick(rng, _PAPERS)
  font_size, width, height = _fit(lines, image_size, angle, render.scale(image_size, start))
  # Jitter the block centre within the slack left around it.
  slack_x, slack_y = (max(0.0, (image_size - render.scale(image_size, 6) - d) / 2)
                      for d in (width, height))
  cx = image_size / 2 + float(rng.uniform(-slack_x, slack_x))
  cy = image_size / 2 + float(rng.uniform(-slack_y, slack_y))
  img, draw = render.canvas(image_size, paper)
  step = font_size * 1.15
  for i, word in enumerate(lines):
    render.draw_centered(draw, (cx, cy + (i - (len(lines) - 1) / 2) * step), word, font_size,
                         fill=ink)
  if angle:
    img = img.rotate(angle, resample=Image.BILINEAR, center=(cx, cy), fillcolor=paper)
  image = render.add_noise(render.to_array(img), rng, sigma)
  answer = " ".join(lines)
  if len(lines) == 1:
    thinking = f"The text reads {lines[0]}."
  else:
    thinking = "; ".join(f"line {i + 1} reads {w}" for i, w in enumerate(lines))
    thinking = thinking[:1].upper() + thinking[1:] + "."
  return Example(
      images=(image,),
      question="What text is written in the image?",
      answer=answer,
      problem_type="ocr",
      task_type="ocr",
      reasoning=answers.respond(thinking, answer),
      meta={
          "scene": repr((lines, round(cx), round(cy), angle, font_size, ink, paper)),
          "lines": list(lines),
          "font_size": font_size,
          "angle": angle,
          "noise": sigma,
      },
  )
