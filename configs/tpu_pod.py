"""The paper's RL recipe (REFERENCE §4) at pod scale, on data in the public OpenVLThinkerV2 format.

  launch/tpu_pod.sh my-v5p-64 us-east5-a configs/tpu_pod.py gs://bucket/run \\
      --config.data.path=gs://bucket/data/train.jsonl --config.data.image_root=gs://bucket/data

A from-scratch ~1B-parameter VLM in bfloat16, FSDP over all chips (the paper starts from a
pretrained Qwen3-VL-8B: configs/qwen3_vl.py:8b). Rollout 512 prompts × 8 responses, 4 optimizer
minibatches per rollout, AdamW 2e-6, no KL, dynamic filtering on, G²RPO keyed by task type. Set
`rl.length.enabled` / `rl.entropy.enabled` for the shaping ablations.
"""
from openvlthinker.configuration import base_config, pod_rl_recipe


def get_config(arg=None):
  del arg
  c = pod_rl_recipe(base_config())
  c.model.update(vocab_size=32_768, width=2048, num_layers=24, num_heads=16, num_kv_heads=8,
                 head_dim=128, mlp_dim=8192, dtype="bfloat16", param_dtype="float32", remat=True,
                 prefix_full_attention=True)
  c.model.vision.update(image_size=448, patch_size=14, width=1024, num_layers=24, num_heads=16,
                        mlp_dim=4096)
  return c
