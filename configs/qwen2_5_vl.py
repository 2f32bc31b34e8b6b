"""RL on a pretrained Qwen2.5-VL (3B or 7B), the most used open VLM-RL starting point, with the
paper's recipe (REFERENCE §4) on JSON data in the public OpenVLThinkerV2 format.

  launch/tpu_pod.sh run --name=my-v5p-64 --zone=us-east5-a --bucket=my-bucket \\
      --config=configs/qwen2_5_vl.py:7b --workdir=/gcs/my-bucket/run \\
      --config.model.init=hf:/gcs/my-bucket/ckpt/Qwen2.5-VL-7B-Instruct \\
      --config.data.path=/gcs/my-bucket/data/train.jsonl \\
      --config.data.image_root=/gcs/my-bucket/data

`model.init=hf:DIR` names the checkpoint directory (config.json, safetensors, tokenizer, image
processor): the architecture, weights, tokenizer, chat template and image normalisation all come
from it. Images are resized to 448×448 (16×16 = 256 image tokens each, up to 4 per prompt).
bfloat16 compute, float32 parameters and AdamW state, remat, FSDP over all chips.

Sized for a v5p-64 (32 chips, 95 GB each; `python -m openvlthinker.plan
--config=configs/qwen2_5_vl.py:7b --chip=v5p-64`): the paper's 512 × 8 rollout, and the update
split over `tensor` (heads, MLP, vocabulary: 2 for the 3B, whose 2 kv heads allow no more, 4 for
the 7B) with micro-batches of one prompt group per fsdp shard. With FSDP alone, micro-batches of
256 rows (the recipe's) need ~82 (3B) and ~104 GB (7B) per chip: the float32 logits over a
152k vocabulary and the dense attention logits of 8 rows of 4096 tokens per chip.

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
  tensor = {"3b": 2, "7b": 4}[arg]
  c.mesh.tensor = tensor
  # 32 chips / tensor fsdp shards, one group of 8 rows each.
  c.rl.micro_batch_size = 32 // tensor * c.rl.group_size
  return c

