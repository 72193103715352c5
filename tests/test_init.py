"""`jft.init`: `run:` stages resolved before training, in order, each
starting from the one before; the architecture of `init` weights is theirs;
the stage key follows jft's code."""

import json
import os

import jax
import numpy as np
import pytest
from conftest import tiny_config

from jft import checkpoint, init, sharding, train
from jft.data import tokenizer as tokenizers

STAGE = """
import sys
sys.path.insert(0, {tests!r})
from conftest import tiny_config
import pathlib

def get_config(arg=None):
  c = tiny_config(pathlib.Path({suite!r}), objective={objective!r},
                  total_steps=2, eval_every=0, checkpoint_every=2)
  c.init = {init!r}
  if c.init:  # the architecture comes from the earlier stage
    for k in ("preset", "d_model", "mlp_dim", "n_heads", "n_kv_heads"):
      c.model[k] = "" if k == "preset" else None
  return c
"""


def _write_stage(path, suite_dir, objective, init_spec):
  tests = os.path.dirname(os.path.abspath(__file__))
  text = STAGE.format(
    tests=tests, suite=str(suite_dir), objective=objective, init=init_spec
  )
  with open(path, "w") as fh:
    fh.write(text)
  return str(path)


def test_stage_chain_trains_in_order_from_each_other(suite_dir, tmp_path):
  a = _write_stage(tmp_path / "stage_a.py", suite_dir, "clm", "")
  b = _write_stage(tmp_path / "stage_b.py", suite_dir, "sft", f"run:{a}")
  config = tiny_config(suite_dir, objective="sft", total_steps=2)
  config.init = f"run:{b}"
  config.model.preset = ""
  for k in ("d_model", "mlp_dim", "n_heads", "n_kv_heads"):
    config.model[k] = None
  config.stage_cache = str(tmp_path / "cache")
  said, trained = [], []

  def fake_train(cfg, workdir):
    trained.append((cfg.objective, cfg.init, workdir))
    train.run(cfg, workdir)

  resolved = init.resolve_stages(
    config, fake_train, announce=said.append, spec="c.py", workdir="W"
  )
  (obj_a, init_a, dir_a), (obj_b, init_b, dir_b) = trained
  assert (obj_a, init_a, obj_b, init_b) == ("clm", "", "sft", dir_a)
  assert resolved.init == dir_b and config.init == f"run:{b}"
  assert said == [  # each stage's banner: what, from which config, where
    f"stage 1/3: pretraining ({a}) -> {dir_a}",
    f"stage 2/3: SFT ({b}) -> {dir_b}",
    "stage 3/3: SFT (c.py) -> W",
  ]
  # Stage b started from stage a's weights and tokenizer.
  with open(os.path.join(dir_b, "config.json")) as fh:
    assert json.load(fh)["init"] == dir_a
  assert (
    tokenizers.load_tokenizer_dir(dir_b).files
    == tokenizers.load_tokenizer_dir(dir_a).files
  )
  # Resolving again trains nothing (each banner says so), and a run
  # starting there gets stage b's final weights.
  trained.clear()
  said.clear()
  again = init.resolve_stages(config, fake_train, announce=said.append)
  assert again.init == dir_b
  assert trained == []
  assert said == [
    f"stage 1/3: pretraining ({a}) -> {dir_a}: reused from the cache "
    "(finished at step 2)",
    f"stage 2/3: SFT ({b}) -> {dir_b}: reused from the cache (finished at "
    "step 2)",
    "stage 3/3: SFT",
  ]
  assert not os.path.exists(os.path.join(dir_b, "checkpoints", "3"))
  mesh = sharding.make_mesh(config.mesh)
  b_params = checkpoint.load_params(dir_b, mesh)
  cfg_b = init.model_config(again, tokenizers.load_tokenizer_dir(dir_b))
  got = init.init_params(
    again, cfg_b, mesh, sharding.rules_from_config(again.mesh)
  )
  jax.tree.map(
    lambda x, y: np.testing.assert_array_equal(np.asarray(x), y), got, b_params
  )


def test_init_weights_fix_the_architecture(suite_dir, tmp_path):
  config = tiny_config(suite_dir, total_steps=1, eval_every=0)
  workdir = str(tmp_path / "a")
  train.run(config, workdir)
  later = tiny_config(suite_dir, total_steps=1)
  later.init = workdir
  tok = tokenizers.load_tokenizer_dir(workdir)
  with pytest.raises(
    ValueError, match=r"config.model.d_model=32.*architecture"
  ):
    init.model_config(later, tok)
  for k in ("d_model", "mlp_dim", "n_heads", "n_kv_heads"):
    later.model[k] = None
  later.model.remat = "full"  # numerics may change
  cfg = init.model_config(later, tok)
  assert (cfg.d_model, cfg.remat) == (32, "full")


def test_unresolved_stage_is_refused(suite_dir, tmp_path):
  config = tiny_config(suite_dir)
  config.init = "run:configs/pretrain_clm.py"
  with pytest.raises(ValueError, match="resolve_stages"):
    train.run(config, str(tmp_path / "w"))


def test_stage_key_follows_the_code(monkeypatch, tmp_path):
  from jft import config as base

  c = base.base_config()
  c.stage_cache = str(tmp_path)
  a, _ = init.stage_workdir("configs/pretrain_clm.py", c)
  monkeypatch.setattr(init, "code_version", lambda: "something else")
  assert init.stage_workdir("configs/pretrain_clm.py", c)[0] != a


def test_stage_key_follows_the_stage_before(tmp_path, monkeypatch):
  """A change to pretraining alone retrains SFT, which starts from it."""
  from jft import config as base

  c = base.base_config()
  c.stage_cache = str(tmp_path)
  sft, _ = init.stage_workdir("configs/sft.py", c)
  pre, _ = init.stage_workdir("configs/pretrain_clm.py", c)
  load = init.load_config_file

  def longer_pretraining(spec):
    cfg = load(spec)
    if spec.startswith("configs/pretrain_clm.py"):
      cfg.total_steps += 1
    return cfg

  monkeypatch.setattr(init, "load_config_file", longer_pretraining)
  assert init.stage_workdir("configs/pretrain_clm.py", c)[0] != pre
  assert init.stage_workdir("configs/sft.py", c)[0] != sft
