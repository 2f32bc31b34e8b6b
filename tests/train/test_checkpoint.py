"""Checkpoints: exact round trip; a damaged newest step moved aside (not deleted) and the previous
one restored, quietly; a checkpoint of another config named as such and left alone; a clear error
when nothing is readable; parameters of a chosen step."""
import asyncio
import gc
import glob
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts

from openvlthinker.train.checkpoint import CheckpointError, Checkpointer
from openvlthinker.train import weights
from openvlthinker.train.loop import StageCheckpoints, flatten_state, unflatten_state


def _tree(scale):
  return {"w": jnp.arange(4096, dtype=jnp.float32) * scale, "b": jnp.full((64, 64), scale),
          "step": jnp.int32(scale)}


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _truncate_largest_file(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
           if os.path.isfile(f) and "/d/" in f]
  largest = max(files, key=os.path.getsize)
  _truncate(largest)
  return largest


def test_round_trip_is_exact(tmp_path):
  ckpt = Checkpointer(str(tmp_path), max_to_keep=2)
  ckpt.save(3, _tree(3), {"data_iterator": {"pos": 7}})
  step, state, meta = ckpt.restore_latest(_tree(0))
  assert step == 3 and meta == {"data_iterator": {"pos": 7}}
  jax.tree.map(np.testing.assert_array_equal, state, _tree(3))


def test_damaged_newest_is_moved_aside_and_its_step_saved_again(tmp_path, capsys):
  ckpt = Checkpointer(str(tmp_path), max_to_keep=3)
  ckpt.save(1, _tree(1), {"k": 1})
  ckpt.save(2, _tree(2), {"k": 2})
  os.makedirs(tmp_path / "2.damaged")  # An earlier casualty: the name is taken.
  _truncate_largest_file(os.path.join(str(tmp_path), "2"))
  step, state, meta = ckpt.restore_latest(_tree(0))
  assert step == 1 and meta == {"k": 1}
  jax.tree.map(np.testing.assert_array_equal, state, _tree(1))
  err = capsys.readouterr().err
  assert f"checkpoint {tmp_path}/2 is unreadable" in err
  assert f"moved it to {tmp_path}/2.damaged.1" in err and len(err.strip().splitlines()) == 1
  # The one warning line, whole: what happened to the step and what the run does next.
  step_dir = re.escape(f"{tmp_path}/2")
  assert re.fullmatch(rf"warning: checkpoint {step_dir} is unreadable \(.+\); moved it to "
                      rf"{step_dir}\.damaged\.1; trying an earlier step\n", err), err
  assert os.path.isdir(tmp_path / "2.damaged.1" / "state") and ckpt.steps() == [1]
  ckpt.save(2, _tree(3), {"k": 3})  # The run reaches step 2 again: no StepAlreadyExistsError.
  step, state, meta = Checkpointer(str(tmp_path)).restore_latest(_tree(0))
  assert step == 2 and meta == {"k": 3}
  jax.tree.map(np.testing.assert_array_equal, state, _tree(3))


@pytest.mark.parametrize("damage", [
    lambda step_dir: _truncate(os.path.join(step_dir, "state", "_METADATA")),
    lambda step_dir: os.remove(os.path.join(step_dir, "state", "manifest.ocdbt")),
    lambda step_dir: open(os.path.join(step_dir, "meta", "metadata"), "w").write("{"),
], ids=["tree_metadata_truncated", "array_manifest_gone", "meta_json_broken"])
def test_each_kind_of_damage_falls_back(tmp_path, damage):
  ckpt = Checkpointer(str(tmp_path), max_to_keep=3)
  ckpt.save(1, _tree(1), {"k": 1})
  ckpt.save(2, _tree(2), {"k": 2})
  damage(str(tmp_path / "2"))
  assert Checkpointer(str(tmp_path)).restore_latest(_tree(0))[0] == 1
  assert sorted(os.listdir(tmp_path)) == ["1", "2.damaged"]


def test_a_failure_that_is_not_damage_moves_nothing(tmp_path, monkeypatch):
  ckpt = Checkpointer(str(tmp_path), max_to_keep=3)
  ckpt.save(1, _tree(1), {})
  def out_of_memory(*args, **kwargs):
    raise RuntimeError("RESOURCE_EXHAUSTED: out of memory allocating 1.0G")
  monkeypatch.setattr(ckpt._manager, "restore", out_of_memory)  # pylint: disable=protected-access
  with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
    ckpt.restore_latest(_tree(0))
  assert os.listdir(tmp_path) == ["1"]


