"""One run per workdir: an exclusive lock taken at start.

Two runs on one workdir interleave metrics rows and race inside the
checkpoint library. The lock is `flock` on WORKDIR/.jft.lock, which the
kernel drops when its holder dies, however it dies: a lock file left by a
dead process is stale by construction and is taken over (with a message).
The file records who holds it, so the second run can name the holder.
(flock over NFS depends on the server; on shared storage only process 0
takes the lock.)
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time

from jft.errors import UserError

LOCK_FILE = ".jft.lock"


class WorkdirBusy(UserError):
  """Another live run holds the workdir."""


def _holder(path: str) -> dict:
  try:
    with open(path) as f:
      return json.loads(f.read() or "{}")
  except (OSError, ValueError):
    return {}


def _describe(h: dict) -> str:
  if not h:
    return "an unknown process"
  return (
    f"pid {h.get('pid')} on {h.get('host')} (started "
    f"{h.get('started', '?')}: {h.get('argv', '')})"
  )


class WorkdirLock:
  """Context manager holding WORKDIR/.jft.lock for the run's lifetime."""

  def __init__(self, workdir: str, enabled: bool = True, say=print):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.enabled, self._say, self._fd = enabled, say, None

  def __enter__(self) -> WorkdirLock:
    if not self.enabled:
      return self
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise UserError(
        f"{os.path.dirname(self.path)}: cannot write the workdir "
        f"({e.strerror or e})"
      ) from None
    previous = _holder(self.path)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      os.close(fd)
      raise WorkdirBusy(
        f"{os.path.dirname(self.path)} is in use by {_describe(previous)}; "
        "one run per workdir (wait for it, stop it, or pick another "
        f"--workdir; the lock is {self.path})"
      ) from None
    if previous.get("pid") and previous.get("pid") != os.getpid():
      self._say(
        f"{self.path}: taking over a stale lock of {_describe(previous)} "
        "(that process is gone)"
      )
    me = {
      "pid": os.getpid(),
      "host": socket.gethostname(),
      "started": time.strftime("%Y-%m-%d %H:%M:%S"),
      "argv": " ".join(sys.argv)[:200],
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    self._fd = fd
    return self

  def __exit__(self, *exc) -> None:
    if self._fd is None:
      return
    try:
      os.ftruncate(self._fd, 0)  # an empty file: released cleanly
      fcntl.flock(self._fd, fcntl.LOCK_UN)
    finally:
      os.close(self._fd)
      self._fd = None
