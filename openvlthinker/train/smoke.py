"""`--mode=forward`: build the sharded model and run one jitted forward (an install check)."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from openvlthinker.models.build import build_model, vlm_config
from openvlthinker.train.context import make_sharder


def forward_smoke(config) -> dict:
  model = build_model(vlm_config(config.model), make_sharder(config), seed=config.seed)
  cfg = model.cfg
  b, t = 2, cfg.num_image_tokens
  tokens = np.concatenate([np.full((b, t), cfg.image_token_id), np.ones((b, 16))], 1)
  tokens = tokens.astype(np.int32)
  positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape).astype(np.int32)
  size = cfg.vision.image_size
  images = np.random.default_rng(0).integers(0, 255, (b, 1, size, size, 3), dtype=np.uint8)
  start = time.perf_counter()
  logits = jax.block_until_ready(jax.jit(lambda m, *a: m(*a)[0])(model, tokens, positions, images))
  return dict(logits_shape=logits.shape, finite=bool(jnp.isfinite(logits).all()),
              seconds=round(time.perf_counter() - start, 3), devices=jax.device_count())
