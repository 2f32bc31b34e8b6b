"""Image decoding: every PIL mode to 8-bit RGB by scaling (never clipping), and bad files as
ImageError with a reason. PNGs of any bit depth are written byte by byte here, so the expected
pixels come from the numbers written, not from PIL."""
import io
import struct
import zlib

import numpy as np
from PIL import Image
import pytest

from openvlthinker.data import images


def _chunk(kind: bytes, data: bytes) -> bytes:
  return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(pixels: np.ndarray, color_type: int, bit_depth: int, width=None, height=None) -> bytes:
  """A PNG of `pixels` (uint[H, W] or uint[H, W, C], 8 or 16 bits), filter 0 on every row.

  color_type: 0 gray, 2 RGB, 4 gray + alpha, 6 RGBA. width / height override the header only.
  """
  h, w = pixels.shape[:2]
  body = pixels.astype(">u2" if bit_depth == 16 else np.uint8).reshape(h, -1).tobytes()
  row = len(body) // h
  scanlines = b"".join(b"\0" + body[i * row:(i + 1) * row] for i in range(h))
  header = struct.pack(">IIBBBBB", width or w, height or h, bit_depth, color_type, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(scanlines))
          + _chunk(b"IEND", b""))


def _write(tmp_path, name, data: bytes) -> str:
  path = tmp_path / name
  path.write_bytes(data)
  return str(path)


def _saved(tmp_path, image: Image.Image, name: str, **kwargs) -> str:
  path = str(tmp_path / name)
  image.save(path, **kwargs)
  return path


GRADIENT16 = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)


def _gray(values: np.ndarray) -> np.ndarray:
  return np.repeat(np.asarray(values, np.uint8)[..., None], 3, axis=-1)


# ------------------------------------------------------------------------------ 16-bit


def test_16_bit_gray_png_is_scaled_not_clipped(tmp_path):
  path = _write(tmp_path, "gray16.png", raw_png(GRADIENT16, 0, 16))
  with Image.open(path) as image:  # what this Pillow decodes it to (Pillow < 10: "I")
    assert image.mode in ("I;16", "I")
  got = images.read_rgb(path)
  want = np.rint(GRADIENT16 / 257.0)
  np.testing.assert_array_equal(got, _gray(want))
  assert np.mean(got == 255) < 0.01  # convert("RGB") turned 99.6% of this gradient white


def test_16_bit_gray_png_written_by_pil_reads_the_same(tmp_path):
  path = _saved(tmp_path, Image.fromarray(GRADIENT16), "pil16.png")
  np.testing.assert_array_equal(images.read_rgb(path), _gray(np.rint(GRADIENT16 / 257.0)))


@pytest.mark.parametrize("color_type, channels", [(2, 3), (6, 4), (4, 2)])
def test_16_bit_colour_and_alpha_pngs_keep_their_levels(tmp_path, color_type, channels):
  planes = [GRADIENT16, GRADIENT16[::-1], 65535 - GRADIENT16][:channels]
  if channels in (2, 4):
    planes = planes[:channels - 1] + [np.full_like(GRADIENT16, 65535)]  # opaque alpha
  path = _write(tmp_path, "c16.png", raw_png(np.stack(planes, -1), color_type, 16))
  got = images.read_rgb(path).astype(int)
  colour = np.stack(planes[:-1] if channels in (2, 4) else planes, -1) / 257.0
  if channels == 2:
    colour = np.repeat(colour, 3, axis=-1)
  assert np.abs(got - colour).max() <= 1  # the top byte (Pillow) or v / 257: within one level


def test_32_bit_integer_images(tmp_path):
  path = _saved(tmp_path, Image.fromarray(GRADIENT16.astype(np.int32), mode="I"), "i16.tif")
  with Image.open(path) as image:
    assert image.mode == "I"
  np.testing.assert_array_equal(images.read_rgb(path), _gray(np.rint(GRADIENT16 / 257.0)))
  # Outside the 16-bit range: the image's own range is stretched onto 0..255.
  wide = np.linspace(-1000, 200_000, 64).astype(np.int32).reshape(8, 8)
  path = _saved(tmp_path, Image.fromarray(wide, mode="I"), "wide.tif")
  want = np.rint((wide - wide.min()) * 255.0 / (wide.max() - wide.min()))
  np.testing.assert_array_equal(images.read_rgb(path), _gray(want))


@pytest.mark.parametrize("values, want", [
    (np.linspace(0, 1, 64), lambda v: v * 255),  # intensities in [0, 1]
    (np.linspace(0, 255, 64), lambda v: v),  # already 8-bit levels
    (np.linspace(-2, 6, 64), lambda v: (v + 2) * 255 / 8),  # any other range is stretched
])
def test_float_images(tmp_path, values, want):
  values = values.astype(np.float32).reshape(8, 8)
  path = _saved(tmp_path, Image.fromarray(values, mode="F"), "f.tif")
  np.testing.assert_array_equal(images.read_rgb(path),
                                _gray(np.rint(want(values.astype(np.float64)))))


def test_float_nan_and_inf_read_as_zero_and_do_not_set_the_range():
  values = np.array([[0.0, 0.5, np.nan, np.inf, -np.inf, 1.0]], np.float32)
  got = images.to_rgb(Image.fromarray(values, mode="F"))[..., 0]
  assert got.tolist() == [[0, 128, 0, 0, 0, 255]]


