"""The entry point validates the config before compiling and reports bad fields in one line."""
import json
import os
import subprocess
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*overrides, workdir="/tmp/ovt-test-main"):
  env = dict(os.environ, JAX_PLATFORMS="cpu")  # the suite's 8 devices (conftest)
  return subprocess.run([sys.executable, "-m", "openvlthinker.main", "--config=configs/test.py",
                         f"--workdir={workdir}", *overrides], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


# The entry point run on many command lines in one process: absl's app.run with the entry point's
# own flag parser, as `python -m openvlthinker.main` runs it, each with the flags parsed afresh.
# The config errors stop before anything is built, so one interpreter start serves them all.
_MANY = r"""
import contextlib, io, json, sys, types
from absl import app, flags
from openvlthinker import main as entry
results = []
for argv in json.loads(sys.argv[1]):
  sys.argv = ["openvlthinker.main", *argv]  # config_flags reads its overrides from sys.argv
  flags.FLAGS.unparse_flags()
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    try:
      app.run(entry.main, argv=sys.argv, flags_parser=entry._parse_flags)
      code = 0
    except SystemExit as e:
      code = e.code
  results.append({"returncode": code, "stderr": err.getvalue(), "stdout": ""})
print(json.dumps(results))
"""


def run_main_many(argvs: list[list[str]]) -> list[types.SimpleNamespace]:
  """(returncode, stdout, stderr) of the entry point on each command line, in one process."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _MANY, json.dumps(argvs)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return [types.SimpleNamespace(**r) for r in json.loads(proc.stdout.splitlines()[-1])]


def one_error_line(proc) -> str:
  """The run failed with exactly one `error:` line and no traceback; returns that line."""
  assert proc.returncode != 0, proc.stdout[-2000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  return errors[0]


BAD_CONFIGS = [
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
    ("--config.sft.decay=linear", "sft.decay"),
    ("--config.sft.end_lr_ratio=2.0", "sft.end_lr_ratio"),
    ("--config.rl.sampler.top_k=-5", "rl.sampler.top_k"),
    ("--config.rl.loss.kl_coef=-1", "rl.loss.kl_coef"),
    ("--config.rl.length.weight=-1", "rl.length.weight"),
    ("--config.rl.filter.max_empty_steps=0", "rl.filter.max_empty_steps"),
    ("--config.eval.checkpoint=latest", "eval.checkpoint"),
    ("--config.eval.checkpoint=rl:", "eval.checkpoint"),
    # Paths the run reads, checked before a model is built.
    ("--config.tokenizer.path=/nonexistent/sp.model", "tokenizer.path"),
    ("--config.data.image_root=/nonexistent", "data.image_root"),
]


@pytest.fixture(scope="module")
def bad_config_runs():
  argvs = [["--config=configs/test.py", "--workdir=/tmp/ovt-test-main", override]
           for override, _ in BAD_CONFIGS]
  return dict(zip((o for o, _ in BAD_CONFIGS), run_main_many(argvs)))


@pytest.mark.parametrize("override, field", BAD_CONFIGS)
def test_bad_config_stops_with_one_line_naming_the_field(bad_config_runs, override, field):
  assert field in one_error_line(bad_config_runs[override])


def test_the_one_process_harness_is_the_command_line():
  """The batched runs above print what `python -m openvlthinker.main` prints for the same line."""
  override = BAD_CONFIGS[0][0]
  (batched,) = run_main_many([["--config=configs/test.py", "--workdir=/tmp/ovt-test-main",
                               override]])
  alone = run_main(override)
  assert (batched.returncode, batched.stderr) == (alone.returncode, alone.stderr)


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
