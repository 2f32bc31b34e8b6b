"""Tiny shapes for the test suite: compiles in seconds on CPU, shards over 8 fake devices."""
from openvlthinker.configuration import base_config, cpu_tiny_recipe


def get_config(arg=None):
  del arg
  c = cpu_tiny_recipe(base_config())
  c.model.update(vocab_size=1024, width=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16, mlp_dim=128)
  c.model.vision.update(image_size=64, patch_size=16, width=32, num_layers=1, num_heads=2,
                        mlp_dim=64)
  c.data.update(seq_len=128, batch_size=8, prompt_buckets=(64, 96))
  c.sft.steps = 4
  return c
