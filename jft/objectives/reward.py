"""Reward model: a scalar score per sequence, trained on preference pairs.

Rows are DPO's (`{"prompt","chosen","rejected"}`, strings or
conversations; parsed and tokenized by `dpo.split_pair` / `dpo.pair_ids`),
plus an optional numeric `"margin"` (TRL RewardTrainer's column: how much
better chosen is). The model must have the score head
(`config.model.head='score'`): its forward returns one float32 number per
position [B, T], and a sequence's reward is the number at its last token
(the eos, or the chat template's end-of-turn), which has seen all of it.

Per pair, with r_c / r_r the chosen / rejected rewards and m the margin
(0 when absent), Bradley-Terry as TRL (`jft.losses.bradley_terry`):

  loss = -log sigmoid(r_c - r_r - m) + center_coef * (r_c + r_r)^2

`center_coef` is `config.reward.center_rewards_coefficient` (TRL's name;
Eisenstein et al. 2023): it pulls rewards towards zero mean, which the
pairwise loss alone leaves free. Metrics use TRL's names: `accuracy`
(r_c > r_r), `margin` (mean r_c - r_r), `mean_reward` (mean of all
rewards), plus `chosen_reward` / `rejected_reward`.

An example holds both sequences of a pair, unshifted (the score at the
last token needs no target), right-padded to one length with the pad id:

  inputs, rej_inputs    chosen / rejected token ids (bos ... eos)
  weights, rej_weights  1.0 on each sequence's tokens, 0.0 on padding (an
                        attention mask): the loss reads the score at the
                        last token with weight 1
  margin                the pair's margin at the chosen sequence's last
                        token, 0.0 elsewhere (read where r_c is read)
  targets               a copy of `inputs`; the pipeline contract wants the
                        field, the loss never reads it

Both sequences go through one batched forward [2B, T]. Chosen and rejected
share the row's positions and segment ids; attention is causal, so what
follows a sequence's last token (the other's extra length, padding) never
reaches its score.
"""

from __future__ import annotations

import math
import numbers

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jft.data.jsonl import DataError
from jft.errors import ConfigError
from jft.losses import bradley_terry
from jft.objectives import base, dpo, sft

TRUNCATION = sft.TRUNCATION
ON_INVALID = ("error", "skip")


def margin_of(record) -> float:
  """The row's `"margin"` (0.0 when absent or null), or a DataError naming
  file:line."""
  value = record.get("margin")
  if value is None:
    return 0.0
  where = getattr(record, "where", "?")
  if (
    isinstance(value, bool)
    or not isinstance(value, numbers.Real)
    or not math.isfinite(value)
  ):
    raise DataError(
      f"{where}: field 'margin' must be a finite number, got {value!r}"
    )
  return float(value)


def pair_example(prompt_ids, chosen_ids, rejected_ids, margin, pad_id):
  """One pair as a pipeline example (fields in the module docstring)."""
  c = np.asarray(list(prompt_ids) + list(chosen_ids), np.int32)
  r = np.asarray(list(prompt_ids) + list(rejected_ids), np.int32)
  length = max(len(c), len(r))

  def pad(ids):
    return np.pad(ids, (0, length - len(ids)), constant_values=pad_id)

  def mask(ids):
    return (np.arange(length) < len(ids)).astype(np.float32)

  m = np.zeros(length, np.float32)
  m[len(c) - 1] = margin
  return {
    "inputs": pad(c),
    "targets": pad(c),
    "weights": mask(c),
    "rej_inputs": pad(r),
    "rej_weights": mask(r),
    "margin": m,
  }


def last_index(weights) -> jax.Array:
  """Index of each row's last token with weight > 0 [N] (0 for an
  all-padding row), as transformers' sequence classifiers find the last
  non-pad token."""
  t = jnp.arange(weights.shape[-1])
  return jnp.argmax(jnp.where(weights > 0, t, -1), axis=-1)


def at(x, index) -> jax.Array:
  """x[n, index[n]] for x [N, T]."""
  return jnp.take_along_axis(x, index[:, None], axis=-1)[:, 0]


