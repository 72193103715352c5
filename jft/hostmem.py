"""Host memory settings: a train step's buffers stay mapped between steps.

Why: XLA:CPU allocates the buffers a step needs with the C library's
`malloc` and frees them after; most of them live in one temporary block
(283-404 MiB for the ref-5M step). glibc serves a block above `M_MMAP_THRESHOLD`
(at most 32 MiB) with a fresh `mmap` and returns freed heap tops above
`M_TRIM_THRESHOLD` to the kernel, so every step page-faults the same
megabytes in again (103,362 minor faults a ref-5M step). In a VM that costs
a fifth of a small model's step. Numbers cannot change: only where the
bytes come from does.

`tune()` (called by `jft.main` before any device is touched, and by
`train.run`), once per process, Linux with glibc:

- `tune_malloc()`: no `mmap` for large blocks (`M_MMAP_MAX` 0: they come
  from the heap), a 2 GiB trim threshold (a freed step is kept for the
  next) and the 32 MiB mmap threshold (for a user who re-enables mmap).
- `inline_cpu_dispatch()`: `jax_cpu_enable_async_dispatch=False`, so a
  single-device CPU computation runs in the calling thread, whose heap can
  grow; a worker thread's arena cannot hold a block above 64 MiB and maps
  it whatever `M_MMAP_MAX` says. Only possible before JAX creates
  its CPU client; sharded (multi-device) computations stay asynchronous.

Together (`bench/hostmem.py`, fresh processes): no page faults in the
steady-state step, the ref-5M step 0.81x (float32) / 0.78x (bfloat16) the
time with glibc's and JAX's defaults, peak RSS no higher. The thresholds
alone change neither the faults nor the time: the step's block is above
any mmap threshold glibc allows.

Nothing is overridden that the user chose: `JFT_MALLOC=default` skips both;
`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`, `MALLOC_MMAP_MAX_` or a
`glibc.malloc` tunable skips the allocator part, and
`JAX_CPU_ENABLE_ASYNC_DISPATCH` the dispatch part.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = (2 << 30) - 1  # mallopt takes an int: 2 GiB - 1
MMAP_MAX = 0  # large blocks from the heap too

_applied: dict | None = None
_dispatch: str | None = None


def user_choice(environ) -> str | None:
  """Why not to touch the allocator (a user setting), or None."""
  if environ.get("JFT_MALLOC", "") == "default":
    return "JFT_MALLOC=default"
  for key in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
    if key in environ:
      return key
  if "MALLOC_MMAP_MAX_" in environ:
    return "MALLOC_MMAP_MAX_"
  if "glibc.malloc" in environ.get("GLIBC_TUNABLES", ""):
    return "GLIBC_TUNABLES"
  return None


def _glibc():
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.gnu_get_libc_version  # noqa: B018 (musl has no such symbol)
  except (OSError, AttributeError):
    return None
  return libc


def tune_malloc(environ=None) -> dict:
  """Applies the allocator settings once; returns what was done (for logs
  and benches): `{"mmap_threshold", "trim_threshold", "mmap_max"}` in
  bytes / blocks, or `{"skipped": reason}`."""
  global _applied
  if _applied is not None:
    return _applied
  reason = user_choice(os.environ if environ is None else environ)
  libc = None if reason else _glibc()
  if reason is None and libc is None:
    reason = "not glibc"
  if reason:
    _applied = {"skipped": reason}
    return _applied
  ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
  ok &= libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
  ok &= libc.mallopt(M_MMAP_MAX, MMAP_MAX) == 1
  _applied = (
    {
      "mmap_threshold": MMAP_THRESHOLD,
      "trim_threshold": TRIM_THRESHOLD,
      "mmap_max": MMAP_MAX,
    }
    if ok
    else {"skipped": "mallopt refused"}
  )
  return _applied


def inline_cpu_dispatch(environ=None) -> str:
  """Turns JAX's CPU async dispatch off if nothing has decided it yet;
  returns what happened, for the log line."""
  global _dispatch
  if _dispatch is not None:
    return _dispatch
  environ = os.environ if environ is None else environ
  import jax
  from jax._src import xla_bridge

  if environ.get("JFT_MALLOC", "") == "default":
    _dispatch = "CPU async dispatch left on (JFT_MALLOC=default)"
  elif "JAX_CPU_ENABLE_ASYNC_DISPATCH" in environ:
    _dispatch = "CPU async dispatch as JAX_CPU_ENABLE_ASYNC_DISPATCH says"
  elif xla_bridge.backends_are_initialized():
    _dispatch = "CPU async dispatch left on (JAX was already initialized)"
  else:
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    _dispatch = "single-device CPU computations run inline"
  return _dispatch


def tune(environ=None) -> str:
  """Both settings; one line for the log."""
  return f"{describe(tune_malloc(environ))}; {inline_cpu_dispatch(environ)}"


def describe(applied: dict) -> str:
  if "skipped" in applied:
    return f"glibc malloc defaults ({applied['skipped']})"
  return (
    f"malloc: no mmap for large blocks, trim threshold "
    f"{(applied['trim_threshold'] + 1) >> 20} MiB (jft.hostmem)"
  )
