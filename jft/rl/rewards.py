"""Reward functions for online RL (PPO, GRPO), by name.

A reward function takes the rollout's prompt rows (dicts: `prompt` plus any
reference fields the data has, e.g. the built-in suite's `task`), the
decoded completions and whether each ended with an eos, and returns one
float per completion:

  task            1 if the built-in suite's checker accepts the answer
                  (rows need `task`), else 0
  format          1 if the completion stopped (an eos) and fully matches
                  `rl.format_regex`, else 0
  reward_model    the score of a jft reward model (`rl.reward_model`, a
                  run directory with `model.head='score'`), read at the
                  completion's last token
  module:function a user function `f(rows, completions, stopped) ->
                  list[float]`, imported by name

`config.rl.reward_funcs` lists them (comma-separated) and
`config.rl.reward_weights` weighs them (default 1 each); each one's mean is
logged on its own as `rewards/NAME/mean`.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence

import numpy as np

from jft.data import tasks

RewardFn = Callable[[Sequence[dict], Sequence[str], Sequence[bool]], list]


def task_reward(rows, completions, stopped) -> list[float]:
  """The built-in suite's checker: 1 for a right answer, else 0."""
  out = []
  for row, text in zip(rows, completions, strict=True):
    task = row.get("task")
    if task not in tasks.TASKS:
      raise ValueError(
        f"reward 'task' needs rows of the built-in suite (a 'task' field in "
        f"{sorted(tasks.TASKS)}); got {task!r} for prompt {row['prompt']!r}"
      )
    out.append(float(tasks.is_correct(task, row["prompt"], text)))
  return out


def format_reward(regex: str) -> RewardFn:
  pattern = re.compile(regex)

  def reward(rows, completions, stopped) -> list[float]:
    del rows
    return [
      float(bool(done) and pattern.fullmatch(text) is not None)
      for text, done in zip(completions, stopped, strict=True)
    ]

  return reward


def import_function(spec: str) -> RewardFn:
  """`package.module:function` -> the function, or a clear error."""
  module, _, name = spec.partition(":")
  if not module or not name:
    raise ValueError(f"config.rl.reward_funcs: {spec!r} is not module:function")
  try:
    fn = getattr(importlib.import_module(module), name)
  except (ImportError, AttributeError) as e:
    raise ValueError(
      f"config.rl.reward_funcs: cannot import {spec!r}: {e}"
    ) from None
  if not callable(fn):
    raise ValueError(f"config.rl.reward_funcs: {spec!r} is not callable")
  return fn


def parse(funcs: str, weights: str) -> list[tuple[str, float]]:
  """`'task,format'`, `'1,0.5'` -> [('task', 1.0), ('format', 0.5)]."""
  names = [f.strip() for f in funcs.split(",") if f.strip()]
  if not names:
    raise ValueError("config.rl.reward_funcs is empty")
  if weights.strip():
    ws = [float(w) for w in weights.split(",")]
    if len(ws) != len(names):
      raise ValueError(
        f"config.rl.reward_weights has {len(ws)} weights for {len(names)} "
        f"reward functions ({names})"
      )
  else:
    ws = [1.0] * len(names)
  return list(zip(names, ws, strict=True))


def build(config, reward_model_fn=None) -> list[tuple[str, float, RewardFn]]:
  """(name, weight, fn) for each function `config.rl.reward_funcs` lists.

  `reward_model_fn(rows, completions, stopped)` scores with the reward
  model (built by the rollout source, which holds the model).
  """
  out = []
  for name, weight in parse(config.rl.reward_funcs, config.rl.reward_weights):
    if name == "task":
      fn = task_reward
    elif name == "format":
      fn = format_reward(config.rl.format_regex)
    elif name == "reward_model":
      if reward_model_fn is None:
        raise ValueError(
          "config.rl.reward_funcs has 'reward_model' but config.rl."
          "reward_model names no reward model run"
        )
      fn = reward_model_fn
    elif ":" in name:
      fn = import_function(name)
    else:
      raise ValueError(
        f"config.rl.reward_funcs: unknown {name!r}; expected task, format, "
        "reward_model or module:function"
      )
    out.append((name, weight, fn))
  return out


def score(funcs, rows, completions, stopped) -> tuple[np.ndarray, dict]:
  """Weighted total reward per completion [N] and each function's mean."""
  total = np.zeros(len(completions), np.float32)
  means = {}
  for name, weight, fn in funcs:
    r = np.asarray(fn(rows, completions, stopped), np.float32)
    if r.shape != (len(completions),) or not np.all(np.isfinite(r)):
      raise ValueError(
        f"reward function {name!r} must return one finite float per "
        f"completion ({len(completions)}); got shape {r.shape}"
      )
    total += weight * r
    means[f"rewards/{name}/mean"] = float(r.mean())
  return total, means