def test_only_the_newest_steps_are_kept_and_a_missing_step_is_named(tmp_path):
  ckpt = Checkpointer(str(tmp_path / "c"), max_to_keep=2)
  for step in (1, 2, 3):
    ckpt.save(step, _tree(step), {})
  assert ckpt.steps() == [2, 3] and sorted(os.listdir(tmp_path / "c")) == ["2", "3"]
  with pytest.raises(CheckpointError, match=r"no step 1 in .*/empty/sft/checkpoints; its steps: "
                     r"none$"):
    StageCheckpoints(str(tmp_path / "empty"), "sft", keep=None).restore_params(_tree(0), step=1)


def test_no_readable_checkpoint_is_an_error_naming_it(tmp_path):
  ckpt = Checkpointer(str(tmp_path), max_to_keep=3)
  ckpt.save(5, _tree(5), {})
  _truncate_largest_file(os.path.join(str(tmp_path), "5"))
  with pytest.raises(CheckpointError, match=f"{tmp_path}/5 .*moved to {tmp_path}/5.damaged"):
    ckpt.restore_latest(_tree(0))
  assert os.path.isdir(tmp_path / "5.damaged") and ckpt.restore_latest(_tree(0)) is None


def _other(tree, change):
  tree = dict(tree)
  if change == "shape":
    tree["w"] = jnp.zeros(2048)
  elif change == "dtype":
    tree["b"] = tree["b"].astype(jnp.float32)
  elif change == "extra":
    del tree["b"]
  else:
    tree["new"] = jnp.zeros(3)
  return tree


@pytest.mark.parametrize("change,expected", [
    ("shape", "1 leaf differs, e.g. w: checkpoint float32[4096], config float32[2048]"),
    ("dtype", "1 leaf differs, e.g. b: checkpoint int32[64,64], config float32[64,64]"),
    ("extra", "1 leaf differs; extra in checkpoint: b"),
    ("missing", "1 leaf differs; missing in checkpoint: new")])
def test_a_checkpoint_of_another_config_is_named_and_left_alone(tmp_path, change, expected):
  ckpt = Checkpointer(str(tmp_path), max_to_keep=3)
  ckpt.save(1, _tree(1), {})
  ckpt.save(2, _tree(2), {})
  with pytest.raises(CheckpointError) as e:
    ckpt.restore_latest(_other(_tree(0), change))
  assert str(e.value).startswith(f"checkpoint {tmp_path}/2 does not match the config: {expected}")
  assert "\n" not in str(e.value)
  assert sorted(os.listdir(tmp_path)) == ["1", "2"] and ckpt.steps() == [1, 2]


def _stage_state(scale):  # The kernel is the largest file (the one damaged).
  return {"params": {"dense": {"kernel": jax.random.normal(jax.random.key(0), (64, 64)) * scale}},
          "opt": {"mu": jnp.zeros((64, 64))}, "step": jnp.int32(scale)}


def test_restore_params_of_a_chosen_step_or_the_newest_readable(tmp_path):
  ckpts = StageCheckpoints(str(tmp_path), "sft", keep=None)
  for step in (2, 4, 6):
    ckpts.save(step, _stage_state(step), {})
  template = _stage_state(0)["params"]
  assert ckpts.steps() == [2, 4, 6]
  step, params = ckpts.restore_params(template, step=4)
  assert step == 4
  jax.tree.map(np.testing.assert_array_equal, params, _stage_state(4)["params"])
  step, params = StageCheckpoints.at(str(tmp_path / "sft" / "checkpoints")).restore_params(template)
  assert step == 6  # Read by another run (`model.init`), whose manager never saved.
  jax.tree.map(np.testing.assert_array_equal, params, _stage_state(6)["params"])
  with pytest.raises(CheckpointError, match=r"no step 5 in .*; its steps: 2, 4, 6"):
    ckpts.restore_params(template, step=5)
  with pytest.raises(CheckpointError, match=r"does not match the config: 1 leaf differs, e.g. "
                     r"params.dense.kernel: checkpoint float32\[64,64\], config float32\[4,4\]"):
    ckpts.restore_params({"dense": {"kernel": jnp.zeros((4, 4))}})
  step, params = ckpts.restore_params({"dense": {"kernel": jnp.zeros((64, 64), jnp.bfloat16)}})
  assert step == 6 and params["dense"]["kernel"].dtype == jnp.bfloat16  # A dtype is cast.
  _truncate_largest_file(str(tmp_path / "sft" / "checkpoints" / "6"))
  step, params = ckpts.restore_params(template)
  assert step == 4
  jax.tree.map(np.testing.assert_array_equal, params, _stage_state(4)["params"])
  assert ckpts.steps() == [2, 4] and os.path.isdir(tmp_path / "sft" / "checkpoints" / "6.damaged")
  _truncate_largest_file(str(tmp_path / "sft" / "checkpoints" / "4"))
  with pytest.raises(CheckpointError, match=r"checkpoints/4 is unreadable \(ValueError: "):
    ckpts.restore_params(template, step=4)  # The step asked for, or an error: no fallback.
  assert ckpts.steps() == [2, 4]


