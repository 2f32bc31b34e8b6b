"""One training run per workdir: a lock file holding the owner's host, pid and start time.

Two runs on one workdir would interleave `metrics.jsonl` and overwrite each other's checkpoints, so
the second stops with a one-line `RunError` naming the first. The lock is released on exit; one
left by a process that died (SIGKILL, a crash) is stale when its host is this host and its pid is
gone, and is taken over with a warning. Only JAX process 0 takes it (a multi-host run is one run).
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time

import jax

from openvlthinker import multihost
from openvlthinker.errors import RunError

LOCK_NAME = ".lock"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Someone else's process: it exists.
    return True
  return True


def _read(path: str) -> dict | None:
  """The lock's owner record; None when the file vanished or holds no complete record yet."""
  try:
    with open(path) as f:
      owner = json.load(f)
  except FileNotFoundError:
    return None
  except (json.JSONDecodeError, UnicodeDecodeError):
    return {}
  return owner if isinstance(owner, dict) else {}


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds `workdir/.lock` for the block (process 0 only)."""

  def __init__(self, workdir: str, *, enabled: bool | None = None):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._held = False

  def _owner_record(self) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv}

  def acquire(self) -> None:
    """Takes the lock (process 0); every process raises the RunError when it could not."""
    error = None
    if self.enabled:
      try:
        self._acquire()
      except RunError as e:
        error = str(e)
    # The other processes learn it here rather than waiting for process 0 in a collective.
    error = multihost.first_error(error)
    if error:
      raise RunError(error)

  def _acquire(self) -> None:
    for _ in range(100):  # Bounded: each pass either takes the lock or clears a stale one.
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        owner = _read(self.path)
        if owner is None:
          continue  # Released between our open and our read.
        self._refuse_or_clear(owner)
        continue
      with os.fdopen(fd, "w") as f:
        json.dump(self._owner_record(), f)
      self._held = True
      return
    raise RunError(f"{self.path}: could not take the workdir lock (it keeps changing hands)")

  def _refuse_or_clear(self, owner: dict) -> None:
    host, pid = owner.get("host"), owner.get("pid")
    if not owner:  # Being written right now by a run that is starting.
      time.sleep(0.1)
      if _read(self.path) == {}:
        raise RunError(f"{self.path}: the workdir lock is unreadable; if no run uses "
                       f"{os.path.dirname(self.path)}, delete it")
      return
    here = host == socket.gethostname()
    # Our own pid in a lock we do not hold: a previous run in this container had it.
    if here and isinstance(pid, int) and (pid == os.getpid() or not _alive(pid)):
      print(f"warning: {self.path}: taking over the lock of pid {pid}, which is gone "
            f"(started {owner.get('started')})", file=sys.stderr, flush=True)
      stale = f"{self.path}.stale.{os.getpid()}"
      try:
        os.rename(self.path, stale)  # Atomic: of two runs clearing it, one renames it.
        os.remove(stale)
      except FileNotFoundError:
        pass
      return
    where = "this host" if here else f"host {host}"
    hint = "stop it first" if here else f"stop it, or delete {self.path} if no run uses it"
    raise RunError(f"workdir {os.path.dirname(self.path)} is in use by pid {pid} on {where} "
                   f"(since {owner.get('started')}); a second run would interleave its metrics "
                   f"and overwrite its checkpoints: {hint}")

  def release(self) -> None:
    if not self._held:
      return
    self._held = False
    owner = _read(self.path)
    if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
      os.remove(self.path)

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
