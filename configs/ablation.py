"""Ablation sweep: advantage estimators × length/entropy shaping × seeds.

  python -m openvlthinker.sweep --config=configs/ablation.py:base=default,seeds=0+1+2 --workdir=DIR

`arg` is `key=value` pairs joined by commas; lists join with `+`:
  base       default | test            the config every run starts from: a file in configs/,
             | tpu_pod:v5p-64 ...      with its own arg after `:`
  estimators g2rpo+grpo+drgrpo         names in rl.advantages' registry
  shaping    off | on | off+on         length and entropy shaping together
  seeds      0+1+2
"""
import importlib.util
import os

_DEFAULTS = {"base": "default", "estimators": "g2rpo+grpo+drgrpo", "shaping": "off",
             "seeds": "0+1+2"}


def parse_arg(arg):
  out = dict(_DEFAULTS)
  for part in filter(None, (arg or "").split(",")):
    key, sep, value = part.partition("=")
    if not sep or key not in _DEFAULTS:
      raise ValueError(f"configs/ablation.py arg: expected key=value with key in "
                       f"{sorted(_DEFAULTS)}, got {part!r}")
    out[key] = value
  return out


def get_config(arg=None):
  base, _, base_arg = parse_arg(arg)["base"].partition(":")
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{base}.py")
  if not os.path.isfile(path):
    raise ValueError(f"configs/ablation.py arg: base={base!r}: expected a config in configs/ "
                     "such as default, test or tpu_pod:v5p-64")
  spec = importlib.util.spec_from_file_location(f"ablation_base_{base}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(base_arg) if base_arg else module.get_config()
  config.eval.every = config.rl.steps  # the table compares end points: evaluate before and after
  # Each task's gradient share about a dozen times a run: task_balance.png compares estimators.
  config.rl.task_balance_every = config.rl.task_balance_every or max(1, config.rl.steps // 12)
  return config


def get_sweep(arg=None):
  """[(run name, {config field: value})] in execution order (seed-major, so SFT is shared)."""
  a = parse_arg(arg)
  runs = []
  for seed in a["seeds"].split("+"):
    for estimator in a["estimators"].split("+"):
      for shaping in a["shaping"].split("+"):
        on = shaping == "on"
        name = f"{estimator}_shaping-{shaping}_seed{seed}"
        runs.append((name, {"seed": int(seed), "rl.advantage": estimator,
                            "rl.length.enabled": on, "rl.entropy.enabled": on}))
  return runs
