"""The paper's RL recipe (REFERENCE §4) at pod scale, on data in the public OpenVLThinkerV2 format.

  launch/tpu_pod.sh run --name=my-v5p-64 --zone=us-east5-a --bucket=my-bucket \\
      --config=configs/tpu_pod.py:v5p-64 --workdir=/gcs/my-bucket/run \\
      --config.data.path=/gcs/my-bucket/data/train.jsonl \\
      --config.data.image_root=/gcs/my-bucket/data

A from-scratch 1.9B-parameter VLM (1.5B decoder, 0.3B ViT) in bfloat16 compute with float32
parameters and AdamW state, remat (the paper starts from a pretrained Qwen3-VL-8B:
configs/qwen3_vl.py:8b). No KL, dynamic filtering on, G²RPO keyed by task type, 2048-token
responses. Set `rl.length.enabled` / `rl.entropy.enabled` for the shaping ablations.

No arg: rollouts of 512 prompts × 8, 4 optimizer minibatches per rollout, FSDP over however many
chips there are. A slice preset (`v5p-32`, `v5p-64`, `v6e-32`) fixes the mesh to that slice's
chips (a v5p-N has N/2 chips) and sizes the rollout and micro-batches so that the memory plan
fits its HBM (`python -m openvlthinker.plan --config=configs/tpu_pod.py:v6e-32`; README "Memory
plan"). The rollout's KV cache grows with rl.prompts_per_step × group_size rows per chip, the
update's activations with rl.micro_batch_size rows per chip (their dense attention logits and
float32 logits are most of it); a micro-batch holds whole groups, and its prompts
(micro_batch_size / group_size) should split evenly over the batch axes, or the prompt forward is
replicated.
"""
from openvlthinker.configuration import base_config, pod_rl_recipe

# slice: (mesh (data, fsdp, tensor), prompts per step, updates per rollout, micro-batch rows)
PRESETS = {
    # The paper's 512 × 8 rollout: 128 rows and 8 update rows per chip.
    "v5p-64": ((1, 32, 1), 512, 4, 256),
    # Half the chips: half the rollout and micro-batch per step, the same rows per chip.
    "v5p-32": ((1, 16, 1), 256, 4, 128),
    # A third of v5p's HBM: a quarter of the rollout, and the update split over tensor=2 (heads,
    # MLP and vocabulary) so a micro-batch of 16 prompts still gives each fsdp shard one prompt.
    "v6e-32": ((1, 16, 2), 128, 2, 128),
}


def get_config(arg=None):
  if arg is not None and arg not in PRESETS:
    raise ValueError(f"configs/tpu_pod.py: preset {arg!r}, expected one of {tuple(PRESETS)} "
                     "(or none: every chip of the slice it runs on)")
  c = pod_rl_recipe(base_config())
  c.model.update(vocab_size=32_768, width=2048, num_layers=24, num_heads=16, num_kv_heads=8,
                 head_dim=128, mlp_dim=8192, dtype="bfloat16", param_dtype="float32", remat=True,
                 prefix_full_attention=True)
  c.model.vision.update(image_size=448, patch_size=14, width=1024, num_layers=24, num_heads=16,
                        mlp_dim=4096)
  if arg is not None:
    (data, fsdp, tensor), prompts, updates, micro = PRESETS[arg]
    c.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
    c.rl.update(prompts_per_step=prompts, updates_per_rollout=updates, micro_batch_size=micro)
  return c
