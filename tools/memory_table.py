"""Per-chip memory of the HF-family pod presets, from shapes and shardings (nothing is allocated):
parameters, AdamW state and gradients as the rule table shards them over the preset's mesh, the
rollout's KV cache at max_new_tokens (shared prompt prefix + per-sample slots, as the sampler
allocates them) and the update's activations under remat (the residual stream saved per layer,
one layer's MLP recomputed, float32 logits of a micro-batch's responses).

  python tools/memory_table.py [--chips=64] [--chip_gb=95]

The architectures are the published config.json values of Qwen2.5-VL-3B/7B-Instruct and
Qwen3-VL-8B-Instruct; prompts are taken at the largest prompt bucket. Prints one JSON line per
preset and a markdown table. Activation figures are estimates (XLA's temporaries come on top):
the compiled update's memory_analysis() on the accelerator is the check (#8's plan).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os

import jax
import numpy as np
from flax import nnx

from openvlthinker.models.hf import image_processor as improc
from openvlthinker.models.hf import qwen_vl as hf_qwen_vl
from openvlthinker.models.qwen_vl import QwenVL
from openvlthinker.sharding import MESH_AXES, Sharder

ROOT = os.path.join(os.path.dirname(__file__), "..")
_QWEN25_VISION = dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420,
                      patch_size=14, temporal_patch_size=2, spatial_merge_size=2,
                      window_size=112, fullatt_block_indexes=[7, 15, 23, 31], in_chans=3)
ARCHS = {
    ("qwen2_5_vl", "3b"): dict(model_type="qwen2_5_vl", image_token_id=151655,
                               tie_word_embeddings=True, text_config=dict(
                                   vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                                   num_hidden_layers=36, num_attention_heads=16,
                                   num_key_value_heads=2, rope_theta=1e6),
                               vision_config=dict(_QWEN25_VISION, out_hidden_size=2048)),
    ("qwen2_5_vl", "7b"): dict(model_type="qwen2_5_vl", image_token_id=151655,
                               tie_word_embeddings=False, text_config=dict(
                                   vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                   num_hidden_layers=28, num_attention_heads=28,
                                   num_key_value_heads=4, rope_theta=1e6),
                               vision_config=dict(_QWEN25_VISION, out_hidden_size=3584)),
    ("qwen3_vl", "8b"): dict(model_type="qwen3_vl", image_token_id=151655,
                             tie_word_embeddings=False, text_config=dict(
                                 vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                                 num_hidden_layers=36, num_attention_heads=32,
                                 num_key_value_heads=8, head_dim=128, rope_theta=5e6),
                             vision_config=dict(depth=27, hidden_size=1152, num_heads=16,
                                                intermediate_size=4304, out_hidden_size=4096,
                                                patch_size=16, num_position_embeddings=2304,
                                                deepstack_visual_indexes=[8, 16, 24])),
}


def _preset(family: str, name: str):
  path = os.path.join(ROOT, "configs", f"{family}.py")
  spec = importlib.util.spec_from_file_location(family, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(name)


def per_chip(family: str, name: str, chips: int) -> dict:
  c = _preset(family, name)
  image = improc.ImageProcessorConfig(patch_size=16 if family == "qwen3_vl" else 14)
  size = c.model.vision.image_size
  cfg = hf_qwen_vl.config_from_hf(ARCHS[family, name], image, image_sizes=((size, size),),
                                  dtype=c.model.dtype, param_dtype=c.model.param_dtype,
                                  remat=c.model.remat, scan_layers=c.model.scan_layers)
  sizes = [chips if c.mesh[a] == -1 else c.mesh[a] for a in MESH_AXES]
  mesh = jax.sharding.AbstractMesh(tuple(sizes), MESH_AXES)
  sharder = Sharder(mesh, tuple((k, v) for k, v in c.sharding_rules))
  state = nnx.state(nnx.eval_shape(lambda: QwenVL(cfg, sharder, rngs=nnx.Rngs(0))))
  count, local = 0, 0.0
  for _, v in nnx.to_flat_state(state):
    shape = v.get_value().shape
    spec = sharder.spec(v.get_metadata().get("logical_axes") or (None,) * len(shape), shape)
    split = math.prod(math.prod(mesh.shape[a] for a in ((s,) if isinstance(s, str) else s))
                      for s in spec if s is not None)
    count += math.prod(shape)
    local += math.prod(shape) / split
  param_bytes = np.dtype(c.model.param_dtype).itemsize
  gb = lambda x: x / 1e9
  t, r = cfg.text, c.rl
  rows = r.prompts_per_step * r.group_size / chips  # rollout rows per chip (batch sharded)
  prompt, response = max(c.data.prompt_buckets), r.sampler.max_new_tokens
  kv_per_token = 2 * t.num_layers * t.num_kv_heads * t.head_dim * 2  # k and v, bfloat16
  kv = kv_per_token * (r.prompts_per_step / chips * prompt + rows * (response - 1))
  micro = r.micro_batch_size / chips
  seq = prompt + response
  act = micro * (seq * (t.width * 2 * t.num_layers  # bf16 residual saved per layer (remat)
                       + t.mlp_dim * 2 * 3)        # one layer's gate/up/act recomputed
                 + response * t.vocab_size * 4 * 2)  # float32 response logits and gradient
  out = {"preset": f"{family}:{name}", "chips": chips, "parameters": count,
         "params_gb": gb(local * param_bytes), "adam_gb": gb(2 * local * 4),
         "grads_gb": gb(local * param_bytes), "kv_cache_gb": gb(kv),
         "update_activations_gb": gb(act)}
  out["total_gb"] = sum(v for k, v in out.items() if k.endswith("_gb"))
  out.update(rollout_rows_per_chip=rows, micro_batch_rows_per_chip=micro,
             prompt_tokens=prompt, response_tokens=response)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--chips", type=int, default=64)
  parser.add_argument("--chip_gb", type=float, default=95.0, help="HBM per chip (v5p: 95)")
  args = parser.parse_args()
  rows = [per_chip(f, n, args.chips) for f, n in ARCHS]
  for row in rows:
    print(json.dumps(row))
  print(f"\n| preset | parameters | params | AdamW | grads | KV cache | update act. | total "
        f"(of {args.chip_gb:g} GB) |\n|---|---|---|---|---|---|---|---|")
  for row in rows:
    print(f"| `{row['preset']}` | {row['parameters'] / 1e9:.2f} B | {row['params_gb']:.2f} | "
          f"{row['adam_gb']:.2f} | {row['grads_gb']:.2f} | {row['kv_cache_gb']:.1f} | "
          f"{row['update_activations_gb']:.1f} | {row['total_gb']:.1f} |")


if __name__ == "__main__":
  main()
