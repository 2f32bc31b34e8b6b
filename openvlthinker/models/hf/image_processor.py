"""Qwen-VL image inputs in numpy/PIL: the checkpoint's preprocessor config, resize, patches.

Reproduces transformers' `Qwen2VLImageProcessorPil` (which Qwen2-VL, Qwen2.5-VL and Qwen3-VL all
use): each image is resized with PIL so both sides are multiples of patch * merge and its area lies
in [min_pixels, max_pixels] (`smart_resize`), rescaled, normalised, repeated `temporal_patch_size`
times and cut into flat patches, rows ordered merge-window by merge-window. `normalize` and
`patchify` also run on `jax.numpy` arrays, for images already at a valid size.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
import PIL.Image

from openvlthinker.fields import FieldError, check, positive_int

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"
# PIL's filter codes (Image.Resampling): NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING.
_RESAMPLE_CODES = (0, 1, 2, 3, 4, 5)
# Steps our preprocess always applies: a config that turns one off describes other inputs.
_ALWAYS_ON = ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb")


def _is_number(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
  """The image side of a Qwen-VL checkpoint; defaults are transformers' Qwen2-VL defaults."""
  patch_size: int = 14
  temporal_patch_size: int = 2
  merge_size: int = 2
  min_pixels: int = 56 * 56
  max_pixels: int = 28 * 28 * 1280
  image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
  image_std: tuple[float, float, float] = OPENAI_CLIP_STD
  resample: int = int(PIL.Image.Resampling.BICUBIC)
  rescale_factor: float = 1 / 255

  def __post_init__(self):
    for f in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
      check(positive_int(getattr(self, f)), f, "a positive integer", getattr(self, f))
    check(self.max_pixels >= self.min_pixels, "max_pixels",
          f"at least min_pixels={self.min_pixels}", self.max_pixels)
    check(self.max_pixels >= self.factor ** 2, "max_pixels",
          f"at least (patch_size * merge_size)**2={self.factor ** 2}", self.max_pixels)
    for f in ("image_mean", "image_std"):
      v = getattr(self, f)
      check(isinstance(v, tuple) and len(v) == 3 and all(map(_is_number, v)), f,
            "3 finite numbers (R, G, B)", v)
    check(all(s > 0 for s in self.image_std), "image_std", "positive numbers", self.image_std)
    check(self.resample in _RESAMPLE_CODES, "resample",
          f"a PIL resampling code in {_RESAMPLE_CODES}", self.resample)
    check(_is_number(self.rescale_factor) and self.rescale_factor > 0, "rescale_factor",
          "a positive number", self.rescale_factor)

  @property
  def factor(self) -> int:
    """Image sides are multiples of this: one merge window of patches."""
    return self.patch_size * self.merge_size

  @property
  def patch_dim(self) -> int:
    return 3 * self.temporal_patch_size * self.patch_size ** 2

  @classmethod
  def from_json(cls, source: str | os.PathLike | Mapping[str, Any]) -> ImageProcessorConfig:
    """Reads a checkpoint's image processor config: a dict, a json file, or a checkpoint directory.

    A directory is read as transformers does: processor_config.json's nested "image_processor"
    when it has one, else preprocessor_config.json. Pixel bounds come from top-level
    min_pixels/max_pixels, else size.shortest_edge/longest_edge, else the legacy
    size.min_pixels/max_pixels, else the defaults (top level wins, as in transformers).
    """
    d = _load_dict(source)
    size = d.get("size") or {}
    check(isinstance(size, Mapping), "size", "a dict with shortest_edge/longest_edge", size)
    for key in _ALWAYS_ON:
      check(d.get(key, True) is True, key, "true (or absent)", d.get(key))
    kwargs = {}
    for f in ("patch_size", "temporal_patch_size", "merge_size", "resample", "rescale_factor"):
      if d.get(f) is not None:
        kwargs[f] = d[f]
    for f, size_keys in (("min_pixels", ("shortest_edge", "min_pixels")),
                         ("max_pixels", ("longest_edge", "max_pixels"))):
      for value in (d.get(f), *(size.get(k) for k in size_keys)):
        if value is not None:
          kwargs[f] = value
          break
    for f in ("image_mean", "image_std"):
      v = d.get(f)
      if v is not None:
        kwargs[f] = (float(v),) * 3 if _is_number(v) else tuple(v) if isinstance(v, list) else v
    return cls(**kwargs)


def _load_dict(source: str | os.PathLike | Mapping[str, Any]) -> dict:
  if isinstance(source, Mapping):
    d = dict(source)
  else:
    path = os.fspath(source)
    if os.path.isdir(path):
      nested = None
      if os.path.isfile(os.path.join(path, PROCESSOR_FILE)):
        nested = _read_json(os.path.join(path, PROCESSOR_FILE)).get("image_processor")
      if nested is not None:
        d = nested
      elif os.path.isfile(os.path.join(path, PREPROCESSOR_FILE)):
        d = _read_json(os.path.join(path, PREPROCESSOR_FILE))
      else:
        raise FieldError("image processor config", f"{PREPROCESSOR_FILE} or an 'image_processor' "
                         f"entry in {PROCESSOR_FILE} in the directory", path)
    else:
      d = _read_json(path)
  if isinstance(d.get("image_processor"), Mapping):  # a processor_config.json passed directly
    d = dict(d["image_processor"])
  return d


