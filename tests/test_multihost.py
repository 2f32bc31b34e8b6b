"""`multihost`: start-up from the environment (one-line errors), and with one process every helper
is the plain local operation (no collective). Two real processes: tests/train/test_multiprocess.py.
"""
import subprocess
import sys

import jax
import numpy as np
import pytest

from openvlthinker import multihost
from openvlthinker.sharding import Sharder, batch_sharding, make_mesh


@pytest.fixture
def calls(monkeypatch):
  """jax.distributed.initialize replaced by a recorder; the env cleared of the three variables."""
  seen = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: seen.append(kw))
  for name in (multihost.ENV_COORDINATOR, multihost.ENV_NUM_PROCESSES, multihost.ENV_PROCESS_ID):
    monkeypatch.delenv(name, raising=False)
  return seen


def test_initialize_from_the_environment_or_the_flag(calls, monkeypatch):
  assert not multihost.initialize(False) and calls == []
  assert multihost.initialize(True) and calls == [{}]  # a TPU pod: JAX finds everything
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.2:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "3")
  assert multihost.initialize(False)  # the environment alone starts it
  assert calls[-1] == dict(coordinator_address="10.0.0.2:1234", num_processes=4, process_id=3)


@pytest.mark.parametrize("env, message", [
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, r"^JAX_COORDINATOR_ADDRESS: expected it"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_COORDINATOR_ADDRESS": "h:1"}, r"^JAX_PROCESS_ID: expected"),
    ({"JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0", "JAX_COORDINATOR_ADDRESS": "h:1"},
     r"^JAX_NUM_PROCESSES: expected an integer, got 'two'"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2", "JAX_COORDINATOR_ADDRESS": "h:1"},
     r"^JAX_PROCESS_ID: expected an id in \[0, 2\), got 2"),
])
def test_initialize_names_the_bad_variable(calls, monkeypatch, env, message):
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  with pytest.raises(ValueError, match=message):
    multihost.initialize(False)
  assert calls == []


def test_the_entry_point_says_it_in_one_line(tmp_path):
  env = {"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "JAX_NUM_PROCESSES": "2",
         "JAX_PROCESS_ID": "0"}
  proc = subprocess.run([sys.executable, "-m", "openvlthinker.main", "--config=configs/test.py",
                         f"--workdir={tmp_path}"], env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      "error: JAX_COORDINATOR_ADDRESS: expected it beside JAX_NUM_PROCESSES (the coordinator's "
      "host:port, and this process's id in [0, JAX_NUM_PROCESSES))"]


def test_one_process_helpers_are_local():
  sharder = Sharder(make_mesh({"data": 1, "fsdp": -1, "tensor": 1}))
  x = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
  g = multihost.global_rows(batch_sharding(sharder, 2, x.shape), x)
  assert g.sharding == batch_sharding(sharder, 2, x.shape)
  np.testing.assert_array_equal(multihost.local_rows(g), x)
  np.testing.assert_array_equal(multihost.all_rows(g), x)
  assert multihost.block(8) == slice(0, 8)
  assert multihost.concat(x) is x and multihost.allgather_json({"a": 1}) == [{"a": 1}]
  assert multihost.any_process(True) and not multihost.any_process(False)
  assert multihost.max_over_processes(5) == 5 and multihost.max_over_processes((1, 2)) == (1, 2)
  assert multihost.first_error(None) is None and multihost.first_error("x") == "x"
  assert multihost.local_rows(jax.numpy.int32(7)) == 7  # a replicated scalar as it is
