"""GRPO (Shao et al. 2024) with verifiable rewards, and its honest control.

The rollout source (`jft.rl.rollouts.GRPORollouts`) samples
`grpo.num_generations` completions per prompt, scores them with the reward
functions (`jft.rl.rewards`; the built-in suite's checker by default), and
gives every completion its group-normalised advantage plus the old and
reference log-probs. This objective is the pure update: the clipped
token-level ratio times the advantage, `beta` times the k3 KL estimate to
the reference (no reference at all when `beta` is 0), aggregated as
`grpo.loss_type` says (`grpo`, `dr_grpo`, `dapo`; `jft.losses.grpo_loss`).

`grpo.control='sft_on_correct'` keeps everything (prompts, samples, steps,
optimizer) but trains NLL on the completions whose reward is positive: SFT
on the rollouts' correct answers (rejection-sampling fine-tuning). It is
the control the README compares GRPO with.
"""

from __future__ import annotations

import jax.numpy as jnp

from jft import losses
from jft.errors import ConfigError
from jft.objectives import base

CONTROLS = ("", "sft_on_correct")
SCALE_REWARDS = ("auto", "true", "false")  # auto: not for dr_grpo


class GRPO(base.Objective):
  name = "grpo"
  packing = False
  token_loss = False
  source = "rollouts"
  builtin_split = "sft"  # the suite's prompts (with their tasks)
  evaluators = ("task_accuracy",)

  def __init__(self, config, tokenizer):
    super().__init__(config, tokenizer)
    g = config.grpo
    if g.loss_type not in losses.GRPO_AGGS:
      raise ConfigError(
        f"config.grpo.loss_type: unknown {g.loss_type!r}; expected one of "
        f"{losses.GRPO_AGGS}"
      )
    if g.control not in CONTROLS:
      raise ConfigError(
        f"config.grpo.control: unknown {g.control!r}; expected one of "
        f"{CONTROLS}"
      )
    if g.scale_rewards not in SCALE_REWARDS:
      raise ConfigError(
        f"config.grpo.scale_rewards must be one of {SCALE_REWARDS}"
      )
    if g.num_generations < 2 and not g.control:
      raise ConfigError(
        "config.grpo.num_generations must be >= 2: advantages compare each "
        "completion with its group"
      )
    needs_ref = g.beta != 0 and not g.control
    self.ref = base.Reference.for_run(config, needs_ref)

  def reference_params(self, params, trainable):
    return self.ref.stored(params, trainable)

  def reference_tree(self, params, stored):
    return self.ref.tree(params, stored)

  def loss(self, apply_fn, params, batch, rng, train, ref=None):
    g = self.config.grpo
    logits = apply_fn(
      params,
      batch["inputs"],
      batch["positions"],
      batch["segment_ids"],
      rng=rng,
      train=train,
    )  # [B, T, V]
    mask = batch["weights"]  # completion tokens
    if g.control == "sft_on_correct":  # plain NLL: untempered logits
      logp = losses.token_logps(logits, batch["targets"])  # [B, T]
      keep = mask * (batch["scores"] > 0)
      n = jnp.sum(keep)
      return -jnp.sum(logp * keep), n, {"control/kept_tokens": (n, 1.0)}
    logits = losses.tempered(logits, self.config.rl.temperature)
    logp = losses.token_logps(logits, batch["targets"])  # [B, T]
    _, metrics = losses.grpo_loss(
      logp,
      batch["old_logp"],
      batch.get("ref_logp"),
      batch["advantages"][:, 0],
      mask,
      eps_low=g.eps_low,
      eps_high=g.eps_high,
      beta=g.beta,
      agg=g.loss_type,
      max_completion_length=self.config.rl.max_new_tokens,
    )
    loss_sum, weight = metrics.pop("loss")
    return loss_sum, weight, metrics
