"""The data the memory plan (`openvlthinker.plan`) sizes against: the chips' HBM, and the published
architectures (config.json, preprocessor_config.json) of the Hugging Face presets' checkpoints,
which stand in for a checkpoint directory so those presets are planned without their weights.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import tempfile

GB = 1e9  # tables and chips in 10^9 bytes, as the TPU docs quote HBM
# HBM per chip (one JAX device each). An accelerator type's number counts TensorCores on v4 and
# v5p (two per chip: a v5p-64 has 32 chips) and chips on v5e and v6e.
CHIPS = {"v4": 32.0, "v5e": 16.0, "v5p": 95.0, "v6e": 32.0}
CORES_PER_CHIP = {"v4": 2, "v5e": 1, "v5p": 2, "v6e": 1}


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str                   # v4 | v5e | v5p | v6e
  hbm_gb: float
  devices: int | None = None  # the chips of a named slice (v5p-64: 32), else None

  def __str__(self):
    return f"{self.name} ({self.hbm_gb:g} GB)"


def parse_chip(text: str) -> Chip:
  """'v5p', or an accelerator type such as 'v5p-64' (TensorCores / cores per chip = chips)."""
  m = re.fullmatch(r"(v4|v5e|v5p|v6e)(?:-(\d+))?", text.strip().replace("v5litepod", "v5e"))
  if not m:
    raise ValueError(f"--chip: expected one of {tuple(CHIPS)}, optionally with a slice size "
                     f"(v5p-64), got {text!r}")
  name, devices = m.group(1), None
  if m.group(2) is not None:
    devices, rest = divmod(int(m.group(2)), CORES_PER_CHIP[name])
    if rest or not devices:
      raise ValueError(f"--chip: {text} is not a whole number of {name} chips")
  return Chip(name, CHIPS[name], devices)


# configs/qwen2_5_vl.py:3b|7b and configs/qwen3_vl.py:8b: Qwen2.5-VL-3B/7B-Instruct and
# Qwen3-VL-8B-Instruct, keyed by (model.name, preset).
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
PREPROCESSORS = {"qwen2_5_vl": dict(patch_size=14, merge_size=2, temporal_patch_size=2),
                 "qwen3_vl": dict(patch_size=16, merge_size=2, temporal_patch_size=2)}


@contextlib.contextmanager
def planned_config(config, preset: str | None):
  """`config`; for a Hugging Face family without its checkpoint, a copy whose `model.hf_dir` is a
  temporary directory of the preset's published config.json and preprocessor_config.json (no
  weights, no tokenizer): it validates and builds its architecture as with the checkpoint."""
  from openvlthinker.models.hf import pretrained  # pylint: disable=g-import-not-at-top
  m = config.model
  directory = m.hf_dir or (m.init[len(pretrained.HF_PREFIX):]
                           if m.init.startswith(pretrained.HF_PREFIX) else "")
  if m.name not in pretrained.FAMILIES or os.path.isfile(os.path.join(directory, "config.json")):
    yield config
    return
  if (m.name, preset) not in ARCHS:
    raise ValueError(f"model.init: no checkpoint for {m.name} and no published architecture for "
                     f"preset {preset!r} (known: {sorted(p for f, p in ARCHS if f == m.name)})")
  with tempfile.TemporaryDirectory() as tmp:
    for name, data in (("config.json", ARCHS[m.name, preset]),
                       ("preprocessor_config.json", PREPROCESSORS[m.name])):
      with open(os.path.join(tmp, name), "w") as f:
        json.dump(data, f)
    config = config.copy_and_resolve_references()
    config.model.update(hf_dir=tmp, init="")
    yield config
