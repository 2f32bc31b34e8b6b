"""Image files → uint8[H, W, 3] RGB, for every mode PIL decodes, under an explicit pixel limit.

PIL's `convert("RGB")` clips data wider than 8 bits at 255 (a 16-bit gray PNG turns almost all
white), so those modes are scaled here, never clipped:
- I;16, I;16B, I;16L, I;16N (16-bit gray PNG / TIFF): v / 257, rounded (0..65535 → 0..255).
- I (32-bit integers; Pillow < 10 read 16-bit gray PNGs as I): the same 16-bit scale when every
  value lies in [0, 65535]; otherwise the image's own [min, max] is stretched onto 0..255.
- F (32-bit float): values within [0, 1] are intensities (× 255), values within [0, 255] are kept,
  any other range is stretched from the image's [min, max]; NaN and ±inf read as 0.
Pillow itself reduces 16-bit RGB, RGBA and gray+alpha PNGs to their top bytes when it reads them.
Images with alpha (LA, La, PA, RGBA, RGBa, or a transparent colour in P / L / RGB) are composited
over white, as a viewer shows them: dropping alpha would reveal whatever colour the transparent
pixels happen to hold (often black, so black text on a transparent chart would vanish). Every
other mode (1, L, P, RGB, CMYK, YCbCr, LAB, HSV...) goes through PIL's convert("RGB").

The pixel limit is checked on the header size (`Image.open` reads only the header) before any
pixel is decoded. PIL's own global MAX_IMAGE_PIXELS is left alone: our limit must not exceed its
hard limit (2 × MAX_IMAGE_PIXELS, ~179M pixels), above which PIL itself refuses the file.
"""
import os

import numpy as np
from PIL import Image

DEFAULT_MAX_PIXELS = 100_000_000
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")


class ImageError(ValueError):
  """A file that does not decode to an image; the message says why, without the path."""


def pil_hard_limit() -> int | None:
  """The pixel count above which PIL's Image.open refuses any file (None: no limit)."""
  limit = Image.MAX_IMAGE_PIXELS
  return None if limit is None else 2 * int(limit)


def check_max_pixels(max_pixels: int, field: str = "data.max_image_pixels") -> int:
  """Returns max_pixels, or raises ValueError naming `field` if it is not a usable limit."""
  if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or (
      max_pixels <= 0):
    raise ValueError(f"{field}: expected a positive int, got {max_pixels!r}")
  hard = pil_hard_limit()
  if hard is not None and max_pixels > hard:
    raise ValueError(f"{field}: expected at most {hard} (PIL refuses larger images unless "
                     f"PIL.Image.MAX_IMAGE_PIXELS is raised first), got {max_pixels}")
  return int(max_pixels)


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def read_rgb(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """uint8[H, W, 3] of the image file at `path`; raises ImageError saying why it cannot be read
  (missing or empty file, not an image, truncated, more than `max_pixels` pixels, ...)."""
  try:
    if os.path.getsize(path) == 0:
      raise ImageError("the file is empty")
    with Image.open(path) as image:
      width, height = image.size
      if width <= 0 or height <= 0:
        raise ImageError(f"the image has no pixels ({width}x{height})")
      if width * height > max_pixels:
        raise ImageError(f"{width}x{height} = {width * height} pixels, more than "
                         f"data.max_image_pixels = {max_pixels}")
      image.load()
      return to_rgb(image)
  except ImageError:
    raise
  except Image.UnidentifiedImageError:
    raise ImageError("not an image file PIL can identify") from None
  except Image.DecompressionBombError as e:  # above PIL's hard limit, so above ours too
    raise ImageError(f"more than data.max_image_pixels = {max_pixels} ({_one_line(e)})") from None
  except Exception as e:  # noqa: BLE001 - decoders raise OSError, SyntaxError, struct.error...
    raise ImageError(_one_line(e)) from None


def _stretch(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
  return (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)


def _scale_int(values: np.ndarray) -> np.ndarray:
  if values.size and (values.min() < 0 or values.max() > 65535):
    wide = values.astype(np.float64)
    return np.rint(_stretch(wide, wide.min(), wide.max())).astype(np.uint8)
  return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _scale_float(values: np.ndarray) -> np.ndarray:
  values = values.astype(np.float64)
  finite = np.isfinite(values)
  real = values[finite]
  lo, hi = (float(real.min()), float(real.max())) if real.size else (0.0, 0.0)
  if lo >= 0 and hi <= 1:
    values = values * 255.0
  elif not (lo >= 0 and hi <= 255):
    values = _stretch(values, lo, hi)
  return np.clip(np.rint(np.where(finite, values, 0.0)), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> np.ndarray:
  """uint8[H, W, 3] of a decoded PIL image of any mode (the rules are in the module docstring)."""
  mode = image.mode
  if mode == "I" or mode.startswith("I;16"):
    gray = _scale_int(np.asarray(image))
  elif mode == "F":
    gray = _scale_float(np.asarray(image))
  elif mode in _ALPHA_MODES or "transparency" in image.info:
    if mode == "La":  # premultiplied; PIL converts it to nothing but LA
      image = image.convert("LA")
    rgba = np.asarray(image.convert("RGBA"), np.float32)
    alpha = rgba[..., 3:] / 255.0
    return np.rint(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
  else:
    return np.asarray(image.convert("RGB"), np.uint8)
  return np.repeat(gray[..., None], 3, axis=-1)
