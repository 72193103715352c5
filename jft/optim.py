"""Optimizer from config: optax chain with schedule, clipping and decay mask.

The optimizer only ever sees the trainable subtree; frozen weights carry no
optimizer state (see `jft.state`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import ml_collections
import optax

from jft.errors import ConfigError
from jft.state import flat_paths

OPTIMIZERS = ("adamw", "sgd", "adafactor")  # config.optimizer.name
SCHEDULES = ("cosine", "linear", "constant")  # config.optimizer.schedule


def warmup_steps(cfg: ml_collections.ConfigDict, total_steps: int) -> int:
  """`cfg.warmup_steps`, shortened to total - 1 when it would not end."""
  warmup = int(cfg.warmup_steps)
  if warmup >= total_steps and total_steps > 0:
    warmup = max(total_steps - 1, 0)
  return warmup


def describe_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> str:
  """One line: total steps, warmup, decay and peak learning rate."""
  warmup = warmup_steps(cfg, total_steps)
  if cfg.schedule == "constant":
    decay = "then constant"
  else:
    end = cfg.lr * cfg.min_lr_ratio
    decay = f"{cfg.schedule} decay to {end:.3g} over {total_steps - warmup}"
  return f"{total_steps} steps, warmup {warmup}, {decay}, peak lr {cfg.lr:.3g}"


def make_schedule(cfg: ml_collections.ConfigDict, total_steps: int):
  """Learning-rate schedule: linear warmup then cosine/linear/constant."""
  warmup = warmup_steps(cfg, total_steps)
  decay_steps = max(total_steps - warmup, 1)
  end = cfg.lr * cfg.min_lr_ratio
  if cfg.schedule == "cosine":
    main = optax.cosine_decay_schedule(
      cfg.lr, decay_steps, alpha=cfg.min_lr_ratio
    )
  elif cfg.schedule == "linear":
    main = optax.linear_schedule(cfg.lr, end, decay_steps)
  elif cfg.schedule == "constant":
    main = optax.constant_schedule(cfg.lr)
  else:
    raise ConfigError(
      f"config.optimizer.schedule: unknown {cfg.schedule!r}; "
      f"expected one of {SCHEDULES}"
    )
  if warmup == 0:
    return main
  ramp = optax.linear_schedule(0.0, cfg.lr, warmup)
  return optax.join_schedules([ramp, main], [warmup])


def decay_mask(params: Mapping, no_decay: str):
  """True for leaves that get weight decay: not norms, biases (regex)."""
  rx = re.compile(no_decay)
  flat = flat_paths(params)
  masked = {p: not rx.search(p) for p in flat}
  from flax import traverse_util

  return traverse_util.unflatten_dict(masked, sep="/")


def make_optimizer(
  cfg: ml_collections.ConfigDict, total_steps: int, trainable: Mapping
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Builds the optax chain named by `cfg.name` for the trainable subtree."""
  schedule = make_schedule(cfg, total_steps)
  mask = decay_mask(trainable, cfg.no_decay)
  if cfg.name == "adamw":
    core = optax.adamw(
      schedule,
      b1=cfg.b1,
      b2=cfg.b2,
      eps=cfg.eps,
      weight_decay=cfg.weight_decay,
      mask=mask,
    )
  elif cfg.name == "sgd":
    core = optax.chain(
      optax.add_decayed_weights(cfg.weight_decay, mask=mask),
      optax.sgd(schedule, momentum=cfg.b1 or None),
    )
  elif cfg.name == "adafactor":
    core = optax.adafactor(
      schedule,
      weight_decay_rate=cfg.weight_decay or None,
      weight_decay_mask=mask,
    )
  else:
    raise ConfigError(
      f"config.optimizer.name: unknown {cfg.name!r}; "
      f"expected one of {OPTIMIZERS}"
    )
  parts = []
  if cfg.grad_clip_norm and cfg.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  parts.append(core)
  for pattern, factor in parse_lr_scale(cfg.get("lr_scale", "")):
    where = path_mask(trainable, pattern)
    parts.append(optax.masked(optax.scale(factor), where))
  return optax.chain(*parts), schedule


def parse_lr_scale(spec: str) -> list[tuple[str, float]]:
  """`optimizer.lr_scale` "REGEX=FACTOR,...": the leaves whose path matches
  REGEX take FACTOR times the learning rate (e.g. a fresh head that must
  catch up with a pretrained trunk: PPO's value head)."""
  out = []
  for part in filter(None, (p.strip() for p in spec.split(","))):
    pattern, eq, factor = part.rpartition("=")
    try:
      value = float(factor)
      re.compile(pattern)
    except (ValueError, re.error):
      value = None
    if not eq or not pattern or value is None or not 0 <= value < math.inf:
      raise ConfigError(
        f"config.optimizer.lr_scale: {part!r} is not REGEX=FACTOR (a "
        "regular expression over parameter paths, without commas; a finite "
        "factor >= 0)"
      )
    out.append((pattern, value))
  return out


def path_mask(params: Mapping, pattern: str):
  """True for the leaves whose '/'-joined path matches `pattern`; a
  pattern that matches nothing is an error, not a silent no-op."""
  from flax import traverse_util

  rx = re.compile(pattern)
  flat = {p: bool(rx.search(p)) for p in flat_paths(params)}
  if not any(flat.values()):
    raise ConfigError(
      f"config.optimizer.lr_scale: {pattern!r} matches no trainable "
      f"parameter (paths look like {next(iter(flat), '')!r})"
    )
  return traverse_util.unflatten_dict(flat, sep="/")
