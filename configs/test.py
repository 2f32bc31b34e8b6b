"""Tiny shapes for the test suite: compiles in seconds on CPU, shards over 8 fake devices."""
from openvlthinker.configuration import base_config


def get_config(arg=None):
  del arg
  c = base_config()
  c.model.update(vocab_size=1024, width=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16, mlp_dim=128)
  c.model.vision.update(image_size=64, patch_size=16, width=32, num_layers=1, num_heads=2,
                        mlp_dim=64)
  c.data.update(seq_len=128, batch_size=8, prompt_buckets=(64, 96))
  c.sft.update(steps=4, warmup_steps=0)
  c.rl.update(steps=3, prompts_per_step=4, group_size=4, updates_per_rollout=2,
              micro_batch_size=4)
  # Length-shaping thresholds for a 16-96 token budget (the tasks declare paper-scale ones).
  # Few layers on a CPU: a loop over per-layer weights runs ~25% faster than the layer scan.
  c.model.scan_layers = False
  c.rl.length.thresholds = {t: (8, 24, 72, 96) for t in c.rl.length.thresholds}
  c.rl.sampler.max_new_tokens = 16
  c.rl.filter.enabled = False
  c.eval.update(every=2, num_per_task=2, batch_size=12, max_new_tokens=16)
  c.checkpoint.update(every=1, keep=2)
  c.progress_bar = False
  return c
