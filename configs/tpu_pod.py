"""The paper's RL recipe (REFERENCE §4) at pod scale, on data in the public OpenVLThinkerV2 format.

  launch/tpu_pod.sh my-v5p-64 us-east5-a configs/tpu_pod.py gs://bucket/run \\
      --config.data.path=gs://bucket/data/train.jsonl --config.data.image_root=gs://bucket/data

A from-scratch ~1B-parameter VLM in bfloat16, FSDP over all chips. Rollout 512 prompts × 8
responses, 4 optimizer minibatches per rollout, AdamW 2e-6, no KL, dynamic filtering on, G²RPO
keyed by task type. Set `rl.length.enabled` / `rl.entropy.enabled` for the shaping ablations.
"""
from openvlthinker.configuration import base_config


def get_config(arg=None):
  del arg
  c = base_config()
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  c.model.update(vocab_size=32_768, width=2048, num_layers=24, num_heads=16, num_kv_heads=8,
                 head_dim=128, mlp_dim=8192, dtype="bfloat16", param_dtype="float32", remat=True,
                 prefix_full_attention=True)
  c.model.vision.update(image_size=448, patch_size=14, width=1024, num_layers=24, num_heads=16,
                        mlp_dim=4096)
  c.data.update(source="json", seq_len=4096, batch_size=256, prompt_buckets=(512, 1024, 2048),
                max_images=4, worker_count=8)
  c.sft.steps = 0
  c.rl.update(steps=1000, prompts_per_step=512, group_size=8, updates_per_rollout=4,
              micro_batch_size=256, learning_rate=2e-6, weight_decay=0.01)
  c.rl.sampler.update(max_new_tokens=2048, temperature=1.0, top_p=1.0)
  c.eval.update(every=50, num_per_task=256, batch_size=512, max_new_tokens=2048)
  c.checkpoint.update(every=25, keep=3)
  c.progress_bar = False
  return c
