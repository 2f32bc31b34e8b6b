"""Our Qwen2.5-VL / Qwen3-VL compute what transformers computes on the same weights.

Each family's tiny random checkpoint is written once with transformers' `save_pretrained`
(`tools/tiny_qwen_vl.py`) and loaded through our checkpoint reader, converter and name mapping;
transformers' model (eager attention, float32) is the reference for logits with and without
images, padding, greedy generation and the sampler's log-probs.
"""
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "tools"))
import tiny_qwen_vl  # noqa: E402  pylint: disable=g-import-not-at-top

from flax import nnx  # noqa: E402
from openvlthinker.generate import canvas  # noqa: E402
from openvlthinker.models.hf import pretrained  # noqa: E402
from openvlthinker.sampler import Sampler, SamplerConfig  # noqa: E402

ATOL = 1e-4
# (H, W) of two non-square images of different sizes (multiples of patch * merge).
SIZES = {"qwen2_5_vl": ((56, 84), (84, 56)), "qwen3_vl": ((64, 96), (96, 64))}


class Family:
  """A tiny checkpoint, transformers' model of it and helpers to build prompts."""

  def __init__(self, name, directory):
    self.name, self.directory = name, directory
    self.net, self.tok, self.processor = tiny_qwen_vl.write(name, directory)
    self.net.generation_config.eos_token_id = None  # run every generation to its length
    ids = self.tok.convert_tokens_to_ids
    self.start, self.end, self.pad = ids("<|vision_start|>"), ids("<|vision_end|>"), \
        ids("<|image_pad|>")
    self.models = {}

  def model(self, sizes):
    """Our model of the checkpoint for images of `sizes`, loaded once per size tuple."""
    if sizes not in self.models:
      cfg = pretrained.model_config(self.directory, image_sizes=sizes)
      self.models[sizes] = pretrained.build(cfg, directory=self.directory)
    return self.models[sizes]

  def images(self, sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]

  def prompt(self, text, images):
    """Token ids with each image's pads as the processor expands them, and HF's pixel inputs."""
    ids, hf = [], {}
    if images:
      out = self.processor(images=images, return_tensors="pt")
      hf = {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}
      for grid in out["image_grid_thw"].tolist():
        ids += [self.start] + [self.pad] * (int(np.prod(grid)) // 4) + [self.end]
    return ids + self.tok.encode(text), hf

  def hf_logits(self, ids, hf=None, mask=None):
    ids = torch.tensor(np.asarray(ids)[None] if np.ndim(ids) == 1 else ids, dtype=torch.long)
    kwargs = dict(hf or {})
    if "pixel_values" in kwargs:
      kwargs["mm_token_type_ids"] = (ids == self.pad).long()
    if mask is not None:
      kwargs["attention_mask"] = torch.tensor(mask, dtype=torch.long)
    with torch.no_grad():
      return self.net(input_ids=ids, **kwargs).logits.numpy()


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def family(request, tmp_path_factory):
  return Family(request.param, str(tmp_path_factory.mktemp(request.param)))


@functools.partial(jax.jit, static_argnames="graphdef")
def _forward(state, tokens, mask, images, *, graphdef):
  model = nnx.merge(graphdef, state)
  positions, _ = model.prompt_positions(tokens, mask)
  return model(tokens, positions, images, input_mask=mask)[0]


def ours_logits(model, tokens, mask=None, images=None):
  tokens = jnp.asarray(np.atleast_2d(tokens), jnp.int32)
  mask = jnp.ones(tokens.shape, bool) if mask is None else jnp.asarray(mask)
  graphdef, state = nnx.split(model)
  return np.asarray(_forward(state, tokens, mask, None if images is None else jnp.asarray(images),
                             graphdef=graphdef))


@pytest.mark.parametrize("num_images", [0, 1, 2])
def test_logits_equal_transformers(family, num_images):
  sizes = SIZES[family.name][:max(num_images, 1)]
  images = family.images(sizes)[:num_images]
  ids, hf = family.prompt("How many red circles are in the image? The answer is 42.", images)
  ours = ours_logits(family.model(sizes), ids, images=canvas(images) if images else None)
  ref = family.hf_logits(ids, hf)
  np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)


