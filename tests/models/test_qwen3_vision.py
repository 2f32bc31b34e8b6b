"""The Qwen3-VL vision tower against transformers' Qwen3VLVisionModel on the same random weights
(merged and DeepStack features, gradients into the position table), a sharded batch of rows, and
the HF name rules (exact cover, layout round trip)."""

import dataclasses
import re

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Qwen3VLVisionConfig, Qwen3VLVisionModel

from openvlthinker.fields import FieldError
from openvlthinker.models.hf.mapping import find_rule
from openvlthinker.models.qwen3_vision import Qwen3VisionConfig, Qwen3VisionTower, hf_rules
from openvlthinker.sharding import Sharder, make_mesh, state_shardings

ATOL = 1e-4
HF_CONFIG = dict(depth=4, hidden_size=32, num_heads=4, intermediate_size=64, out_hidden_size=48,
                 num_position_embeddings=64, deepstack_visual_indexes=[0, 2])
# An 8 × 8 position table: a square grid of its size, a non-square one of neither side, two
# images of different shapes in one row, and an image beside a two-frame video.
GRIDS = {
    "square": ((1, 8, 8),),
    "non_square": ((1, 6, 10),),
    "two_images": ((1, 4, 6), (1, 10, 4)),
    "video": ((1, 4, 4), (2, 6, 4)),
}


@pytest.fixture(scope="module")
def hf_model():
  torch.manual_seed(0)
  model = Qwen3VLVisionModel(Qwen3VLVisionConfig(**HF_CONFIG)).eval()
  # Random weights everywhere (HF initialises norms to 1 / 0 and biases to 0, which would hide
  # swapped or missing norm and bias mappings); an O(1) position table, so that a misplaced
  # interpolation tap moves the output.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name and name.endswith("weight"):
        p.copy_(1 + 0.2 * torch.randn_like(p))
      elif p.ndim == 1:
        p.copy_(0.1 * torch.randn_like(p))
      elif name == "pos_embed.weight":
        p.copy_(torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) * p[0].numel() ** -0.5)
  return model


@pytest.fixture(scope="module")
def cfg(hf_model):
  return Qwen3VisionConfig.from_hf(hf_model.config.to_dict())


def hf_state(hf_model):
  return {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}


