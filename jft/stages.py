"""Multi-stage recipes: `config.init = 'run:configs/X.py[:ARG]'`.

The named config is trained once into a cache folder keyed by a hash of its
resolved config, then reused: SFT starts from pretraining and DPO from SFT
with no files given, and a second run costs nothing. An interrupted stage
resumes from its checkpoint like any run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cache_root(config) -> str:
  if config.stage_cache:
    return config.stage_cache
  return os.environ.get(
    "JFT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jft")
  )


def load_config_file(spec: str):
  """`configs/X.py[:ARG]` -> its `get_config(ARG)` (cwd, then repo root)."""
  path, _, arg = spec.partition(":")
  for base in (os.getcwd(), REPO_ROOT):
    full = os.path.join(base, path)
    if os.path.exists(full):
      break
  else:
    raise FileNotFoundError(f"config.init: no config file {path!r}")
  mod_spec = importlib.util.spec_from_file_location("_jft_stage_cfg", full)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def stage_workdir(spec: str, config) -> tuple[str, object]:
  """(cached workdir, stage config) for a `run:` spec."""
  from jft.data import tasks
  from jft.models.presets import PRESETS

  stage = load_config_file(spec)
  stage.stage_cache = cache_root(config)
  # The preset's shape and the built-in suite's format are part of the key:
  # editing either must not reuse a run made with the old one.
  payload = stage.to_json(sort_keys=True) + json.dumps(
    PRESETS.get(stage.model.preset, {}), sort_keys=True
  )
  if not stage.data.train_files:
    payload += f"suite-format-{tasks.FORMAT_VERSION}"
  key = hashlib.sha256(payload.encode()).hexdigest()
  name = os.path.splitext(os.path.basename(spec.partition(":")[0]))[0]
  return os.path.join(cache_root(config), f"{name}-{key[:12]}"), stage


def ensure_stage(spec: str, config) -> str:
  """Trains the stage if its cached run is missing or unfinished."""
  from jft import train  # late: train imports this module

  workdir, stage = stage_workdir(spec, config)
  print(f"stage {spec}: {workdir}")
  train.run(stage, workdir)
  return workdir
