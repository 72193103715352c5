"""The errors a run ends with, and the exit code each one means.

A `UserError` is something the user can fix (a config key, a value, a file,
a data row, a busy workdir): `python -m jft.main` prints its message alone,
no traceback (unless `--verbose` or `JFT_VERBOSE=1`), and exits with its
code. Anything else is a bug or an environment failure and keeps its
traceback. The codes are documented in the README ("Failure behaviour").
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1  # an unexpected exception: traceback printed
EXIT_USER = 2  # bad config, value, file or data row; busy workdir
EXIT_NONFINITE = 3  # training diverged (NaN/inf); nothing bad was saved
EXIT_CHECKPOINT = 4  # no usable checkpoint to resume from (all corrupt)
EXIT_PREEMPTED = 75  # SIGTERM/SIGINT: checkpoint saved; rerun to resume
EXIT_TIMEOUT = 124  # launch/local.py --timeout


class UserError(Exception):
  """A problem the user can fix; its message says what and where."""

  exit_code = EXIT_USER


class ConfigError(UserError, ValueError):
  """A config key or value is wrong; the message names `config.KEY`."""


class NonFiniteError(UserError, RuntimeError):
  """Training produced NaN/inf; the message names the last good checkpoint."""

  exit_code = EXIT_NONFINITE


class CheckpointError(UserError, RuntimeError):
  """No checkpoint in the workdir can be restored; the message says why."""

  exit_code = EXIT_CHECKPOINT


class Preempted(Exception):
  """SIGTERM/SIGINT arrived; the run saved step `step` and stopped."""

  exit_code = EXIT_PREEMPTED

  def __init__(self, step: int, signame: str, workdir: str):
    self.step, self.signame, self.workdir = step, signame, workdir
    super().__init__(
      f"{signame}: saved a checkpoint at step {step} in {workdir} and "
      f"stopped (exit {EXIT_PREEMPTED}); rerun the same command to resume"
    )


def exit_code(exc: BaseException) -> int:
  """The documented exit code for an exception a run ended with."""
  return getattr(exc, "exit_code", EXIT_INTERNAL)
