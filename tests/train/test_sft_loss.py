"""The SFT loss against a numpy cross-entropy: logits at t - 1 scored against tokens[t] at the
target positions, from a forward given hand-written positions and prefix masks (full prefix
attention, as the pod preset, so a wrong prefix changes the logits)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import test as test_config
from openvlthinker.models.build import build_model, vlm_config
from openvlthinker.train import sft

IMG = 3
# [bos, <image>, prompt..., response..., eos], right-padded; targets are the response and eos.
ROWS = [([1, IMG, 20, 21], [30, 31, 2]),
        ([1, IMG, 22], [32, 33, 34, 35, 36, 2]),
        ([1, IMG, 23, 24, 25, 26], [37, 2])]
L = 9
POSITIONS = np.array([[0, 1, 2, 3, 4, 5, 6, 6, 6],
                      [0, 1, 2, 3, 4, 5, 6, 7, 8],
                      [0, 1, 2, 3, 4, 5, 6, 7, 7]], np.int32)
PREFIX = np.array([[1, 1, 1, 1, 0, 0, 0, 0, 0],
                   [1, 1, 1, 0, 0, 0, 0, 0, 0],
                   [1, 1, 1, 1, 1, 1, 0, 0, 0]], bool)


def sft_batch():
  tokens = np.zeros((3, L), np.int32)
  input_mask = np.zeros((3, L), bool)
  loss_mask = np.zeros((3, L), bool)
  for i, (prompt, response) in enumerate(ROWS):
    n = len(prompt) + len(response)
    tokens[i, :n] = prompt + response
    input_mask[i, :n] = True
    loss_mask[i, len(prompt):n] = True
  images = np.random.default_rng(0).integers(0, 256, (3, 1, 16, 16, 3), dtype=np.uint8)
  return {"tokens": tokens, "input_mask": input_mask, "loss_mask": loss_mask, "images": images}


@pytest.fixture(scope="module")
def model():
  c = test_config.get_config().model
  c.prefix_full_attention = True
  c.vision.update(image_size=16, patch_size=8, width=16, num_layers=1, num_heads=2, mlp_dim=32)
  return nnx.split(build_model(vlm_config(c), seed=0))


@functools.partial(jax.jit, static_argnums=0)
def forward(graphdef, params, tokens, positions, images, mask, prefix):
  return nnx.merge(graphdef, params)(tokens, positions, images, input_mask=mask,
                                     prefix_mask=prefix)[0]


def log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def numpy_loss(logits, batch):
  logp = log_softmax(logits)
  nll, hits = [], []
  for b, t in zip(*np.nonzero(batch["loss_mask"])):
    assert t >= 1
    nll.append(-logp[b, t - 1, batch["tokens"][b, t]])
    hits.append(np.argmax(logp[b, t - 1]) == batch["tokens"][b, t])
  return np.mean(nll), np.mean(hits), len(nll)


def test_positions_and_prefix_mask_of_a_padded_batch(model):
  b = sft_batch()
  positions, _ = nnx.merge(*model).prompt_positions(jnp.asarray(b["tokens"]),
                                                    jnp.asarray(b["input_mask"]))
  np.testing.assert_array_equal(positions, POSITIONS)
  np.testing.assert_array_equal(
      sft.prefix_mask_of(jnp.asarray(b["input_mask"]), jnp.asarray(b["loss_mask"])), PREFIX)


def test_sft_loss_equals_numpy_cross_entropy(model):
  graphdef, params = model
  batch = sft_batch()
  logits = forward(graphdef, params, batch["tokens"], POSITIONS, batch["images"],
                   batch["input_mask"], PREFIX)
  want_loss, want_acc, count = numpy_loss(logits, batch)
  loss, metrics = jax.jit(sft.sft_loss, static_argnums=1)(params, graphdef, batch)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["token_accuracy"], want_acc, atol=1e-6)
  assert metrics["target_tokens"] == count == 11
  # The test has teeth: a causal forward (prefix ignored), a prefix one token longer, or logits
  # scored against the tokens at their own column all give other losses.
  causal = forward(graphdef, params, batch["tokens"], POSITIONS, batch["images"],
                   batch["input_mask"], None)
  longer = PREFIX | (np.cumsum(batch["loss_mask"], 1) == 1)
  longer_logits = forward(graphdef, params, batch["tokens"], POSITIONS, batch["images"],
                          batch["input_mask"], longer)
  for other in (numpy_loss(causal, batch)[0], numpy_loss(longer_logits, batch)[0]):
    assert abs(other - want_loss) > 1e-3
  logp = log_softmax(logits)
  same_column = np.mean([-logp[b, t, batch["tokens"][b, t]]
                         for b, t in zip(*np.nonzero(batch["loss_mask"]))])
  assert abs(same_column - want_loss) > 1e-2
