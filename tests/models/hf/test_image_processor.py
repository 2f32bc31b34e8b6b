"""Our numpy/PIL Qwen-VL image processor against transformers' `Qwen2VLImageProcessorPil`."""
import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_module

from openvlthinker.fields import FieldError
from openvlthinker.models.hf import image_processor as ip

# The two checkpoint styles, written as their preprocessor_config.json are (max_pixels lowered to
# keep the tests small: the huge images below are shrunk by it).
QWEN25_STYLE = {"min_pixels": 3136, "max_pixels": 40000, "patch_size": 14,
                "temporal_patch_size": 2, "merge_size": 2, "image_mean": list(ip.OPENAI_CLIP_MEAN),
                "image_std": list(ip.OPENAI_CLIP_STD),
                "image_processor_type": "Qwen2VLImageProcessor",
                "processor_class": "Qwen2_5_VLProcessor"}
QWEN3_STYLE = {"size": {"longest_edge": 65536, "shortest_edge": 4096}, "patch_size": 16,
               "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
               "image_std": [0.5, 0.5, 0.5], "processor_class": "Qwen3VLProcessor",
               "image_processor_type": "Qwen2VLImageProcessorFast"}
# Square, non-square, tiny (smart_resize enlarges), huge (it shrinks), sides not multiples of 28/32.
SIZES = [(56, 56), (64, 64), (50, 70), (90, 33), (3, 5), (12, 12), (900, 1300), (2000, 150),
         (37, 211)]


def _image(h, w, seed=0):
  return np.random.default_rng(seed + h * 7919 + w).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _hf(style):
  # A deep copy: transformers writes min/max_pixels into the `size` dict it is given.
  return hf_module.Qwen2VLImageProcessorPil.from_dict(copy.deepcopy(style))


@pytest.fixture(scope="module", params=[QWEN25_STYLE, QWEN3_STYLE], ids=["qwen2.5", "qwen3"])
def style(request):
  return request.param


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_preprocess_matches_hf(style, size):
  cfg = ip.ImageProcessorConfig.from_json(style)
  image = _image(*size)
  pixels, grids = ip.preprocess([image], cfg)
  want = _hf(style)(images=[PIL.Image.fromarray(image)])
  assert grids == [tuple(g) for g in want["image_grid_thw"].tolist()]
  assert pixels.dtype == np.float32 and pixels.shape == want["pixel_values"].shape
  np.testing.assert_allclose(pixels, want["pixel_values"], atol=1e-5, rtol=0)


def test_several_images_and_pil_modes_match_hf(style):
  """A batch of images of different sizes and modes: rows concatenated in order; transparency
  composited onto white and grey expanded to RGB as transformers does."""
  cfg = ip.ImageProcessorConfig.from_json(style)
  rgba = np.concatenate([_image(40, 60, 1), _image(40, 60, 2)[..., :1]], axis=-1)
  images = [PIL.Image.fromarray(_image(100, 70)), PIL.Image.fromarray(rgba, "RGBA"),
            PIL.Image.fromarray(_image(33, 90)[..., 0], "L"), _image(64, 64)]
  pixels, grids = ip.preprocess(images, cfg)
  want = _hf(style)(images=[im if isinstance(im, PIL.Image.Image) else PIL.Image.fromarray(im)
                            for im in images])
  assert grids == [tuple(g) for g in want["image_grid_thw"].tolist()]
  np.testing.assert_allclose(pixels, want["pixel_values"], atol=1e-5, rtol=0)
  assert sum(t * h * w for t, h, w in grids) == len(pixels)


