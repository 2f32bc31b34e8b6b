"""Writes a tiny, randomly initialised Qwen2.5-VL or Qwen3-VL checkpoint directory with
transformers' own `save_pretrained` (model, image processor, a small byte-level BPE tokenizer with
Qwen's special tokens and the Qwen-VL chat template), for tests, the benchmark and the tiny
presets. Needs the `hf` extra (torch, transformers).

  python tools/tiny_qwen_vl.py --family=qwen2_5_vl --out=/tmp/tiny_qwen2_5_vl
"""
from __future__ import annotations

import argparse
import os

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<think>", "</think>")

# The public Qwen2-VL / Qwen2.5-VL chat template (also Qwen3-VL's for these messages).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

_CORPUS = ("Think inside <thinking> </thinking>, then give the final answer inside <answer> "
           "</answer>. What is 12 + 30? How many red circles are in the image? The answer is 42. "
           "A B C D E. Read the text in the image. Which option is correct? 0 1 2 3 4 5 6 7 8 9 "
           "the box {\"boxes\": [10, 20, 30, 40]} chart bar line value largest smallest\n")


def tokenizer(vocab_size: int = 384):
  """A transformers fast tokenizer: byte-level BPE trained on a small corpus, Qwen's specials."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator([_CORPUS] * 4, trainer)
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>")
  fast.chat_template = CHAT_TEMPLATE
  return fast


def hf_config(family: str, tok, *, layers: int = 2, width: int = 64):
  """A tiny transformers config of `family` whose special ids are the tokenizer's."""
  from transformers import Qwen2_5_VLConfig, Qwen3VLConfig
  ids = {name: tok.convert_tokens_to_ids(t) for name, t in (
      ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
      ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
  vocab = len(tok)
  eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
  text = dict(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width,
              num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=4096, rms_norm_eps=1e-6, eos_token_id=eos,
              pad_token_id=pad, bos_token_id=None, initializer_range=0.1)
  if family == "qwen2_5_vl":
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0,
                               "mrope_section": [2, 3, 3]}
    vision = dict(depth=2, hidden_size=32, num_heads=4, intermediate_size=64,
                  out_hidden_size=width, patch_size=14, temporal_patch_size=2,
                  spatial_merge_size=2, window_size=56, fullatt_block_indexes=[1],
                  initializer_range=0.1)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids,
                            tie_word_embeddings=False)
  if family == "qwen3_vl":
    text.update(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                              "mrope_section": [2, 3, 3],
                                              "mrope_interleaved": True})
    vision = dict(depth=3, hidden_size=32, num_heads=4, intermediate_size=64,
                  out_hidden_size=width, patch_size=16, temporal_patch_size=2,
                  spatial_merge_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=[0, 1], initializer_range=0.1)
    return Qwen3VLConfig(text_config=text, vision_config=vision, **ids,
                         tie_word_embeddings=True)
  raise ValueError(f"family: expected qwen2_5_vl or qwen3_vl, got {family!r}")


def image_processor(family: str):
  from transformers import Qwen2VLImageProcessorPil
  if family == "qwen2_5_vl":
    return Qwen2VLImageProcessorPil(patch_size=14, temporal_patch_size=2, merge_size=2,
                                    size={"shortest_edge": 28 * 28, "longest_edge": 28 * 28 * 64})
  return Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2,
                                  image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                  size={"shortest_edge": 32 * 32, "longest_edge": 32 * 32 * 64})


def model(family: str, config, seed: int = 0):
  import torch
  from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration
  torch.manual_seed(seed)
  cls = Qwen2_5_VLForConditionalGeneration if family == "qwen2_5_vl" else \
      Qwen3VLForConditionalGeneration
  config._attn_implementation = "eager"
  return cls(config).eval()


def write(family: str, out: str, *, seed: int = 0, max_shard_size: str = "200KB"):
  """Writes the checkpoint directory `out` (sharded safetensors with an index); returns the
  torch model, tokenizer and image processor it wrote."""
  tok = tokenizer()
  config = hf_config(family, tok)
  net = model(family, config, seed)
  os.makedirs(out, exist_ok=True)
  net.save_pretrained(out, max_shard_size=max_shard_size)
  tok.save_pretrained(out)
  processor = image_processor(family)
  processor.save_pretrained(out)
  return net, tok, processor


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--family", choices=("qwen2_5_vl", "qwen3_vl"), required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  write(args.family, args.out, seed=args.seed)
  print(f"wrote a tiny {args.family} checkpoint to {args.out}")


if __name__ == "__main__":
  main()