def test_padded_batch_rows_equal_each_row_alone(family):
  sizes = SIZES[family.name][:1]
  model = family.model(sizes)
  texts = ["What is 12 + 30?", "Which option is correct? A B C D E. Read the text."]
  rows = [family.prompt(t, family.images(sizes, seed=i)) for i, t in enumerate(texts)]
  width = max(len(ids) for ids, _ in rows) + 3
  tokens = np.zeros((2, width), np.int32)
  mask = np.zeros((2, width), bool)
  # Row 0 right-padded, row 1 left-padded.
  (a, _), (b, _) = rows
  tokens[0, :len(a)], mask[0, :len(a)] = a, True
  tokens[1, width - len(b):], mask[1, width - len(b):] = b, True
  images = np.concatenate([canvas(family.images(sizes, seed=i)) for i in range(2)])
  ours = ours_logits(model, tokens, mask, images)
  np.testing.assert_allclose(ours[0, :len(a)], family.hf_logits(a, rows[0][1])[0], atol=ATOL,
                             rtol=0)
  np.testing.assert_allclose(ours[1, width - len(b):], family.hf_logits(b, rows[1][1])[0],
                             atol=ATOL, rtol=0)


def out_banned(family):
  """Vision placeholders, banned from samples as in training (transformers would splice image
  features into a sampled one too)."""
  return family.tok.convert_tokens_to_ids(
      ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"])


def _sample(family, sizes, ids, images, *, greedy, max_new_tokens=32, seed=0):
  model = family.model(sizes)
  config = SamplerConfig(max_new_tokens=max_new_tokens, greedy=greedy, stop_tokens=(),
                         banned_tokens=() if greedy else out_banned(family),
                         pad_id=family.tok.pad_token_id, prompt_buckets=(64, 128))
  tokens = np.asarray([ids], np.int32)
  return Sampler(model, config)(nnx.state(model), tokens, np.ones_like(tokens, bool),
                                canvas(images), jax.random.key(seed))


def test_greedy_generation_equals_transformers_generate(family):
  sizes = SIZES[family.name][:1]
  images = family.images(sizes)
  ids, hf = family.prompt("Think inside <thinking> </thinking>, then answer.", images)
  out = _sample(family, sizes, ids, images, greedy=True)
  t = torch.tensor([ids], dtype=torch.long)
  with torch.no_grad():
    ref = family.net.generate(input_ids=t, attention_mask=torch.ones_like(t),
                              mm_token_type_ids=(t == family.pad).long(), max_new_tokens=32,
                              min_new_tokens=32, do_sample=False,
                              pad_token_id=family.tok.pad_token_id, **hf)
  np.testing.assert_array_equal(np.asarray(out.tokens[0]), ref[0, len(ids):].numpy())


def test_sampler_logprobs_equal_a_teacher_forced_transformers_forward(family):
  sizes = SIZES[family.name][:1]
  images = family.images(sizes, seed=3)
  ids, hf = family.prompt("Read the text in the image.", images)
  out = _sample(family, sizes, ids, images, greedy=False, max_new_tokens=24, seed=7)
  response = np.asarray(out.tokens[0])
  logits = family.hf_logits(np.concatenate([ids, response]), hf)[0][len(ids) - 1:-1]
  logits[:, list(out_banned(family))] = -np.inf  # the sampler draws from the banned-free softmax
  logp = torch.log_softmax(torch.tensor(logits), -1).numpy()
  ref = logp[np.arange(len(response)), response]
  np.testing.assert_allclose(np.asarray(out.logprobs[0]), ref, atol=ATOL, rtol=0)
  assert len(set(response.tolist())) > 1  # a real sample, not a constant row