def test_normalize_and_patchify_match_preprocess_numpy_and_jax(style):
  """On images already at a valid size (no resize) the two steps are preprocess, with numpy and
  jitted jax.numpy, for one image and for a batch (leading axes kept)."""
  cfg = ip.ImageProcessorConfig.from_json(style)
  f = cfg.factor
  images = np.stack([_image(2 * f, 3 * f, 1), _image(2 * f, 3 * f, 2)])
  want, grids = ip.preprocess(list(images), cfg)
  assert grids == [ip.grid(2 * f, 3 * f, cfg)] * 2
  got = ip.patchify(ip.normalize(images, cfg), cfg)
  assert got.shape == (2, len(want) // 2, cfg.patch_dim)
  np.testing.assert_array_equal(got.reshape(want.shape), want)
  on_device = jax.jit(lambda x: ip.patchify(ip.normalize(x, cfg, jnp), cfg, jnp))(images)
  np.testing.assert_allclose(np.asarray(on_device).reshape(want.shape), want, atol=1e-5, rtol=0)
  one = ip.patchify(ip.normalize(images[0], cfg), cfg)
  np.testing.assert_array_equal(one, want[:len(want) // 2])


def test_smart_resize_matches_hf():
  for factor, lo, hi in ((28, 3136, 40000), (32, 4096, 65536), (28, 56 * 56, 28 * 28 * 1280)):
    for h in (1, 3, 27, 28, 41, 100, 333, 1000, 4000):
      for w in (2, 14, 29, 56, 250, 777, 3000):
        if max(h, w) / min(h, w) > 200:
          continue
        assert ip.smart_resize(h, w, factor, lo, hi) == hf_module.smart_resize(h, w, factor, lo, hi)
  with pytest.raises(ValueError, match="aspect ratio"):
    ip.smart_resize(10, 2010, 28, 3136, 40000)


def test_tokens_per_image():
  cfg = ip.ImageProcessorConfig()
  assert ip.tokens_per_image((1, 4, 6), cfg) == 6
  assert ip.tokens_per_image(np.array([2, 8, 10]), cfg) == 40
  assert ip.tokens_per_image((1, 6, 6), ip.ImageProcessorConfig(merge_size=3)) == 4


def _pixels(cfg):
  return cfg.min_pixels, cfg.max_pixels


@pytest.mark.parametrize("d", [
    {"min_pixels": 1000, "max_pixels": 90000},  # Qwen2-VL: top level only
    {"size": {"shortest_edge": 1000, "longest_edge": 90000}},  # transformers 5 / Qwen3-VL
    {"size": {"shortest_edge": 5, "longest_edge": 7}, "min_pixels": 1000, "max_pixels": 90000},
    {"size": {"shortest_edge": 1000, "longest_edge": 7}, "max_pixels": 90000},
], ids=["top-level", "size", "both", "mixed"])
def test_pixel_bounds_resolve_as_hf(d):
  hf = _hf(d)
  assert _pixels(ip.ImageProcessorConfig.from_json(d)) == (hf.size.shortest_edge,
                                                           hf.size.longest_edge) == (1000, 90000)


def test_from_json_reads_every_form(tmp_path):
  cfg = ip.ImageProcessorConfig.from_json(QWEN3_STYLE)
  assert (cfg.patch_size, cfg.min_pixels, cfg.max_pixels, cfg.image_mean) == (
      16, 4096, 65536, (0.5, 0.5, 0.5))
  assert ip.ImageProcessorConfig.from_json({}) == ip.ImageProcessorConfig()
  assert _pixels(ip.ImageProcessorConfig.from_json({"size": {"min_pixels": 10, "max_pixels": 900}})
                 ) == (10, 900)  # the size dict of older transformers versions
  assert ip.ImageProcessorConfig.from_json({"image_mean": 0.5}).image_mean == (0.5, 0.5, 0.5)
  full = {**QWEN25_STYLE, "resample": 2, "rescale_factor": 0.5, "do_resize": True}
  cfg = ip.ImageProcessorConfig.from_json(full)
  assert (cfg.resample, cfg.rescale_factor) == (2, 0.5)
  # A file, a checkpoint directory, and a directory whose processor_config.json nests it (which
  # transformers prefers over preprocessor_config.json).
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(QWEN25_STYLE))
  file_cfg = ip.ImageProcessorConfig.from_json(tmp_path / "preprocessor_config.json")
  assert file_cfg == ip.ImageProcessorConfig.from_json(str(tmp_path)) == (
      ip.ImageProcessorConfig.from_json(QWEN25_STYLE))
  (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": QWEN3_STYLE}))
  nested = ip.ImageProcessorConfig.from_json(tmp_path)
  hf = hf_module.Qwen2VLImageProcessorPil.from_pretrained(str(tmp_path))
  assert nested == ip.ImageProcessorConfig.from_json(QWEN3_STYLE)
  assert (nested.patch_size, *_pixels(nested)) == (hf.patch_size, hf.size.shortest_edge,
                                                   hf.size.longest_edge)
  assert ip.ImageProcessorConfig.from_json(tmp_path / "processor_config.json") == nested
  # A processor_config.json without an image processor entry leaves preprocessor_config.json.
  (tmp_path / "processor_config.json").write_text(json.dumps({"processor_class": "X"}))
  assert ip.ImageProcessorConfig.from_json(tmp_path) == file_cfg


@pytest.mark.parametrize("d, field", [
    ({"patch_size": 0}, "patch_size"),
    ({"merge_size": 2.0}, "merge_size"),
    ({"temporal_patch_size": True}, "temporal_patch_size"),
    ({"min_pixels": 5000, "max_pixels": 4000}, "max_pixels"),
    ({"size": {"shortest_edge": 10, "longest_edge": 100}}, "max_pixels"),  # below one window
    ({"image_mean": [0.5, 0.5]}, "image_mean"),
    ({"image_std": [0.5, 0.0, 0.5]}, "image_std"),
    ({"image_std": "0.5"}, "image_std"),
    ({"resample": 9}, "resample"),
    ({"rescale_factor": 0}, "rescale_factor"),
    ({"do_normalize": False}, "do_normalize"),
    ({"do_convert_rgb": False}, "do_convert_rgb"),
    ({"size": [224, 224]}, "size"),
])
def test_config_errors_name_the_field(d, field):
  with pytest.raises(FieldError) as e:
    ip.ImageProcessorConfig.from_json(d)
  assert e.value.field == field and "\n" not in str(e.value)


def test_unreadable_sources_and_bad_images(tmp_path):
  with pytest.raises(FieldError, match="preprocessor_config.json"):
    ip.ImageProcessorConfig.from_json(tmp_path)
  (tmp_path / "bad.json").write_text("{not json")
  with pytest.raises(FieldError, match="readable json"):
    ip.ImageProcessorConfig.from_json(tmp_path / "bad.json")
  cfg = ip.ImageProcessorConfig()
  with pytest.raises(FieldError, match="uint8"):
    ip.preprocess([np.zeros((30, 30, 3), np.float32)], cfg)
  with pytest.raises(FieldError, match="multiples"):
    ip.patchify(np.zeros((28, 30, 3), np.float32), cfg)
  with pytest.raises(FieldError, match="at least one image"):
    ip.preprocess([], cfg)
