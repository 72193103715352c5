"""Shared by the benchmarks: what machine the figures come from."""

from __future__ import annotations

import platform


def cpu_name() -> str:
  """The CPU model (figures are only comparable on the same one)."""
  try:
    with open("/proc/cpuinfo") as fh:
      for line in fh:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"
