"""Checkpoints: exact round trip, fallback past a damaged newest step, a clear error otherwise."""
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openvlthinker.train.checkpoint import CheckpointError, Checkpointer
from openvlthinker.train.loop import flatten_state, unflatten_state


def _tree(scale):
  return {"w": jnp.arange(4096, dtype=jnp.float32) * scale, "b": jnp.full((64, 64), scale),
          "step": jnp.int32(scale)}


def _truncate_largest_file(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
           if os.path.isfile(f) and "/d/" in f]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)
  return largest


def test_round_trip_is_exact(tmp_path):
  ckpt = Checkpointer(str(tmp_path), max_to_keep=2)
  ckpt.save(3, _tree(3), {"data_iterator": {"pos": 7}})
  step, state, meta = ckpt.restore_latest(_tree(0))
  assert step == 3 and meta == {"data_iterator": {"pos": 7}}
  jax.tree.map(np.testing.assert_array_equal, state, _tree(3))


def test_truncated_newest_falls_back_to_previous_with_warning(tmp_path, capsys):
  ckpt = Checkpointer(str(tmp_path), max_to_keep=3)
  ckpt.save(1, _tree(1), {"k": 1})
  ckpt.save(2, _tree(2), {"k": 2})
  _truncate_largest_file(os.path.join(str(tmp_path), "2"))
  step, state, meta = ckpt.restore_latest(_tree(0))
  assert step == 1 and meta == {"k": 1}
  jax.tree.map(np.testing.assert_array_equal, state, _tree(1))
  assert f"checkpoint {tmp_path}/2 is unreadable" in capsys.readouterr().out


def test_no_readable_checkpoint_is_an_error_naming_it(tmp_path):
  ckpt = Checkpointer(str(tmp_path), max_to_keep=3)
  ckpt.save(5, _tree(5), {})
  _truncate_largest_file(os.path.join(str(tmp_path), "5"))
  with pytest.raises(CheckpointError, match=f"{tmp_path}/5"):
    ckpt.restore_latest(_tree(0))


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
