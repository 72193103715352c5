"""Run outputs: metrics.jsonl, TensorBoard events, W&B, console progress.

Only process 0 writes. TensorBoard files come from tensorboardX, so there is
no TensorFlow dependency.

Weights & Biases is off unless `config.wandb.enabled` (the `wandb` extra:
`pip install 'jft[wandb]'`); when off, `wandb` is never imported and nothing
is contacted. When on, the run's resolved config (WORKDIR/config.json) is
the W&B config, every metrics row is logged with its `step` as the x axis,
and the W&B run id is kept in WORKDIR/wandb_run_id so a resumed jft run
continues the same W&B run. `wandb.mode='offline'` writes the W&B files
(under `wandb.dir`, default WORKDIR) without a network; `wandb sync` uploads
them later.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import secrets
import string
import sys
import time
from collections.abc import Mapping

from jft import errors

WANDB_MODES = ("online", "offline", "disabled")
WANDB_ID_FILE = "wandb_run_id"


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


def wandb_installed() -> bool:
  """Whether `wandb` can be imported (found without importing it)."""
  return importlib.util.find_spec("wandb") is not None


def _wandb_settings(config):
  """`config.wandb`, or None when the config has none or it is off."""
  try:
    w = config.wandb
  except (AttributeError, KeyError):
    return None
  return w if w.enabled else None


def _run_config(workdir: str, config) -> dict:
  """The resolved config (WORKDIR/config.json, which jft.train writes
  before the writer starts), else `config` as a dict."""
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return config.to_dict()


def wandb_run(workdir: str, config):
  """A started W&B run for `config.wandb` (see the module docstring)."""
  w = config.wandb
  try:
    import wandb  # only here: a run without W&B never imports it
  except ImportError as e:
    raise errors.UserError(
      "config.wandb.enabled=True needs the wandb package, which is not "
      "installed: pip install 'jft[wandb]' (or pip install wandb)"
    ) from e
  id_path = os.path.join(workdir, WANDB_ID_FILE)
  if os.path.exists(id_path):
    with open(id_path) as f:
      run_id = f.read().strip()
  else:
    alphabet = string.ascii_lowercase + string.digits  # as W&B's own ids
    run_id = "".join(secrets.choice(alphabet) for _ in range(8))
    with open(id_path, "w") as f:
      f.write(run_id + "\n")
  folder = w.dir or workdir
  os.makedirs(folder, exist_ok=True)
  try:
    run = wandb.init(
      project=w.project,
      entity=w.entity or None,
      name=w.name or os.path.basename(os.path.abspath(workdir)),
      group=w.group or None,
      mode=w.mode,
      dir=folder,
      config=_run_config(workdir, config),
      id=run_id,
      resume="allow",
    )
  except wandb.errors.Error as e:  # no login, no network, a bad entity
    raise errors.UserError(
      f"config.wandb: W&B did not start ({' '.join(str(e).split())}); run "
      "`wandb login`, or set config.wandb.mode='offline' (`wandb sync` "
      "later) or config.wandb.enabled=False"
    ) from e
  run.define_metric("*", step_metric="step")  # jft's step on the x axis
  return run


class MetricWriter:
  """Appends `{"step": int, name: float, ...}` lines; mirrors them to
  TensorBoard and, when `config.wandb.enabled`, to Weights & Biases."""

  def __init__(
    self, workdir: str, enabled: bool = True, tensorboard=True, config=None
  ):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    self._wandb = None
    if enabled and tensorboard:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(os.path.join(workdir, "tb"))
    if enabled and _wandb_settings(config) is not None:
      self._wandb = wandb_run(workdir, config)

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
    if self._wandb is not None:
      self._wandb.log({k: v for k, v in row.items() if v is not None})

  def close(self) -> None:
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()
      self._tb = None
    if self._wandb is not None:
      self._wandb.finish()
      self._wandb = None


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
