"""Run outputs: metrics.jsonl, TensorBoard events, console progress.

Only process 0 writes. TensorBoard files come from tensorboardX, so there is
no TensorFlow dependency.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping


def truncate_jsonl(path: str, max_step: int) -> None:
  """Drops lines logged after `max_step` (a resumed run re-logs them)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [ln for ln in f if ln.strip()]
  keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= max_step]
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(keep)
  os.replace(tmp, path)


def first_and_last(path: str) -> tuple[dict, dict]:
  """(step-0 row, latest value of every metric) from a metrics.jsonl."""
  first, last = {}, {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        if line.strip():
          row = json.loads(line)
          if row.get("step") == 0:
            first = row
          last.update(row)
  return first, last


def _strict(value) -> float | None:
  """A float, or None (JSON null) for NaN/inf: metrics.jsonl stays JSON
  that every parser reads (bare NaN is not JSON)."""
  value = float(value)
  return value if math.isfinite(value) else None


class MetricWriter:
  """Appends `{"step": int, name: float, ...}` lines; mirrors to TensorBoard."""

  def __init__(self, workdir: str, enabled: bool = True, tensorboard=True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled and tensorboard:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled or not metrics:
      return
    row = {"step": int(step)}
    row.update({k: _strict(v) for k, v in metrics.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(row, allow_nan=False) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and v is not None:
          self._tb.add_scalar(k, v, int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()


def _fmt_time(s: float) -> str:
  s = int(max(s, 0))
  return (
    f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 3600
    else (f"{s // 60}m{s % 60:02d}s")
  )


class Progress:
  """One console line per log step: bar, loss, lr, tokens/s, eta."""

  def __init__(self, total: int, enabled: bool = True, stream=None):
    self.total = total
    self.enabled = enabled
    self.stream = stream or sys.stdout
    self.t0 = time.time()
    self.start_step = None

  def update(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    if self.start_step is None:
      self.start_step = step
      self.t0 = time.time()
    frac = step / max(self.total, 1)
    bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
    done = step - self.start_step
    rate = done / max(time.time() - self.t0, 1e-9)
    eta = (self.total - step) / rate if rate > 0 else 0.0
    parts = [f"step {step}/{self.total} [{bar}]"]
    for key, fmt in (
      ("train/loss", "loss {:.4f}"),
      ("train/lr", "lr {:.2e}"),
      ("train/tokens_per_s", "tok/s {:,.0f}"),
    ):
      if key in metrics:
        parts.append(fmt.format(metrics[key]))
    if done > 0:
      parts.append(f"eta {_fmt_time(eta)}")
    print("  ".join(parts), file=self.stream, flush=True)
