"""Objectives by name: `config.objective` picks one, never an if-branch.

Each objective module defines a class with the `jft.objectives.base.Objective`
interface; the registry maps names to `module:Class` and imports lazily.
"""

from __future__ import annotations

import importlib

from jft.errors import ConfigError

REGISTRY = {
  "clm": "jft.objectives.clm:CLM",
  "sft": "jft.objectives.sft:SFT",
  "dpo": "jft.objectives.dpo:DPO",
  "mlm": "jft.objectives.mlm:MLM",
  "reward": "jft.objectives.reward:RewardModel",
  "ppo": "jft.objectives.ppo:PPO",
  "grpo": "jft.objectives.grpo:GRPO",
  "kto": "jft.objectives.kto:KTO",
}

# How a run of each objective is called on the console (stage banners).
TITLES = {
  "clm": "pretraining",
  "sft": "SFT",
  "dpo": "DPO",
  "mlm": "MLM pretraining",
  "reward": "reward model",
  "ppo": "PPO",
  "grpo": "GRPO",
  "kto": "KTO",
}


def get(name: str):
  """Returns the objective class registered under `name`."""
  if name not in REGISTRY:
    raise ConfigError(
      f"config.objective: unknown {name!r}; known: {sorted(REGISTRY)}"
    )
  module, cls = REGISTRY[name].split(":")
  return getattr(importlib.import_module(module), cls)
