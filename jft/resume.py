"""What a resumed run may change, and the check that enforces it.

A resume continues the saved run, so its config must be the saved one
(WORKDIR/config.json), up to the keys below: how long to train and how
often to log, evaluate and checkpoint. Anything else (a learning rate, a
seed, the batch size, the objective, a model shape) would silently make a
different run out of two halves, so it is an error naming each key with its
old and new value, unless `config.allow_config_change` lists it. Shape
changes are caught here, before any restore, and so is another process
count (`runtime.process_count`): each process's data position is saved, so
a different count would silently read other rows.
"""

from __future__ import annotations

import json
import os

from jft.errors import ConfigError

# Keys a resume may change freely (prefix match on dotted paths).
MAY_CHANGE = (
  "total_steps",
  "log_every",
  "eval_every",
  "checkpoint_every",
  "keep_checkpoints",
  "eval_batch_size",
  "stage_cache",
  "allow_config_change",
  "sft.max_eval_generations",
  "rl.samples_to_log",
  "mesh.",  # orbax reshards on restore
  "model.logits_chunk",  # how the loss is computed, not what (same numbers)
  "data.read_threads",  # how records are read, not which
  "data.tokenizer_train_mb",  # a resume loads the workdir's tokenizer
  "wandb.",  # where metrics are mirrored, not what is trained
  # The steps `data.num_epochs` passes take: counted from the data after
  # this check (the keys that shape the data may not change).
  "runtime.data_steps",
)


def flatten(tree, prefix: str = "") -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1}; lists and tuples are leaves."""
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flatten(v, key + "."))
    else:
      out[key] = v
  return out


def _may_change(key: str, allowed: tuple[str, ...]) -> bool:
  return any(
    key == a or (a.endswith(".") and key.startswith(a)) for a in allowed
  )


def defaults() -> dict:
  """Every key's default (`jft.config.base_config`), flattened as saved."""
  from jft import config as config_lib

  return flatten(as_json(config_lib.base_config().to_dict()))


def changes(
  old: dict, new: dict, allowed=()
) -> list[tuple[str, object, object]]:
  """(key, old, new) for every key that differs and may not.

  A key the saved config lacks (it was written by a jft without that key)
  may have its default: a new key's default keeps the old behaviour."""
  allowed = MAY_CHANGE + tuple(allowed)
  a, b = flatten(old), flatten(new)
  default = defaults()
  out = []
  for key in sorted(set(a) | set(b)):
    if _may_change(key, allowed):
      continue
    va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
    if va == "<absent>" and key in default and vb == default[key]:
      continue
    if va != vb:
      out.append((key, va, vb))
  return out


def as_json(resolved: dict) -> dict:
  """The dict as config.json stores it (tuples as lists, odd values str)."""
  return json.loads(json.dumps(resolved, default=str))


def saved_config(workdir: str) -> dict | None:
  """WORKDIR/config.json as saved (None: no run saved one)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def planned_steps(config, workdir: str) -> int | None:
  """The step a run of `config` in `workdir` ends at, as far as is known
  before its data is read: `total_steps`; with `data.num_epochs`, the
  fewer of that (0 = no limit) and the steps the data lasts, as the run
  there saved them (config.json's `runtime.data_steps`); None when no run
  saved them yet."""
  if config.data.num_epochs is None:
    return config.total_steps
  saved = saved_config(workdir) or {}
  data_steps = saved.get("runtime", {}).get("data_steps")
  if data_steps is None:
    return None
  return min(config.total_steps or data_steps, data_steps)


def finished(config, workdir: str, latest: int | None) -> int | None:
  """The planned last step (`planned_steps`) when the run in `workdir`,
  whose newest checkpoint is step `latest`, has reached it; else None."""
  planned = planned_steps(config, workdir)
  if latest and planned is not None and latest >= planned:
    return planned
  return None


def check(workdir: str, resolved: dict, allow: str = "") -> None:
  """Raises ConfigError if `resolved` differs from WORKDIR/config.json in a
  key that may not change (see module docstring)."""
  path = os.path.join(workdir, "config.json")
  saved = saved_config(workdir)
  if saved is None:
    return  # a run from before config.json was written: nothing to check
  extra = tuple(k.strip() for k in allow.split(",") if k.strip())
  diff = changes(saved, as_json(resolved), extra)
  if diff:
    lines = "\n".join(f"  {k}: {a!r} -> {b!r}" for k, a, b in diff)
    keys = ",".join(k for k, _, _ in diff)
    raise ConfigError(
      f"{workdir} is resumed with a different config ({path}):\n{lines}\n"
      "A resume must continue the same run. Use a new --workdir, or accept "
      f"the change with --config.allow_config_change={keys}"
    )
