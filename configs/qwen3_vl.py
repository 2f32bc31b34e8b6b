"""RL on a pretrained Qwen3-VL-8B-Instruct, the paper's run (REFERENCE §4): 1024 rows per optimizer
step, AdamW 2e-6, G²RPO by task type, 2048-token responses, on the public-format JSON data.

  launch/tpu_pod.sh run --name=my-v5p-64 --zone=us-east5-a --bucket=my-bucket \\
      --config=configs/qwen3_vl.py:8b --workdir=/gcs/my-bucket/run \\
      --config.model.init=hf:/gcs/my-bucket/ckpt/Qwen3-VL-8B-Instruct \\
      --config.data.path=/gcs/my-bucket/data/train.jsonl \\
      --config.data.image_root=/gcs/my-bucket/data

Everything but the trainer comes from the checkpoint named by `model.init=hf:DIR`. Images are
resized to 448×448 (14×14 = 196 image tokens each with Qwen3-VL's 16-pixel patches). bfloat16
compute, float32 parameters and AdamW state, remat, FSDP over all chips.

Sized for a v5p-64 (32 chips, 95 GB each; `python -m openvlthinker.plan
--config=configs/qwen3_vl.py:8b --chip=v5p-64`, README "Memory plan"): rollouts of 256 prompts ×
8 in 2 optimizer minibatches, so each optimizer step sees the paper's 1024 rows (512 × 8 in 4);
the paper's 512 × 8 rollout of 2048-token responses needs a 72 GB KV cache per chip beside a
38 GB prefill. The update is split over tensor=4 (heads, MLP, vocabulary) with micro-batches of
one prompt group per fsdp shard (FSDP alone with the recipe's 256-row micro-batches needs ~97 GB
per chip).

`tiny`: CPU-sized, for `python tools/tiny_qwen_vl.py --family=qwen3_vl --out=DIR`, 64×64 images.
"""
from openvlthinker.configuration import (base_config, cpu_tiny_recipe, pod_rl_recipe,
                                        pretrained_family)

PRESETS = ("8b", "tiny")


def get_config(arg="8b"):
  if arg not in PRESETS:
    raise ValueError(f"configs/qwen3_vl.py: preset {arg!r}, expected one of {PRESETS}")
  if arg == "tiny":
    c = cpu_tiny_recipe(pretrained_family(base_config(), "qwen3_vl", image_size=64))
    c.data.update(source="json", seq_len=256, batch_size=8, prompt_buckets=(128, 192))
    c.sft.steps = 2
    c.rl.learning_rate = 1e-3
    return c
  c = pod_rl_recipe(pretrained_family(base_config(), "qwen3_vl", image_size=448))
  c.model.update(dtype="bfloat16", param_dtype="float32", remat=True, scan_layers=True)
  c.mesh.tensor = 4
  c.rl.update(prompts_per_step=256, updates_per_rollout=2,
              micro_batch_size=8 * c.rl.group_size)  # 8 fsdp shards of 32 chips, a group each
  return c
