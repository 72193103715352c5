"""Host allocator settings: glibc malloc keeps a train step's large buffers.

Why: XLA:CPU allocates every buffer a step needs (activations, gradients,
the optimizer update) with the C library's `malloc` and frees it after.
glibc serves blocks above `M_MMAP_THRESHOLD` with a fresh `mmap` and returns
freed heap tops above `M_TRIM_THRESHOLD` to the kernel, so each step pays
page faults to zero-fill the same megabytes again. In a VM that is about a
fifth of a small model's step: the ref-5M step took 0.79x the time with the
settings below, float32 and bfloat16, on a 2-vCPU Xeon (README, "Speed").
Numbers cannot change: only where the bytes come from does.

`tune_malloc()` raises both thresholds, once per process, on Linux with
glibc. It never overrides a choice the user made: it does nothing when
`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_` or a `glibc.malloc`
tunable is set, or when `JFT_MALLOC=default`. Buffers above 32 MiB (glibc's
cap for the threshold) are still mapped per use.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 256 << 20  # a step's freed working set is kept for the next

_applied: dict | None = None


def user_choice(environ) -> str | None:
  """Why not to touch the allocator (a user setting), or None."""
  if environ.get("JFT_MALLOC", "") == "default":
    return "JFT_MALLOC=default"
  for key in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
    if key in environ:
      return key
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
  """Applies the thresholds once; returns what was done (for logs/benches):
  `{"mmap_threshold": bytes, "trim_threshold": bytes}`, or `{"skipped":
  reason}`."""
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
  _applied = (
    {"mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD}
    if ok
    else {"skipped": "mallopt refused"}
  )
  return _applied


def describe(applied: dict) -> str:
  if "skipped" in applied:
    return f"glibc malloc defaults ({applied['skipped']})"
  return (
    f"malloc mmap threshold {applied['mmap_threshold'] >> 20} MiB, "
    f"trim threshold {applied['trim_threshold'] >> 20} MiB (jft.hostmem)"
  )
