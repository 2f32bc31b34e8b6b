"""The Qwen2.5-VL vision tower against transformers' Qwen2_5_VisionTransformerPretrainedModel on
the same random weights (float32, eager attention): square and non-square images whose grids are
not a multiple of the attention window, two images in one row, a two-frame video; rows of a batch
independent of each other; the same output sharded on a mesh and rematerialised; the weight rules
cover HF's state_dict exactly and round-trip.

The tiny config has windows of 2×2 merged tokens (window_size 16 = 2 merge × 4 patch × 2), so
every grid here has several windows, partial ones at the bottom and right edges.
"""
import functools

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel)

from openvlthinker.fields import FieldError
from openvlthinker.models.hf.mapping import find_rule
from openvlthinker.models.qwen2_5_vision import Qwen25VisionConfig, Qwen25VisionTower, hf_rules
from openvlthinker.sharding import Sharder, make_mesh, state_shardings

ATOL = 1e-4
HF_CONFIG = dict(depth=4, hidden_size=32, num_heads=4, intermediate_size=64, out_hidden_size=48,
                 patch_size=4, temporal_patch_size=2, spatial_merge_size=2, window_size=16,
                 fullatt_block_indexes=[1, 3], in_channels=3)
PREFIX = "model.visual"

GRIDS = {
    "square": ((1, 8, 8),),
    "non_square": ((1, 6, 10),),
    "two_images": ((1, 6, 10), (1, 10, 4)),
    "two_frames": ((2, 6, 8),),
}


@pytest.fixture(scope="module")
def hf_model():
  config = Qwen2_5_VLVisionConfig(**HF_CONFIG)
  config._attn_implementation = "eager"
  torch.manual_seed(0)
  model = Qwen2_5_VisionTransformerPretrainedModel(config).eval()
  # HF initialises norms to 1 and biases to 0; random ones make every tensor count.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.copy_((1.0 if "norm" in name or "ln_q" in name else 0.0) + 0.1 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) * p[0].numel() ** -0.5)
  return model


@pytest.fixture(scope="module")
def cfg(hf_model):
  return Qwen25VisionConfig.from_hf(hf_model.config.to_dict())


def hf_state(model) -> dict[str, np.ndarray]:
  return {f"{PREFIX}.{k}": v.numpy() for k, v in model.state_dict().items()}


def load(tower: Qwen25VisionTower, cfg, state: dict[str, np.ndarray], shardings=None):
  """Writes HF `state` into `tower` through the rules (ours_prefix "": the tower is the root)."""
  rules = hf_rules(PREFIX, "")
  params = nnx.state(tower, nnx.Param)
  flat = {".".join(map(str, path)): v for path, v in nnx.to_flat_state(params)}
  for name, x in state.items():
    rule, path = find_rule(rules, name)
    flat[path].set_value(rule.to_ours(x, cfg))
  if shardings is not None:
    params = jax.device_put(params, shardings)
  nnx.update(tower, params)
  return tower


@functools.partial(jax.jit, static_argnums=(0, 3))
def forward(graphdef, state, patches, grids):
  return nnx.merge(graphdef, state)(patches, grids)


def run(tower, patches, grids):
  graphdef, state = nnx.split(tower)
  return np.asarray(forward(graphdef, state, patches, grids))


@pytest.fixture(scope="module")
def tower(cfg, hf_model):
  return load(Qwen25VisionTower(cfg, rngs=nnx.Rngs(0)), cfg, hf_state(hf_model))


def pixels(cfg, grids, seed, rows=None):
  m = sum(t * h * w for t, h, w in grids)
  shape = (m, cfg.patch_dim) if rows is None else (rows, m, cfg.patch_dim)
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def hf_forward(hf_model, patches, grids):
  with torch.no_grad():
    out = hf_model(hidden_states=torch.from_numpy(patches), grid_thw=torch.tensor(grids))
  return out.pooler_output.numpy()


