"""Dispatches a validated config to the requested stage."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from openvlthinker import sharding
from openvlthinker.models.build import build_model, vlm_config


def make_sharder(config) -> sharding.Sharder:
  mesh = sharding.make_mesh({a: config.mesh[a] for a in sharding.MESH_AXES})
  return sharding.Sharder(mesh, tuple((k, v) for k, v in config.sharding_rules))


def forward_smoke(config) -> dict:
  """Builds the model and runs one jitted forward over a random image+text batch."""
  shd = make_sharder(config)
  model = build_model(vlm_config(config.model), shd, seed=config.seed)
  cfg = model.cfg
  b, n_img = 2, 1
  t = cfg.num_image_tokens
  tokens = np.concatenate([np.full((b, t), cfg.image_token_id), np.ones((b, 16))], 1).astype(np.int32)
  positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape).astype(np.int32)
  size = cfg.vision.image_size
  images = np.random.default_rng(0).integers(0, 255, (b, n_img, size, size, 3), dtype=np.uint8)
  fwd = jax.jit(lambda m, *a: m(*a)[0])
  start = time.perf_counter()
  logits = jax.block_until_ready(fwd(model, tokens, positions, images))
  return dict(logits_shape=logits.shape, finite=bool(jnp.isfinite(logits).all()),
              seconds=time.perf_counter() - start, devices=jax.device_count())


def run(config, workdir: str, mode: str):
  if mode == "forward":
    print(forward_smoke(config))
    return
  raise SystemExit(f"--mode={mode}: the trainer is not built yet; use --mode=forward")
