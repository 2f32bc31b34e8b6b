"""The entry point validates the config before compiling and reports bad fields in one line."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*overrides, workdir="/tmp/ovt-test-main"):
  env = dict(os.environ, JAX_PLATFORMS="cpu")  # the suite's 8 devices (conftest)
  return subprocess.run([sys.executable, "-m", "openvlthinker.main", "--config=configs/test.py",
                         f"--workdir={workdir}", *overrides], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def one_error_line(proc) -> str:
  """The run failed with exactly one `error:` line and no traceback; returns that line."""
  assert proc.returncode != 0, proc.stdout[-2000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  return errors[0]


@pytest.mark.parametrize("override, field", [
    ("--config.model.num_layerz=3", "num_layerz"),
    ("--config.model.num_kv_heads=3", "model.num_kv_heads"),
    ("--config.rl.loss.clip_low=1.5", "rl.loss.clip_low"),
    ("--config.rl.sampler.top_p=0", "rl.sampler.top_p"),
    ("--config.rl.entropy.h_min.ocr=0.9", "rl.entropy.h_min.ocr"),
    ("--config.rl.length.thresholds.ocr=(9,3,4,5)", "rl.length.thresholds.ocr"),
    ("--config.model.vision.patch_size=5", "model.vision.patch_size"),
    ("--config.model.dtype=float16", "model.dtype"),
    # Optimizers: a negative learning rate would train uphill.
    ("--config.sft.learning_rate=-1", "sft.learning_rate"),
    ("--config.rl.learning_rate=0", "rl.learning_rate"),
    ("--config.rl.b2=1.5", "rl.b2"),
    ("--config.sft.grad_clip=-1", "sft.grad_clip"),
    ("--config.sft.weight_decay=-0.1", "sft.weight_decay"),
    ("--config.rl.sampler.top_k=-5", "rl.sampler.top_k"),
    ("--config.rl.loss.kl_coef=-1", "rl.loss.kl_coef"),
    ("--config.rl.length.weight=-1", "rl.length.weight"),
    ("--config.rl.filter.max_empty_steps=0", "rl.filter.max_empty_steps"),
    ("--config.eval.checkpoint=latest", "eval.checkpoint"),
    ("--config.eval.checkpoint=rl:", "eval.checkpoint"),
    # Paths the run reads, checked before a model is built.
    ("--config.tokenizer.path=/nonexistent/sp.model", "tokenizer.path"),
    ("--config.data.image_root=/nonexistent", "data.image_root"),
])
def test_bad_config_stops_with_one_line_naming_the_field(override, field):
  assert field in one_error_line(run_main(override))


def _no_training_ran(workdir):
  return not os.path.exists(os.path.join(workdir, "metrics.jsonl")) and not any(
      os.path.isdir(os.path.join(workdir, s, "checkpoints")) for s in ("sft", "rl"))


@pytest.mark.parametrize("overrides, field", [
    # Found by the data preflight before SFT compiles (the RL stage of `all` would find it after).
    (("--config.data.prompt_buckets=(8,)",), "data.prompt_buckets"),
    (("--config.data.seq_len=16",), "data.seq_len"),
    # The mesh against the 8 devices: make_mesh's message, without a traceback.
    (("--config.mesh.fsdp=3",), "mesh"),
])
def test_errors_found_at_start_up_are_one_line_and_nothing_trains(tmp_path, overrides, field):
  workdir = str(tmp_path / "w")
  line = one_error_line(run_main(*overrides, workdir=workdir))
  assert line.startswith(f"error: {field}"), line
  assert _no_training_ran(workdir)


@pytest.mark.parametrize("content, expected", [
    (b"", "no records"),
    (b'{"problem": "caf\xe9"}\n', "utf-8"),
])
def test_bad_data_file_is_one_line_naming_the_file(tmp_path, content, expected):
  path = tmp_path / "train.jsonl"
  path.write_bytes(content)
  line = one_error_line(run_main("--config.data.source=json", f"--config.data.path={path}",
                                 workdir=str(tmp_path / "w")))
  assert "train.jsonl" in line and expected in line.lower(), line


def test_verbose_adds_the_traceback(tmp_path):
  proc = run_main("--config.data.prompt_buckets=(8,)", "--verbose", workdir=str(tmp_path / "w"))
  assert proc.returncode != 0 and "Traceback" in proc.stderr
  assert [l for l in proc.stderr.splitlines() if l.startswith("error: data.prompt_buckets")]


@pytest.mark.parametrize("name", ["default", "test", "tpu_pod", "ablation"])
def test_shipped_configs_validate(name, tmp_path):
  import importlib.util
  from openvlthinker import configuration
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  if name == "tpu_pod":
    config.data.path = str(tmp_path / "train.jsonl")  # Set on the command line in a launch.
    (tmp_path / "train.jsonl").write_text("")
  configuration.validate(config)
