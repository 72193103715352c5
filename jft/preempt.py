"""SIGTERM/SIGINT as a request to save and stop at a step boundary.

Schedulers send SIGTERM before they preempt a job; a user at the terminal
sends SIGINT. Either finishes the step in flight, saves a checkpoint and
exits with `errors.EXIT_PREEMPTED` (75); a second SIGINT stops at once
(a repeated SIGTERM is the same notice again).

With several processes every one must save at the same step or the save's
collectives hang. JAX's distributed runtime has a preemption service for
this: it catches SIGTERM on any process and `reached_preemption_sync_point`
turns true on all of them at the same step. So there SIGTERM is left to
JAX, and SIGINT is turned into SIGTERM to join the same protocol.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import jax

_EARLY: list[str] = []  # signals that arrived before training started


def _remember(signum, frame) -> None:
  if not _EARLY:
    print(
      f"{signal.Signals(signum).name}: will save and exit after the first "
      "training step",
      flush=True,
    )
  _EARLY.append(signal.Signals(signum).name)


def catch_early() -> None:
  """From startup on, SIGTERM/SIGINT are remembered instead of fatal, so a
  job preempted while it loads still exits through a save (and exit 75).
  With several processes JAX's preemption service takes SIGTERM over once
  the distributed runtime starts."""
  if threading.current_thread() is threading.main_thread():
    for sig in Preemption.SIGNALS:
      signal.signal(sig, _remember)


def _multi_process() -> bool:
  return jax.process_count() > 1


class Preemption:
  """Context manager; `should_stop(step)` after each step says to save and
  stop there (the same step on every process)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, say=print):
    self.signame: str | None = None
    self._say = say
    self._old: dict = {}

  def __enter__(self) -> Preemption:
    if threading.current_thread() is not threading.main_thread():
      return self  # signals reach the main thread only
    wanted = (signal.SIGINT,) if _multi_process() else self.SIGNALS
    for sig in wanted:
      self._old[sig] = signal.signal(sig, self._handle)
    if _EARLY:
      self.signame = _EARLY[0]
      if _multi_process():
        os.kill(os.getpid(), signal.SIGTERM)
    return self

  def __exit__(self, *exc) -> None:
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old = {}

  def _handle(self, signum, frame) -> None:
    name = signal.Signals(signum).name
    if self.signame is not None:
      # A repeated SIGTERM is the same notice (a scheduler and a launcher
      # may both send one); a second Ctrl-C means stop now.
      if signum == signal.SIGINT:
        self.__exit__()
        raise KeyboardInterrupt
      return
    self.signame = name
    self._say(
      f"{name}: finishing this step, then saving a checkpoint and exiting"
      + (" (Ctrl-C again to stop at once)" if signum == signal.SIGINT else "")
    )
    sys.stdout.flush()
    if _multi_process():  # hand over to JAX's preemption service
      os.kill(os.getpid(), signal.SIGTERM)

  def should_stop(self, step: int) -> bool:
    """True at the step to save and stop at; call after every step."""
    if _multi_process():
      from jax.experimental import multihost_utils

      if multihost_utils.reached_preemption_sync_point(step):
        self.signame = self.signame or "SIGTERM (preemption notice)"
        return True
      return False
    return self.signame is not None
