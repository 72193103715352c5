"""PPO (Schulman et al. 2017) as RLHF does it (Ziegler et al. 2019; TRL).

The policy carries its value head on its own trunk (`model.head =
'lm+value'`): one forward gives the token logits and a value per position,
and the critic costs one [D, 1] kernel instead of a second model. (TRL
builds a separate critic from the reward model; on a small CPU budget the
shared trunk halves the compute, at the price of coupling the value and
policy gradients, which `ppo.vf_coef` weighs.)

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
from jft.objectives import base


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
    if config.model.head != "lm+value":
      raise ValueError(
        "objective 'ppo' needs a value head: set config.model.head="
        f"'lm+value' (got {config.model.head!r})"
      )
    self.ref = base.Reference.for_run(config)

  def reference_params(self, params, trainable):
    return self.ref.stored(params, trainable)

  def reference_tree(self, params, stored):
    """The reference model's params (read by the rollout source)."""
    return self.ref.tree(params, stored)

  def loss(self, apply_fn, params, batch, rng, train, ref=None):
    p = self.config.ppo
    logits, values = apply_fn(
      params,
      batch["inputs"],
      batch["positions"],
      batch["segment_ids"],
      rng=rng,
      train=train,
    )  # [B, T, V], [B, T]
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