def test_rules_cover_hf_state_dict_exactly_and_round_trip(cfg, hf_model, tower):
  state = hf_state(hf_model)
  ours = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(tower, nnx.Param))}
  rules = hf_rules(PREFIX, "")
  filled = {}
  for name, x in state.items():
    found = find_rule(rules, name)
    assert found is not None, f"no rule for HF tensor {name}"
    rule, path = found
    assert path in ours, f"{name} → {path}, not a parameter of ours"
    assert path not in filled, f"{name} and {filled.get(path)} both fill {path}"
    filled[path] = name
    y = rule.to_ours(x, cfg)
    assert y.shape == ours[path].shape, (name, y.shape, ours[path].shape)
    np.testing.assert_array_equal(rule.to_hf(y, cfg), x, err_msg=name)
    assert rule.hf_name(path) == name
  assert set(filled) == set(ours), f"parameters no HF tensor fills: {set(ours) - set(filled)}"
  # The default prefixes name the tensors of a full Qwen2.5-VL checkpoint.
  name = "model.visual.blocks.3.attn.qkv.weight"
  rule, path = find_rule(hf_rules(), name)
  assert path == "vision.blocks.3.qkv" and rule.hf_name(path) == name


@pytest.mark.parametrize("case", list(GRIDS))
def test_matches_transformers(cfg, hf_model, tower, case):
  grids = GRIDS[case]
  patches = pixels(cfg, grids, seed=1)
  want = hf_forward(hf_model, patches, grids)
  got = run(tower, patches[None], grids)
  assert got.shape == (1,) + want.shape
  np.testing.assert_allclose(got[0], want, atol=ATOL, rtol=0)


def test_rows_are_independent_sharded_and_rematerialised(cfg, hf_model, tower):
  grids = GRIDS["two_images"]
  patches = pixels(cfg, grids, seed=2, rows=2)
  rows = [run(tower, patches[i:i + 1], grids)[0] for i in range(2)]
  assert np.abs(rows[0] - rows[1]).max() > 10 * ATOL  # different inputs, different outputs
  np.testing.assert_allclose(run(tower, patches, grids), np.stack(rows), atol=ATOL, rtol=0)

  # Parameters and activations laid out by their logical axes on a (data, fsdp, tensor) mesh,
  # blocks rematerialised: the same numbers.
  sharder = Sharder(make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
  remat = Qwen25VisionConfig.from_hf(hf_model.config.to_dict(), remat=True)
  sharded = Qwen25VisionTower(remat, sharder, rngs=nnx.Rngs(1))
  shardings = state_shardings(nnx.state(sharded, nnx.Param), sharder)
  sharded = load(sharded, remat, hf_state(hf_model), shardings)
  assert any(len(s.device_set) > 1 and not s.is_fully_replicated
             for s in jax.tree.leaves(shardings))
  np.testing.assert_allclose(run(sharded, sharder.put_batch(patches), grids), np.stack(rows),
                             atol=ATOL, rtol=0)


def test_config_from_hf_and_validation():
  released = dict(depth=32, hidden_act="silu", hidden_size=1280, intermediate_size=3420,
                  num_heads=16, in_chans=3, out_hidden_size=3584, patch_size=14,
                  spatial_merge_size=2, spatial_patch_size=14, window_size=112,
                  fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2,
                  temporal_patch_size=2, model_type="qwen2_5_vl")
  cfg = Qwen25VisionConfig.from_hf(released, dtype="bfloat16")
  assert (cfg.head_dim, cfg.patch_dim, cfg.merge_unit, cfg.merged_window) == (80, 1176, 4, 4)
  assert cfg.fullatt_block_indexes == (7, 15, 23, 31) and cfg.dtype == "bfloat16"
  assert cfg.rope_theta == 10_000.0
  base = dict(depth=2, hidden_size=32, num_heads=4, intermediate_size=64, out_hidden_size=48,
              fullatt_block_indexes=(1,))
  for field, bad in [("num_heads", 3), ("num_heads", 16), ("fullatt_block_indexes", (2,)),
                     ("fullatt_block_indexes", [1]), ("window_size", 27), ("hidden_act", "relu"),
                     ("dtype", "float16"), ("depth", 0)]:
    with pytest.raises(FieldError, match=field):
      Qwen25VisionConfig(**{**base, field: bad})


def test_rejects_grids_that_do_not_fit(cfg, tower):
  with pytest.raises(ValueError, match="spatial_merge_size"):
    tower(pixels(cfg, ((1, 5, 8),), 0, rows=1), ((1, 5, 8),))
  with pytest.raises(ValueError, match="patches: expected"):
    tower(pixels(cfg, ((1, 8, 8),), 0, rows=1), ((1, 8, 6),))