# ------------------------------------------------------------------------------ other modes


def test_alpha_is_composited_over_white(tmp_path):
  rgba = np.zeros((2, 3, 4), np.uint8)  # transparent black
  rgba[0, 1] = (255, 0, 0, 255)  # opaque red
  rgba[0, 2] = (0, 0, 255, 102)  # 40% blue
  got = images.read_rgb(_saved(tmp_path, Image.fromarray(rgba, "RGBA"), "a.png")).astype(int)
  assert got[1].tolist() == [[255, 255, 255]] * 3 and got[0, 0].tolist() == [255, 255, 255]
  assert got[0, 1].tolist() == [255, 0, 0]
  a = 102 / 255
  assert np.abs(got[0, 2] - np.array([255 * (1 - a), 255 * (1 - a), 255])).max() <= 0.5
  la = np.stack([np.zeros((2, 2), np.uint8), np.array([[0, 255], [255, 0]], np.uint8)], -1)
  got = images.read_rgb(_saved(tmp_path, Image.fromarray(la, "LA"), "la.png"))
  assert got[..., 0].tolist() == [[255, 0], [0, 255]]


def test_palette_transparency_is_composited_over_white(tmp_path):
  image = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
  image.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
  path = _saved(tmp_path, image, "p.png", transparency=0)
  got = images.read_rgb(path)
  assert got[0, 0].tolist() == [255, 255, 255] and got[0, 1].tolist() == [0, 255, 0]


def test_low_bit_depth_gray_png_is_scaled(tmp_path):
  # 2-bit gray: levels 0..3 are 0, 85, 170, 255.
  scanline = bytes([0, 0b00011011])
  header = struct.pack(">IIBBBBB", 4, 1, 2, 0, 0, 0, 0)
  data = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(scanline))
          + _chunk(b"IEND", b""))
  got = images.read_rgb(_write(tmp_path, "g2.png", data))
  assert got[..., 0].tolist() == [[0, 85, 170, 255]]


@pytest.mark.parametrize("mode", ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX",
                                  "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16", "I;16B", "I;16L",
                                  "I;16N", "F"])
def test_every_mode_gives_uint8_rgb(mode):
  got = images.to_rgb(Image.new(mode, (5, 3)))
  assert got.dtype == np.uint8 and got.shape == (3, 5, 3)


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "CMYK", "YCbCr", "LAB", "HSV"])
def test_8_bit_modes_without_alpha_match_pil(mode):
  rgb = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
  image = Image.fromarray(rgb).convert(mode)
  np.testing.assert_array_equal(images.to_rgb(image), np.asarray(image.convert("RGB")))


# ------------------------------------------------------------------------------ bad files


def _png_bytes(size=64):
  noise = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
  out = io.BytesIO()
  Image.fromarray(noise).save(out, format="PNG")
  return out.getvalue()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("data, reason", [
    (b"", r"^the file is empty$"),
    (np.random.default_rng(1).bytes(500), r"^not an image file PIL can identify$"),
    (_png_bytes()[:6000], r"truncated"),
    # Headers claiming huge sizes over a few bytes of data: refused from the header, before
    # decoding (decoding would report a truncated file instead).
    (raw_png(np.zeros((1, 1, 3)), 2, 8, width=12_000, height=12_000),
     r"^12000x12000 = 144000000 pixels, more than data\.max_image_pixels = 100000000$"),
    (raw_png(np.zeros((1, 1, 3)), 2, 8, width=20_000, height=20_000),
     r"^more than data\.max_image_pixels = 100000000 \(DecompressionBombError"),
])
def test_bad_files_raise_image_error_with_a_reason(tmp_path, data, reason):
  limit = Image.MAX_IMAGE_PIXELS
  with pytest.raises(images.ImageError, match=reason) as e:
    images.read_rgb(_write(tmp_path, "bad.png", data))
  assert "\n" not in str(e.value)
  assert Image.MAX_IMAGE_PIXELS == limit  # PIL's global is left alone


def test_missing_file_is_an_image_error(tmp_path):
  with pytest.raises(images.ImageError, match="No such file"):
    images.read_rgb(str(tmp_path / "nope.png"))


def test_the_pixel_limit_is_explicit(tmp_path):
  path = _saved(tmp_path, Image.new("L", (10, 10)), "ten.png")
  assert images.read_rgb(path, max_pixels=100).shape == (10, 10, 3)
  with pytest.raises(images.ImageError, match=r"10x10 = 100 pixels, more than .* = 99"):
    images.read_rgb(path, max_pixels=99)
  big = _saved(tmp_path, Image.new("1", (6000, 6000)), "big.png")  # 36M pixels, 4.5 MB of bits
  assert images.read_rgb(big).shape == (6000, 6000, 3)


@pytest.mark.parametrize("value, pattern", [
    (0, r"data\.max_image_pixels: expected a positive int, got 0"),
    (True, r"positive int"),
    (10**12, r"data\.max_image_pixels: expected at most \d+ \(PIL refuses"),
])
def test_bad_pixel_limits(value, pattern):
  with pytest.raises(ValueError, match=pattern):
    images.check_max_pixels(value)