class RewardModel(base.Objective):
  """Bradley-Terry reward modelling over preference pairs (TRL's
  RewardTrainer): see the module docstring."""

  name = "reward"
  fields = ()
  builtin_split = "pref"
  packing = False  # one pair a row: chosen and rejected stay together
  token_loss = False
  summary_rows = (
    ("pair accuracy (r_chosen > r_rejected)", "eval/accuracy"),
    ("reward margin (mean r_chosen - r_rejected)", "eval/margin"),
    ("mean reward", "eval/mean_reward"),
  )

  def __init__(self, config, tokenizer):
    super().__init__(config, tokenizer)
    head = config.model.head
    if head is not None and head != "score":
      raise ConfigError(
        f"config.model.head={head!r}: objective 'reward' trains a reward "
        "model, which needs config.model.head='score' (one score per "
        "sequence; see configs/reward.py)"
      )
    r = config.reward
    if r.truncation not in TRUNCATION:
      raise ConfigError(
        f"config.reward.truncation: unknown {r.truncation!r}; expected one "
        f"of {TRUNCATION}"
      )
    if r.on_invalid not in ON_INVALID:
      raise ConfigError(
        f"config.reward.on_invalid: unknown {r.on_invalid!r}; expected one "
        f"of {ON_INVALID}"
      )
    self.template = sft.chat_format(config.sft, tokenizer)

  # Host side -------------------------------------------------------------
  def make_examples(self, records, split="train"):
    """Pairs tokenized as DPO's; a pair longer than `seq_len` tokens loses
    prompt tokens from the left ('truncate_prompt') or is skipped."""
    cfg, pad = self.config.reward, self.tokenizer.pad_id
    return dpo.fit_pairs(
      records,
      self.tokenizer,
      self.template,
      limit=self.config.seq_len,  # unshifted: the whole sequence is input
      limit_name="seq_len",
      truncation=cfg.truncation,
      on_invalid=cfg.on_invalid,
      where=f"reward {split}",
      stats=self.data_stats,
      split=split,
      parse=margin_of,
      build=lambda rec, p, c, j, margin: pair_example(p, c, j, margin, pad),
    )

  # Pure side -------------------------------------------------------------
  def rewards(self, apply_fn, params, batch, rng=None, train=False):
    """(r_chosen [B], r_rejected [B]): each sequence's score at its last
    token, chosen and rejected through one batched forward."""
    chex.assert_rank(batch["inputs"], 2)
    two = lambda a, b: jnp.concatenate([a, b], axis=0)  # [2B, T]
    scores = apply_fn(
      params,
      two(batch["inputs"], batch["rej_inputs"]),
      two(batch["positions"], batch["positions"]),
      two(batch["segment_ids"], batch["segment_ids"]),
      rng=rng,
      train=train,
    )  # [2B, T] with the score head
    head = getattr(getattr(apply_fn, "config", None), "head", None)
    if head not in (None, "score") or getattr(scores, "ndim", None) != 2:
      shape = getattr(scores, "shape", type(scores).__name__)
      raise ConfigError(
        f"objective 'reward' needs a reward model, config.model.head="
        f"'score' (scores [B, T]); this model has head={head!r} and "
        f"returns {shape}"
      )
    w = two(batch["weights"], batch["rej_weights"])  # [2B, T]
    r = at(scores.astype(jnp.float32), last_index(w))  # [2B]
    b = batch["inputs"].shape[0]
    return r[:b], r[b:]

  def loss(self, apply_fn, params, batch, rng, train, ref=None):
    del ref
    rc, rr = self.rewards(apply_fn, params, batch, rng, train)
    margin = at(batch["margin"], last_index(batch["weights"]))  # [B]
    losses = bradley_terry(
      rc, rr, margin, self.config.reward.center_rewards_coefficient
    )
    # all-padding rows (a padded last batch) carry no pair
    valid = (jnp.sum(batch["weights"], axis=-1) > 0).astype(jnp.float32)
    n = jnp.sum(valid)

    def m(x):
      return (jnp.sum(x * valid), n)

    return (
      jnp.sum(losses * valid),
      n,
      {
        "accuracy": m((rc > rr).astype(jnp.float32)),
        "margin": m(rc - rr),
        "mean_reward": m((rc + rr) / 2),
        "chosen_reward": m(rc),
        "rejected_reward": m(rr),
      },
    )