def _reads_finishing_after_their_loop_closed():
  """What orbax's abandoned reads do after a failed restore, made certain: a coroutine awaits a
  tensorstore read on a loop that is then closed, and the read completes later, so tensorstore's
  callback meets the closed loop ("RuntimeError: Event loop is closed"); another read's error is
  left in a future no one awaits any more (asyncio: "Future exception was never retrieved")."""
  promise, read = ts.Promise.new()
  loop = asyncio.new_event_loop()
  async def restore():
    return await read
  task = loop.create_task(restore())
  task._log_destroy_pending = False  # pylint: disable=protected-access
  loop.run_until_complete(asyncio.sleep(0.01))
  failed = loop.create_future()
  failed.set_exception(ValueError('OUT_OF_RANGE: Error reading "w/0" in OCDBT database at local '
                                  'file "/x/2/state/": Requested byte range [0, 10) is not valid'))
  loop.close()
  promise.set_result(0)
  del failed


def test_a_failed_restore_prints_no_event_loop_noise(tmp_path, capfd, caplog, monkeypatch):
  # What a user's process does with unraisable exceptions (pytest's own hook turns them into
  # warnings): print them to stderr.
  monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
  mesh = jax.make_mesh((8,), ("x",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
  def tree(scale):  # Many sharded reads in flight when one of them fails.
    return {f"l{i}": jax.device_put(jax.random.normal(jax.random.key(i), (64, 256)) * scale,
                                    sharding) for i in range(50)}
  ckpt = Checkpointer(str(tmp_path), max_to_keep=3)
  ckpt.save(1, tree(1.0), {})
  ckpt.save(2, tree(2.0), {})
  _truncate_largest_file(os.path.join(str(tmp_path), "2"))
  assert ckpt.restore_latest(tree(0.0))[0] == 1
  _reads_finishing_after_their_loop_closed()  # Whether or not the real ones were late.
  for _ in range(3):  # The abandoned reads finish on tensorstore's threads, later.
    time.sleep(0.2)
    gc.collect()
  out, err = capfd.readouterr()
  for noise in ("Event loop is closed", "Exception ignored", "never retrieved"):
    assert noise not in err and noise not in out and noise not in caplog.text, err[:2000]
  assert len(err.strip().splitlines()) == 1 and "is unreadable" in err


def test_empty_directory_restores_nothing(tmp_path):
  assert Checkpointer(str(tmp_path)).restore_latest(_tree(0)) is None


def test_flat_state_names_are_readable_and_invert():
  tree = {"params": {"decoder": [{"k": jnp.ones(2)}, {"k": jnp.zeros(2)}]}, "step": jnp.int32(1)}
  flat = flatten_state(tree)
  assert set(flat) == {"params.decoder.0.k", "params.decoder.1.k", "step"}
  back = unflatten_state(tree, flat)
  jax.tree.map(np.testing.assert_array_equal, back, tree)
  with pytest.raises(ValueError, match="missing entries"):
    unflatten_state(tree, {"step": 1})


@pytest.mark.parametrize("spec, want", [
    ("", (None, None)), ("sft", ("sft", None)), ("rl", ("rl", None)), ("rl:40", ("rl", 40)),
    ("300", (None, 300)),
])
def test_checkpoint_spec_names_a_stage_and_a_step(spec, want):
  assert weights.parse_spec(spec) == want


@pytest.mark.parametrize("spec", ["sft:", ":3", "ppo", "sft:x", 3])
def test_a_bad_checkpoint_spec_is_named(spec):
  with pytest.raises(ValueError, match=r"^checkpoint: expected '', 'sft', 'rl', 'sft:STEP', ") as e:
    weights.parse_spec(spec)
  assert str(e.value).endswith(f"got {spec!r}")


def test_a_run_config_read_back_from_json_gives_the_same_sharder(tmp_path):
  """JSON turns the rules' tuples into lists and keeps None (a replicated axis): the sharder of
  the recorded config (eval mode, `model.init`) has the same, hashable rules."""
  import json

  from configs import test as test_config
  from openvlthinker.train import context
  c = test_config.get_config()
  c.sharding_rules = (*c.sharding_rules, ("act_image", None))
  with open(tmp_path / context.CONFIG_FILE, "w") as f:
    json.dump(c.to_dict(), f)
  got = context.make_sharder(context.load_run_config(str(tmp_path)))
  assert got.rules == context.make_sharder(c).rules and hash(got.rules)
  assert ("batch", ("data", "fsdp")) in got.rules and ("act_image", None) in got.rules


def test_a_resumed_stages_progress_bar_starts_at_the_restored_step(capsys):
  from openvlthinker.train import loop
  bar = loop.progress(10, 4, "rl", enabled=True)
  bar.update()
  assert bar.n == 5 and bar.total == 10
  bar.close()
  assert "rl" in capsys.readouterr().err
  assert isinstance(loop.progress(10, 4, "rl", enabled=False), loop._NoBar)


def test_a_resumed_stage_with_its_bar_on_counts_from_the_restored_step(tmp_path, capsys):
  """`run_stage` with `progress_bar=True`, resuming a 5-step stage from its step-2 checkpoint:
  the bar on stderr opens at 2/5 and closes at 5/5."""
  from openvlthinker.metrics import MetricsWriter
  from openvlthinker.train import loop

  class Data:
    def get_state(self):
      return {}

    def set_state(self, state):
      pass

  def run(steps, progress_bar):
    writer = MetricsWriter(str(tmp_path), tensorboard=False)
    try:
      return loop.run_stage("toy", steps, {"w": jnp.zeros(3)},
                            lambda state, step: ({"w": state["w"] + 1.0}, {"loss": 0.0}), Data(),
                            loop.StageCheckpoints(str(tmp_path), "toy", keep=None), writer,
                            checkpoint_every=100, progress_bar=progress_bar)
    finally:
      writer.close()

  run(2, progress_bar=False)
  capsys.readouterr()
  np.testing.assert_array_equal(run(5, progress_bar=True)["w"], np.full(3, 5.0))
  frames = [f for f in re.split(r"[\r\n]", capsys.readouterr().err) if f.strip()]
  assert frames[0].startswith("toy:") and " 2/5 " in frames[0], frames
  assert " 5/5 " in frames[-1] and not any(" 0/5 " in f for f in frames), frames


def test_signals_become_a_flag_and_a_second_ctrl_c_interrupts(capsys):
  """SIGTERM and the first SIGINT only set the flag the loop checks after each step (the first
  Ctrl-C says so on stderr); the second Ctrl-C raises at once; `restore` puts the handlers back."""
  import signal
  from openvlthinker.train.loop import Preemption
  before = {s: signal.getsignal(s) for s in Preemption.SIGNALS}
  preemption = Preemption()
  try:
    os.kill(os.getpid(), signal.SIGTERM)
    assert preemption.requested == "SIGTERM" and capsys.readouterr().err == ""
    os.kill(os.getpid(), signal.SIGINT)
    assert preemption.requested == "SIGINT"
    assert capsys.readouterr().err == ("SIGINT: saving a checkpoint after this step (Ctrl-C again "
                                       "to stop now)\n")
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  finally:
    preemption.restore()
  assert {s: signal.getsignal(s) for s in Preemption.SIGNALS} == before


def test_a_signal_mid_stage_saves_stops_and_the_same_command_resumes(tmp_path):
  """`run_stage` in this process: SIGTERM during step 2 of 5 finishes the step, saves it (with the
  data iterator's position and the stage's meta), writes its metrics and raises `Preempted`
  naming the signal and the step; the rerun restores all three and runs steps 3 to 5 only."""
  import signal
  from openvlthinker.metrics import MetricsWriter, read_jsonl
  from openvlthinker.train import loop

  class Data:  # the position of a data iterator, checkpointed with the state
    def __init__(self):
      self.pos = 0

    def get_state(self):
      return {"pos": self.pos}

    def set_state(self, state):
      self.pos = state["pos"]

  def run(data, meta, signal_at=None):
    def step_fn(state, step):
      data.pos += 1
      if step == signal_at:
        os.kill(os.getpid(), signal.SIGTERM)
      return {"w": state["w"] + 1.0}, {"loss": float(step)}
    writer = MetricsWriter(str(tmp_path), tensorboard=False)
    try:
      return loop.run_stage(
          "toy", 5, {"w": jnp.zeros(3)}, step_fn, data,
          loop.StageCheckpoints(str(tmp_path), "toy", keep=None), writer, checkpoint_every=100,
          progress_bar=False, save_meta=lambda: {"seen": data.pos * 10},
          load_meta=lambda m: meta.update(m))
    finally:
      writer.close()

  with pytest.raises(loop.Preempted) as e:
    run(Data(), {}, signal_at=1)
  assert str(e.value) == "SIGTERM: saved the toy checkpoint at step 2"
  assert sorted(os.listdir(tmp_path / "toy" / "checkpoints")) == ["2"]
  data, meta = Data(), {}
  state = run(data, meta)
  np.testing.assert_array_equal(state["w"], np.full(3, 5.0))  # 2 restored + 3 more steps
  assert data.pos == 5 and meta["seen"] == 20 and meta["data_iterator"] == {"pos": 2}
  rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [(r["step"], r["loss"]) for r in rows] == [(s + 1, float(s)) for s in range(5)]
