"""The workdir lock: held while a run is in the block, refused while its owner lives, taken over
when it is gone, never silently shared with another host."""
import json
import os
import socket
import stat
import subprocess
import sys
import time

import pytest

from openvlthinker.errors import RunError
from openvlthinker.train.workdir_lock import WorkdirLock


def write_lock(workdir, **owner):
  with open(os.path.join(workdir, ".lock"), "w") as f:
    json.dump({"started": "earlier", **owner}, f)


def test_held_in_the_block_and_released_after(tmp_path):
  with WorkdirLock(str(tmp_path), enabled=True):
    with open(tmp_path / ".lock") as f:
      owner = json.load(f)
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / ".lock").st_mode) == 0o644 & ~umask  # data, not a program
    code = ("from openvlthinker.train.workdir_lock import WorkdirLock as L; "
            f"L({str(tmp_path)!r}, enabled=True).acquire()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0
    assert f"is in use by pid {os.getpid()} on this host" in proc.stderr, proc.stderr
  assert not os.path.exists(tmp_path / ".lock")


def test_lock_of_a_live_process_refuses(tmp_path):
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    write_lock(str(tmp_path), host=socket.gethostname(), pid=sleeper.pid)
    with pytest.raises(RunError) as e:
      WorkdirLock(str(tmp_path), enabled=True).acquire()
    assert str(e.value) == (
        f"workdir {tmp_path} is in use by pid {sleeper.pid} on this host (since earlier); a "
        "second run would interleave its metrics and overwrite its checkpoints: stop it first")
    time.sleep(0.2)
    assert sleeper.poll() is None, "checking the owner is alive must not signal it"
  finally:
    sleeper.kill()
    sleeper.wait()
  # Now its owner is gone: the lock is stale and taken over.
  with WorkdirLock(str(tmp_path), enabled=True):
    with open(tmp_path / ".lock") as f:
      assert json.load(f)["pid"] == os.getpid()


def test_lock_of_another_host_refuses_and_says_how_to_clear_it(tmp_path):
  write_lock(str(tmp_path), host="some-other-host", pid=1)
  with pytest.raises(RunError, match="host some-other-host.*delete .*\\.lock if no run uses it"):
    WorkdirLock(str(tmp_path), enabled=True).acquire()


def test_disabled_lock_touches_nothing(tmp_path):
  with WorkdirLock(str(tmp_path), enabled=False):
    assert not os.path.exists(tmp_path / ".lock")


def test_a_lock_that_keeps_changing_hands_is_an_error_not_a_hang(tmp_path, monkeypatch):
  from openvlthinker.train import workdir_lock
  write_lock(str(tmp_path), host=socket.gethostname(), pid=os.getpid())
  reads = []
  monkeypatch.setattr(workdir_lock, "_read", lambda path: reads.append(path))  # gone each time
  with pytest.raises(RunError, match=r"/\.lock: could not take the workdir lock \(it keeps "
                     r"changing hands\)$"):
    WorkdirLock(str(tmp_path), enabled=True).acquire()
  assert len(reads) == 100


@pytest.mark.parametrize("owner", [dict(pid=1, host=socket.gethostname()),  # taken over here
                                   dict(pid=os.getpid(), host="elsewhere")])  # same pid elsewhere
def test_release_leaves_a_lock_someone_else_took_over(tmp_path, owner):
  lock = WorkdirLock(str(tmp_path), enabled=True)
  lock.acquire()
  write_lock(str(tmp_path), **owner)  # while this run was presumed dead
  lock.release()
  with open(tmp_path / ".lock") as f:
    assert json.load(f)["pid"] == owner["pid"]
