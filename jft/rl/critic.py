"""PPO's critic as a separate model initialised from the reward model.

`config.ppo.critic='reward_model'` (TRL's choice, and the default of
configs/ppo.py): the values come from a second transformer with a one-number
head, started from `config.rl.reward_model`'s weights. Its params live in
the train state under the top-level key `critic` (`state.AUX_KEYS`), so the
one jitted update trains policy and critic together, and checkpoints and
resume carry both; the policy's forward, exports and `init` loads never see
it. Why not the value head on the policy's trunk (`'shared'`): that head
starts at zero and lags, so early advantages are the raw scores, whose
per-prompt offsets (a reward model is only trained on differences) push
the policy around at random; a critic that starts as the reward model
knows those offsets from step one, and scores partial answers.
"""

from __future__ import annotations

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jft import checkpoint, init, sharding
from jft.models import transformer
from jft.peft import lora

KEY = "critic"
MODES = ("shared", "reward_model")


def enabled(config) -> bool:
  return config.objective == "ppo" and config.ppo.critic == "reward_model"


def critic_config(policy_cfg):
  """The critic's architecture: the policy's base model, a score head."""
  return dataclasses.replace(lora.base_config(policy_cfg), head="score")


def load(config, policy_cfg, mesh, rules) -> dict:
  """The reward model's float params, placed as the critic's shardings.

  The reward model must have the policy's architecture (it is trained from
  the same SFT model); LoRA reward models are merged first.
  """
  path = config.rl.reward_model
  if not path:
    raise ValueError(
      "config.ppo.critic='reward_model' starts the critic from the reward "
      "model: set config.rl.reward_model, or config.ppo.critic='shared'"
    )
  with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
    saved = transformer.config_from_dict(json.load(fh)["model"])
  params = checkpoint.load_params(path, mesh)
  if saved.peft.active:
    params = jax.tree.map(np.asarray, lora.merge(params, saved))
  cfg = critic_config(policy_cfg)
  model, dummy = transformer.Transformer(cfg), jnp.zeros((1, 8), jnp.int32)
  boxed = jax.eval_shape(
    lambda r: model.init(r, dummy)["params"], jax.random.PRNGKey(0)
  )
  init.check_tree(
    params,
    boxed,
    f"config.rl.reward_model={path!r} as PPO's critic (it must have the "
    "policy's architecture)",
  )
  dtypes = jax.tree.map(lambda x: x.dtype, nn.unbox(boxed))
  shards = sharding.param_shardings(boxed, mesh, rules)
  return jax.tree.map(
    lambda x, dt, s: jax.device_put(np.asarray(x).astype(dt), s),
    params,
    dtypes,
    shards,
  )


def values(policy_cfg, critic_params, batch) -> jax.Array:
  """The critic's value at every position [B, T] (float32, no dropout)."""
  model = transformer.Transformer(critic_config(policy_cfg))
  return model.apply(
    {"params": critic_params},
    batch["inputs"],
    batch["positions"],
    batch["segment_ids"],
  )
