"""Qwen2.5-VL / Qwen3-VL checkpoints ↔ `models.qwen_vl`: the config.json reading and the name
mapping of the text tower (the vision towers list their own rules next to their code).

Rules use transformers 5's module names (`model.language_model.…`, `model.visual.…`,
`lm_head.weight`); checkpoints on disk use the published layout (`model.layers.…`, `visual.…`),
which transformers' save_pretrained also writes: names are renamed on read and written back in it.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from openvlthinker.fields import check
from openvlthinker.models import qwen2_5_vision, qwen3_vision
from openvlthinker.models.decoder import DecoderConfig
from openvlthinker.models.hf import image_processor as improc
from openvlthinker.models.hf.mapping import Rule, linear, norm_to_hf, norm_to_ours
from openvlthinker.models.qwen_vl import QwenVLConfig

MODEL_TYPES = {"qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl"}
_DEFAULT_MROPE = {"qwen2_5_vl": (16, 24, 24), "qwen3_vl": (24, 20, 20)}
# Published checkpoints predate transformers 5's module tree.
_LEGACY = ((r"^visual\.", "model.visual."), (r"^model\.(?!visual\.|language_model\.)",
                                              "model.language_model."))


def canonical_name(name: str) -> str:
  """A checkpoint tensor name in transformers 5's module layout."""
  for old, new in _LEGACY:
    name = re.sub(old, new, name)
  return name


def published_name(name: str) -> str:
  """The inverse of `canonical_name`: the layout published checkpoints (and save_pretrained)
  use, which every loader (transformers, vLLM) reads."""
  for prefix, new in (("model.visual.", "visual."), ("model.language_model.", "model.")):
    if name.startswith(prefix):
      return new + name[len(prefix):]
  return name


def config_from_hf(hf: Mapping[str, Any], image: improc.ImageProcessorConfig, *,
                   image_sizes=((448, 448),), dtype="float32", param_dtype="float32",
                   remat=False, scan_layers=True) -> QwenVLConfig:
  """Our model config from a checkpoint's config.json (as a dict) and its image processor."""
  family = hf.get("model_type")
  check(family in MODEL_TYPES, "config.json model_type", f"one of {tuple(MODEL_TYPES)}", family)
  text = dict(hf.get("text_config") or hf)  # transformers < 4.5x wrote the text fields on top
  rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
  theta = rope.get("rope_theta", text.get("rope_theta", 1_000_000.0))
  check(text.get("hidden_act", "silu") == "silu", "config.json hidden_act", "silu",
        text.get("hidden_act"))
  heads = text["num_attention_heads"]
  tie = hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
  decoder = DecoderConfig(
      vocab_size=text["vocab_size"], width=text["hidden_size"],
      num_layers=text["num_hidden_layers"], num_heads=heads,
      num_kv_heads=text.get("num_key_value_heads", heads),
      head_dim=text.get("head_dim") or text["hidden_size"] // heads,
      mlp_dim=text["intermediate_size"], rope_theta=float(theta),
      norm_eps=float(text.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(tie), dtype=dtype,
      param_dtype=param_dtype, remat=remat, scan_layers=scan_layers,
      qkv_bias=family == "qwen2_5_vl" or bool(text.get("attention_bias", False)),
      qk_norm=family == "qwen3_vl", embed_scale=False,
      mrope_section=tuple(rope.get("mrope_section", _DEFAULT_MROPE[family])),
      mrope_interleaved=family == "qwen3_vl")
  tower = qwen2_5_vision.Qwen25VisionConfig if family == "qwen2_5_vl" else \
      qwen3_vision.Qwen3VisionConfig
  vision = tower.from_hf(dict(hf["vision_config"]), dtype=dtype, param_dtype=param_dtype)
  return QwenVLConfig(family=family, text=decoder, vision=vision, image=image,
                      image_token_id=int(hf["image_token_id"]),
                      image_sizes=tuple(tuple(int(v) for v in s) for s in image_sizes))


# ---------------------------------------------------------------- text tower layout hooks

def _heads(x: np.ndarray, cfg: QwenVLConfig) -> np.ndarray:
  """q/k/v weight [heads·H, D] → [D, heads, H] (heads inferred from the rows)."""
  h = cfg.text.head_dim
  return np.ascontiguousarray(x.T.reshape(x.shape[1], x.shape[0] // h, h))


def _heads_to_hf(x: np.ndarray, cfg: QwenVLConfig) -> np.ndarray:
  del cfg
  return np.ascontiguousarray(x.reshape(x.shape[0], -1).T)


def _bias(x: np.ndarray, cfg: QwenVLConfig) -> np.ndarray:
  return x.reshape(-1, cfg.text.head_dim)


def _bias_to_hf(x: np.ndarray, cfg: QwenVLConfig) -> np.ndarray:
  del cfg
  return x.reshape(-1)


def _out(x: np.ndarray, cfg: QwenVLConfig) -> np.ndarray:
  """o_proj weight [D, N·H] → [N, H, D]."""
  c = cfg.text
  return np.ascontiguousarray(x.T.reshape(c.num_heads, c.head_dim, x.shape[0]))


def _out_to_hf(x: np.ndarray, cfg: QwenVLConfig) -> np.ndarray:
  del cfg
  return np.ascontiguousarray(x.reshape(-1, x.shape[-1]).T)


def text_rules(cfg: QwenVLConfig) -> list[Rule]:
  t = r"model\.language_model\."
  layer, ours = t + r"layers\.(\d+)\.", "decoder.blocks.{0}."
  rules = [Rule(t + r"embed_tokens\.weight", "decoder.embedding"),
           Rule(t + r"norm\.weight", "decoder.final_norm.scale", norm_to_ours, norm_to_hf),
           Rule(layer + r"input_layernorm\.weight", ours + "attn_norm.scale", norm_to_ours,
                norm_to_hf),
           Rule(layer + r"post_attention_layernorm\.weight", ours + "mlp_norm.scale",
                norm_to_ours, norm_to_hf),
           Rule(layer + r"self_attn\.o_proj\.weight", ours + "attn.o", _out, _out_to_hf)]
  for name in "qkv":
    rules.append(Rule(layer + rf"self_attn\.{name}_proj\.weight", ours + f"attn.{name}", _heads,
                      _heads_to_hf))
    if cfg.text.qkv_bias:
      rules.append(Rule(layer + rf"self_attn\.{name}_proj\.bias", ours + f"attn.{name}_bias",
                        _bias, _bias_to_hf))
  if cfg.text.qk_norm:
    rules += [Rule(layer + rf"self_attn\.{n}_norm\.weight", ours + f"attn.{n}_norm.scale",
                   norm_to_ours, norm_to_hf) for n in "qk"]
  for name in ("gate", "up", "down"):
    rules += linear(layer + rf"mlp\.{name}_proj", ours + f"mlp.{name}")
  if not cfg.text.tie_embeddings:
    rules += linear(r"lm_head", "decoder.head")
  return rules


def rules(cfg: QwenVLConfig) -> list[Rule]:
  """Every tensor of a Qwen-VL checkpoint (transformers 5 names) ↔ our parameters."""
  vision = qwen2_5_vision if cfg.family == "qwen2_5_vl" else qwen3_vision
  return text_rules(cfg) + vision.hf_rules("model.visual", "vision")


def ignored(cfg: QwenVLConfig) -> tuple[str, ...]:
  """Checkpoint tensors we do not load: a tied head's copy of the embedding."""
  return (r"lm_head\.weight",) if cfg.text.tie_embeddings else ()