def our_params(model):
  """{'.'-joined path: nnx.Param} of `model`."""
  return {".".join(map(str, path)): var
          for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def load(model, state_dict, cfg):
  """Writes an HF state dict into `model` through `hf_rules` (a test-side converter)."""
  params = our_params(model)
  for name, array in state_dict.items():
    rule, path = find_rule(hf_rules("", ""), name)
    value, target = rule.to_ours(array, cfg), params[path].get_value()
    assert value.shape == target.shape, (name, path)
    params[path].set_value(jax.numpy.asarray(value, target.dtype))
  return model


@pytest.fixture(scope="module")
def model(cfg, hf_model):
  # Built abstractly (eager random init costs seconds): every parameter comes from HF.
  abstract = nnx.eval_shape(lambda: Qwen3VisionTower(cfg, rngs=nnx.Rngs(0)))
  return load(abstract, hf_state(hf_model), cfg)


def patches_for(cfg, grids, rows=1, seed=0):
  m = sum(t * h * w for t, h, w in grids)
  return np.random.default_rng(seed).standard_normal((rows, m, cfg.patch_dim), np.float32)


def hf_forward(hf_model, patches, grids):
  """HF's (merged features, deepstack features) for one row of patches [M, patch_dim]."""
  with torch.no_grad():
    out = hf_model(torch.from_numpy(patches), torch.tensor(grids))
  return out.pooler_output.numpy(), [x.numpy() for x in out.deepstack_features]


# One compilation per (model graph, patch shape, grids), shared by the tests.
_FORWARD = nnx.jit(lambda m, patches, grids: m(patches, grids), static_argnums=2)


def forward(model, patches, grids):
  return _FORWARD(model, patches, grids)


def assert_matches(ours, theirs):
  features, deepstack = ours
  want_features, want_deepstack = theirs
  np.testing.assert_allclose(np.asarray(features), want_features, atol=ATOL, rtol=0)
  assert len(deepstack) == len(want_deepstack) == len(HF_CONFIG["deepstack_visual_indexes"])
  for got, want in zip(deepstack, want_deepstack):
    np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", list(GRIDS))
def test_matches_transformers(model, hf_model, cfg, case):
  grids = GRIDS[case]
  patches = patches_for(cfg, grids)
  features, deepstack = forward(model, patches, grids)
  m = patches.shape[1] // 4
  assert features.shape == (1, m, 48) and all(d.shape == (1, m, 48) for d in deepstack)
  want = hf_forward(hf_model, patches[0], grids)
  assert_matches((features[0], [d[0] for d in deepstack]), want)


def test_position_table_gradient_matches_transformers(model, hf_model, cfg):
  """The interpolated positions are a differentiable gather: the table's gradient is HF's."""
  grids = GRIDS["two_images"]
  patches = patches_for(cfg, grids, seed=1)
  probe = np.random.default_rng(2).standard_normal((patches.shape[1] // 4, 48), np.float32)

  def loss(m):
    features, deepstack = m(patches, grids)
    return sum((x[0] * probe).sum() for x in (features,) + deepstack)

  # Differentiated with respect to the table only (no weight gradients to compile).
  wrt = nnx.DiffState(0, nnx.All(nnx.Param, nnx.PathContains("pos")))
  grads = nnx.jit(nnx.grad(loss, argnums=wrt))(model)
  hf_model.zero_grad()
  out = hf_model(torch.from_numpy(patches[0]), torch.tensor(grids))
  torch_probe = torch.from_numpy(probe)
  sum((x * torch_probe).sum() for x in [out.pooler_output] + out.deepstack_features).backward()
  want = hf_model.pos_embed.weight.grad.numpy()
  assert np.abs(want).max() > 1e-2
  np.testing.assert_allclose(np.asarray(grads.pos[...]), want, atol=ATOL, rtol=0)


def test_sharded_batch_rows_are_independent(model, hf_model, cfg):
  """Two rows with the same grids, on a data × fsdp × tensor mesh: each row's result is its
  single-row result and HF's."""
  grids = GRIDS["two_images"]
  patches = patches_for(cfg, grids, rows=2, seed=3)
  sharder = Sharder(make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
  state = nnx.state(model)
  state = jax.device_put(state, state_shardings(state, sharder))
  sharded = nnx.merge(nnx.graphdef(nnx.eval_shape(
      lambda: Qwen3VisionTower(cfg, sharder, rngs=nnx.Rngs(0)))), state)
  assert any(len(v[...].sharding.device_set) > 1 and not v[...].sharding.is_fully_replicated
             for v in our_params(sharded).values())
  features, deepstack = forward(sharded, sharder.put_batch(patches), grids)
  single = forward(model, patches[1:], grids)
  for row in range(2):
    assert_matches((features[row], [d[row] for d in deepstack]),
                   hf_forward(hf_model, patches[row], grids))
  assert_matches((features[1], [d[1] for d in deepstack]),
                 (np.asarray(single[0][0]), [np.asarray(d[0]) for d in single[1]]))


@dataclasses.dataclass(frozen=True)
class Outer:
  """A model config holding the tower's (the hooks find it inside)."""
  width: int
  tower: Qwen3VisionConfig


@pytest.mark.parametrize("prefixes", [("model.visual", "vision"), ("", "")])
def test_rules_cover_hf_state_dict_and_round_trip(model, hf_model, cfg, prefixes):
  hf_prefix, ours_prefix = prefixes
  if hf_prefix:  # As the converter of a whole model calls the hooks.
    cfg = Outer(width=48, tower=cfg)
  rules = hf_rules(hf_prefix, ours_prefix)
  params = our_params(model)
  if ours_prefix:
    params = {f"{ours_prefix}.{k}": v for k, v in params.items()}
  filled = {}
  for name, array in hf_state(hf_model).items():
    full = f"{hf_prefix}.{name}" if hf_prefix else name
    matches = [r for r in rules if r.match(full) is not None]
    assert len(matches) == 1, (full, matches)
    rule, path = matches[0], matches[0].match(full)
    assert path not in filled, (full, path, filled.get(path))
    filled[path] = full
    assert rule.hf_name(path) == full
    ours = rule.to_ours(array, cfg)
    assert ours.shape == params[path][...].shape, (full, path)
    np.testing.assert_array_equal(rule.to_hf(ours, cfg), array)
  assert set(filled) == set(params)


def test_layouts_are_the_hf_maths(cfg):
  """The hooks' layouts, on known tensors: the Conv3d kernel flattens as (C, T, P, P) and the
  fused qkv rows split into q, k, v, then heads."""
  rules = {r.ours: r for r in hf_rules("", "")}
  d, h = cfg.hidden_size, cfg.head_dim
  kernel = np.random.default_rng(0).standard_normal((d, 3, 2, 16, 16), np.float32)
  flat = np.random.default_rng(1).standard_normal((5, 3, 2, 16, 16), np.float32)
  conv = torch.nn.functional.conv3d(torch.from_numpy(flat), torch.from_numpy(kernel),
                                    stride=(2, 16, 16)).reshape(5, d).numpy()
  np.testing.assert_allclose(flat.reshape(5, -1) @ rules["patch"].to_ours(kernel, cfg), conv,
                             rtol=1e-5, atol=ATOL)
  qkv = np.arange(3 * d * d, dtype=np.float32).reshape(3 * d, d)
  ours = rules["blocks.{0}.qkv"].to_ours(qkv, cfg)
  np.testing.assert_array_equal(ours[1, :, 2, 3], qkv[d + 2 * h + 3])  # k, head 2, dim 3


def test_config_from_hf_and_validation(hf_model):
  cfg = Qwen3VisionConfig.from_hf(hf_model.config.to_dict(), dtype="bfloat16")
  assert (cfg.depth, cfg.hidden_size, cfg.deepstack_visual_indexes, cfg.dtype, cfg.patch_dim,
          cfg.rope_theta) == (4, 32, (0, 2), "bfloat16", 3 * 2 * 16 * 16, 10_000.0)
  for bad, field in [(dict(num_position_embeddings=60), "num_position_embeddings"),
                     (dict(deepstack_visual_indexes=(2, 0)), "deepstack_visual_indexes"),
                     (dict(deepstack_visual_indexes=(4,)), "deepstack_visual_indexes"),
                     (dict(num_heads=5), "num_heads"), (dict(num_heads=16), "num_heads"),
                     (dict(hidden_act="relu"), "hidden_act")]:
    with pytest.raises(FieldError, match=re.escape(field)):
      Qwen3VisionConfig(**{**HF_CONFIG, "deepstack_visual_indexes": (0, 2), **bad})


def test_rejects_mismatched_grids(model, cfg):
  with pytest.raises(ValueError, match="patches: expected"):
    model(patches_for(cfg, ((1, 4, 4),)), ((1, 4, 6),))
  with pytest.raises(ValueError, match="grids: expected"):
    model(patches_for(cfg, ((1, 3, 4),)), ((1, 3, 4),))
