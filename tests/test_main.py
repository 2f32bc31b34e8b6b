"""The entry point validates the config before compiling and reports bad fields in one line."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*overrides):
  env = dict(os.environ, JAX_PLATFORMS="cpu")  # the suite's 8 devices (conftest)
  return subprocess.run([sys.executable, "-m", "openvlthinker.main", "--config=configs/test.py",
                         "--workdir=/tmp/ovt-test-main", *overrides], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("override, field", [
    ("--config.model.num_layerz=3", "num_layerz"),
    ("--config.model.num_kv_heads=3", "model.num_kv_heads"),
    ("--config.rl.loss.clip_low=1.5", "rl.loss.clip_low"),
    ("--config.rl.sampler.top_p=0", "rl.sampler.top_p"),
    ("--config.rl.entropy.h_min.ocr=0.9", "rl.entropy.h_min.ocr"),
    ("--config.rl.length.thresholds.ocr=(9,3,4,5)", "rl.length.thresholds.ocr"),
    ("--config.model.vision.patch_size=5", "model.vision.patch_size"),
    ("--config.model.dtype=float16", "model.dtype"),
])
def test_bad_config_stops_with_one_line_naming_the_field(override, field):
  proc = run_main(override)
  assert proc.returncode != 0
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and field in errors[0], proc.stderr
  assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", ["default", "test", "tpu_pod", "ablation"])
def test_shipped_configs_validate(name):
  import importlib.util
  from openvlthinker import configuration
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  if name == "tpu_pod":
    config.data.path = "train.jsonl"  # Set on the command line in a real launch.
  configuration.validate(config)
