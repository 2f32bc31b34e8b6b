"""The per-chip memory of every pod preset as one markdown table, from `openvlthinker.plan` (its
estimates: shapes and the rule table, nothing allocated): a slice preset on its own slice, the
Hugging Face presets on `--chip` (their architectures are the published config.json values).

  python tools/memory_table.py [--chip=v5p-64] [--json]
"""
from __future__ import annotations

import argparse
import json
import os

from openvlthinker import plan

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PRESETS = ("tpu_pod.py:v5p-32", "tpu_pod.py:v5p-64", "tpu_pod.py:v6e-32", "qwen2_5_vl.py:3b",
           "qwen2_5_vl.py:7b", "qwen3_vl.py:8b")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--chip", default="v5p-64", help="the HF presets' chip (a slice)")
  parser.add_argument("--json", action="store_true", help="also one JSON line per preset")
  args = parser.parse_args()
  print("| preset | chip | parameters | params | AdamW | grads | KV cache | rollout other | "
        "update act. | total | fits |\n|---|---|---|---|---|---|---|---|---|---|---|")
  for name in PRESETS:
    config, arg = plan.load_config(os.path.join(ROOT, "configs", name))
    slice_name = arg if name.startswith("tpu_pod") else args.chip  # a slice preset is its slice
    chip = plan.parse_chip(slice_name)
    p = plan.make_plan(config, arg, chip.devices, name=name)
    gb = {k: v / plan.GB for k, v in p.bytes.items()}
    print(f"| `{name.replace('.py', '')}` | {slice_name} ({p.devices} × {chip.hbm_gb:g} GB) "
          f"| {p.parameters / 1e9:.2f} B | {gb['params']:.2f} | {gb['adam']:.2f} | "
          f"{gb['grads']:.2f} | {gb['kv_cache']:.1f} | {gb['rollout_other']:.1f} | "
          f"{gb['update_act']:.1f} | {p.total / plan.GB:.1f} | "
          f"{'yes' if p.fits(chip) else 'NO'} ({p.total / (chip.hbm_gb * plan.GB):.0%}) |")
    if args.json:
      print(json.dumps({"preset": name, "chip": chip.name, **p.shapes, **gb,
                        "total_gb": p.total / plan.GB}))


if __name__ == "__main__":
  main()