def _read_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      d = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise FieldError("image processor config", "a readable json file", f"{path} ({e})") from None
  check(isinstance(d, dict), "image processor config", "a json object", type(d).__name__)
  return d


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
  """(h, w) nearest to (height, width) with both multiples of `factor`, area in [min, max]
  pixels and the aspect ratio kept as well as rounding allows (transformers' smart_resize)."""
  if max(height, width) / min(height, width) > 200:
    raise ValueError(f"image size {height}x{width}: aspect ratio must be at most 200, got "
                     f"{max(height, width) / min(height, width)}")
  h = round(height / factor) * factor
  w = round(width / factor) * factor
  if h * w > max_pixels:
    beta = math.sqrt(height * width / max_pixels)
    h = max(factor, math.floor(height / beta / factor) * factor)
    w = max(factor, math.floor(width / beta / factor) * factor)
  elif h * w < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h = math.ceil(height * beta / factor) * factor
    w = math.ceil(width * beta / factor) * factor
  return h, w


def grid(height: int, width: int, cfg: ImageProcessorConfig) -> tuple[int, int, int]:
  """The (t, h, w) patch grid of one image of a valid size (sides multiples of cfg.factor)."""
  check(height % cfg.factor == 0 and width % cfg.factor == 0, "image size",
        f"sides that are multiples of patch_size * merge_size={cfg.factor}", (height, width))
  return 1, height // cfg.patch_size, width // cfg.patch_size


def tokens_per_image(grid_thw: Sequence[int], cfg: ImageProcessorConfig) -> int:
  """How many <|image_pad|> tokens an image of patch grid (t, h, w) takes (one per merge window)."""
  t, h, w = (int(v) for v in grid_thw)
  return t * h * w // cfg.merge_size ** 2


def normalize(x, cfg: ImageProcessorConfig, xp=np):
  """uint8[..., H, W, 3] → float32[..., H, W, 3]: (x * rescale_factor - mean) / std.

  With numpy the rescale is done in float64 then cast, exactly as transformers does; `xp` may be
  `jax.numpy` (float32 throughout, within an ulp of it).
  """
  wide = np.float64 if xp is np else xp.float32
  x = (xp.asarray(x).astype(wide) * cfg.rescale_factor).astype(xp.float32)
  mean = xp.asarray(cfg.image_mean, xp.float32)
  std = xp.asarray(cfg.image_std, xp.float32)
  return (x - mean) / std


def patchify(x, cfg: ImageProcessorConfig, xp=np):
  """float[..., H, W, 3] → float[..., M, patch_dim] with M = (H / p) * (W / p) patches.

  Rows go merge window by merge window (row-major over windows, then row-major inside one), and
  each row is channel, then time (the image repeated temporal_patch_size times), then the p x p
  pixels: transformers' patch order. H and W must be multiples of patch_size * merge_size.
  """
  *lead, height, width, channels = x.shape
  p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
  check(height % cfg.factor == 0 and width % cfg.factor == 0, "image size",
        f"sides that are multiples of patch_size * merge_size={cfg.factor}", (height, width))
  gh, gw = height // p, width // p
  x = xp.reshape(x, (*lead, gh // m, m, p, gw // m, m, p, channels))
  n = len(lead)
  # [..., wh, mh, ph, ww, mw, pw, C] → [..., wh, ww, mh, mw, C, ph, pw]
  x = xp.transpose(x, (*range(n), n, n + 3, n + 1, n + 4, n + 6, n + 2, n + 5))
  x = xp.broadcast_to(x[..., None, :, :], (*x.shape[:-2], t, p, p))
  return xp.reshape(x, (*lead, gh * gw, channels * t * p * p))


def _to_rgb(image) -> PIL.Image.Image:
  """A PIL RGB image, transparency composited onto white (as transformers' convert_to_rgb)."""
  if isinstance(image, np.ndarray):
    check(image.dtype == np.uint8 and (image.ndim == 2 or image.ndim == 3 and image.shape[-1] == 3),
          "image", "uint8[H, W, 3] or uint8[H, W]", f"{image.dtype}{list(image.shape)}")
    image = PIL.Image.fromarray(image)
  check(isinstance(image, PIL.Image.Image), "image", "a PIL image or a uint8 numpy array",
        type(image).__name__)
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    image = image.convert("RGBA")
    white = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
    return PIL.Image.alpha_composite(white, image).convert("RGB")
  return image.convert("RGB")


def resize(image, cfg: ImageProcessorConfig) -> np.ndarray:
  """uint8[h, w, 3]: `image` (PIL or uint8[H, W, 3]) resized with PIL to its smart_resize size."""
  image = _to_rgb(image)
  h, w = smart_resize(image.height, image.width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
  return np.asarray(image.resize((w, h), resample=cfg.resample))


def preprocess(images: Sequence, cfg: ImageProcessorConfig
               ) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
  """Images (PIL or uint8[H, W, 3]) → (pixel_values float32[M, patch_dim], grids [(t, h, w)]).

  M is the sum of t * h * w over the images; the rows of image i follow those of image i - 1.
  Equal to transformers' `pixel_values` and `image_grid_thw`.
  """
  check(len(images) > 0, "images", "at least one image", len(images))
  patches, grids = [], []
  for image in images:
    x = resize(image, cfg)
    grids.append(grid(x.shape[0], x.shape[1], cfg))
    patches.append(patchify(normalize(x, cfg), cfg))
  return np.concatenate(patches, axis=0).astype(np.float32), grids
