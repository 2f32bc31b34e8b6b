"""Test setup: 8 fake CPU devices (set before jax is imported), parsed absl flags for grain, one
persistent compilation cache for the session, and the environment of the entry-point tests
(`cli_env`)."""
import os
import shutil
import tempfile

import pytest

# XLA:CPU's LLVM back end at -O0: the suite's models are tiny, so compiling is most of a test's
# time and -O2's code buys nothing (a cold CLI run of the test config: 28 s -> 21 s).
_FLAGS = ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0")
_have = os.environ.get("XLA_FLAGS", "").split()  # xdist workers inherit the controller's
os.environ["XLA_FLAGS"] = " ".join(_have + [f for f in _FLAGS if f not in _have])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session: the xdist workers (they inherit this
# environment), the entry points' subprocesses and the in-process runs share the programs they
# compile (the in-process `runner.run` of test_runner.py compiles what test_run.py's CLI run
# does). In-process, JAX's default keeps programs that took a second or more to compile (writing
# every small one too made tests/models + tests/sampler 171 s instead of 145 s); `cli_env` keeps
# every program. Set JAX_COMPILATION_CACHE_DIR to keep a cache across sessions.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="openvlthinker-test-jax-")
  os.environ["OPENVLTHINKER_TEST_OWNS_CACHE"] = "1"  # this session removes it at the end

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()


def pytest_unconfigure(config):
  """The session's own cache goes with it (on the controller: xdist workers share it)."""
  if os.environ.get("OPENVLTHINKER_TEST_OWNS_CACHE") and not hasattr(config, "workerinput"):
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def cli_env():
  """The environment of entry-point subprocesses: the suite's 8 devices (XLA_FLAGS above) and the
  session's compilation cache, into which they write every program (most of a CLI run's compile
  time is many small ones)."""
  return dict(os.environ, JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")


def pytest_collection_modifyitems(config, items):
  """The slow end-to-end tests first, then the in-process runs (`stage`): under `-n 2` each
  worker then starts on a long test and the short ones fill in around them, instead of a long test
  starting last and running alone. Under mutmut (one mutant, `-x`) the other way round: a mutant
  the quick tests kill never waits for a stage to run."""
  del config
  cost = lambda item: (2 if item.get_closest_marker("slow") else
                       1 if item.get_closest_marker("stage") else 0)
  items.sort(key=cost, reverse="MUTANT_UNDER_TEST" not in os.environ)
