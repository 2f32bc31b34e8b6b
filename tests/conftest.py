"""Test setup: 8 fake CPU devices (set before jax is imported), parsed absl flags for grain, and
the environment of the entry-point tests (`cli_env`, one compilation cache for all of them)."""
import os

import pytest

# XLA:CPU's LLVM back end at -O0: the suite's models are tiny, so compiling is most of a test's
# time and -O2's code buys nothing (a cold CLI run of the test config: 28 s -> 21 s).
_FLAGS = ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0")
_have = os.environ.get("XLA_FLAGS", "").split()  # xdist workers inherit the controller's
os.environ["XLA_FLAGS"] = " ".join(_have + [f for f in _FLAGS if f not in _have])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()



@pytest.fixture(scope="session")
def cli_env(tmp_path_factory):
  """The environment of entry-point subprocesses: the suite's 8 devices (XLA_FLAGS above) and one
  persistent compilation cache shared by every CLI test of the session, xdist workers included,
  so a run reuses what any earlier run with the same shapes compiled."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # the workers' base directories share this parent
  cache = root / "jax_cache"
  cache.mkdir(exist_ok=True)
  return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")


def pytest_collection_modifyitems(config, items):
  """The slow end-to-end tests first: under `-n 2` each worker then starts on a long test and the
  short ones fill in around them, instead of a long test starting last and running alone."""
  del config
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
