"""RL on a pretrained Qwen2.5-VL (3B or 7B), the most used open VLM-RL starting point, with the
paper's recipe (REFERENCE §4) on JSON data in the public OpenVLThinkerV2 format.

  launch/tpu_pod.sh my-v5p-64 us-east5-a configs/qwen2_5_vl.py:7b gs://bucket/run \\
      --config.model.init=hf:/mnt/ckpt/Qwen2.5-VL-7B-Instruct \\
      --config.data.path=gs://bucket/data/train.jsonl --config.data.image_root=gs://bucket/data

`model.init=hf:DIR` names the checkpoint directory (config.json, safetensors, tokenizer, image
processor): the architecture, weights, tokenizer, chat template and image normalisation all come
from it. Images are resized to 448×448 (16×16 = 256 image tokens each, up to 4 per prompt).
bfloat16 compute, float32 parameters and AdamW state, remat, FSDP over all chips.

`tiny`: the same code on CPU, for a tiny checkpoint written by `tools/tiny_qwen_vl.py`
(`python tools/tiny_qwen_vl.py --family=qwen2_5_vl --out=DIR`), 56×56 images, a few steps.
"""
from openvlthinker.configuration import (base_config, cpu_tiny_recipe, pod_rl_recipe,
                                        pretrained_family)

PRESETS = ("3b", "7b", "tiny")


def get_config(arg="7b"):
  if arg not in PRESETS:
    raise ValueError(f"configs/qwen2_5_vl.py: preset {arg!r}, expected one of {PRESETS}")
  if arg == "tiny":
    c = cpu_tiny_recipe(pretrained_family(base_config(), "qwen2_5_vl", image_size=56))
    c.data.update(source="json", seq_len=256, batch_size=8, prompt_buckets=(128, 192))
    c.sft.steps = 2
    c.rl.learning_rate = 1e-3
    return c
  c = pod_rl_recipe(pretrained_family(base_config(), "qwen2_5_vl", image_size=448))
  c.model.update(dtype="bfloat16", param_dtype="float32", remat=True, scan_layers=True)
  return c

