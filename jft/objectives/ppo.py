"""PPO (Schulman et al. 2017) as RLHF does it (Ziegler et al. 2019; TRL).

The critic (`ppo.critic`):
  'reward_model' (configs/ppo.py; TRL's choice): a separate model started
    from the reward model's weights (`jft.rl.critic`), trained in the same
    update. It knows from step one what the reward model thinks of each
    prompt and of partial answers.
  'shared': a value head on the policy's own trunk (`model.head =
    'lm+value'`, started at zero): one forward, one [D, 1] kernel, no
    second model; but the head lags, and on the built-in suite PPO with it
    lowered task accuracy (README).

The rollout source (`jft.rl.rollouts.PPORollouts`) samples completions,
scores them (a reward model by default), and stores the old log-probs,
values, advantages (GAE over the completion of per-token rewards: the KL
penalty to the reference, plus the score at the last token; whitened) and
returns. This objective is the pure update on a minibatch of them: the
clipped surrogate plus `vf_coef` times the clipped value loss, on completion
tokens only. The reference is the frozen starting model (LoRA: adapters
off). Metrics use TRL's names.
"""

from __future__ import annotations

import jax.numpy as jnp

from jft import losses
from jft.errors import ConfigError
from jft.models import transformer
from jft.objectives import base
from jft.rl import critic


class PPO(base.Objective):
  name = "ppo"
  packing = False
  token_loss = False
  source = "rollouts"
  builtin_split = "sft"  # the suite's prompts (with their tasks)
  evaluators = ("task_accuracy",)
  summary_rows = ()

  def __init__(self, config, tokenizer):
    super().__init__(config, tokenizer)
    mode = config.ppo.critic
    if mode not in critic.MODES:
      raise ConfigError(
        f"config.ppo.critic: unknown {mode!r}; expected one of {critic.MODES}"
      )
    head = "lm+value" if mode == "shared" else "lm"
    if config.model.head != head:
      raise ConfigError(
        f"config.ppo.critic={mode!r} needs config.model.head={head!r} (got "
        f"{config.model.head!r})"
      )
    self.ref = base.Reference.for_run(config)

  def reference_params(self, params, trainable):
    return self.ref.stored(params, trainable)

  def reference_tree(self, params, stored):
    """The reference model's params (read by the rollout source)."""
    return self.ref.tree(params, stored)

  def values(self, apply_fn, params, batch, out) -> jnp.ndarray:
    """The critic's values [B, T]; `out` is the policy's forward output."""
    if self.config.ppo.critic == "shared":
      return out[1]
    return critic.values(apply_fn.config, params[critic.KEY], batch)

  def loss(self, apply_fn, params, batch, rng, train, ref=None):
    p = self.config.ppo
    out = apply_fn(
      params,
      batch["inputs"],
      batch["positions"],
      batch["segment_ids"],
      rng=rng,
      train=train,
    )
    logits = losses.tempered(  # [B, T, V], as sampled
      transformer.logits_of(out), self.config.rl.temperature
    )
    values = self.values(apply_fn, params, batch, out)  # [B, T]
    mask = batch["weights"]  # completion tokens
    logp = losses.token_logps(logits, batch["targets"])  # [B, T]
    pg_sum, n, pm = losses.ppo_policy_loss(
      logp, batch["old_logp"], batch["advantages"], mask, p.clip
    )
    vf_sum, _, vclip = losses.ppo_value_loss(
      values, batch["old_values"], batch["returns"], mask, p.vf_clip
    )
    entropy = jnp.sum(losses.token_entropy(logits) * mask)
    ratio = jnp.exp(logp - batch["old_logp"]) * mask
    return (
      pg_sum + p.vf_coef * vf_sum,
      n,
      {
        "loss/policy_avg": (pg_sum, n),
        "loss/value_avg": (vf_sum, n),
        "policy/approxkl_avg": (pm["approxkl_sum"], n),
        "policy/clipfrac_avg": (pm["clipfrac_sum"], n),
        "val/clipfrac_avg": (vclip, n),
        "policy/entropy_avg": (entropy, n),
        "val/ratio": (jnp.sum(ratio), n),
      },
    )
