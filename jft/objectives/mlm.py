"""Masked-LM (BERT-style) pretraining objective on `{"text"}` records.

Same transformer as CLM with `config.model.causal = False`; its LM head is
the MLM head. An example is `[bos] + ids + [eos]` as both inputs and targets
(no shift), weight 1 on every non-special token. Masking happens inside the
pure loss, from the rng the train step passes (`fold_in(state.rng, step)`),
so a resumed run masks exactly as the uninterrupted one; eval gets a fixed
rng and is deterministic.

Selection is per sequence (packed document): of its n eligible tokens,
`floor(mask_rate * n + u)` with `u ~ U[0, 1)` are chosen uniformly, so every
document is masked at `mask_rate` in expectation and within one token of it
always. Chosen tokens become `[MASK]` (`mask_token_rate`), a random
non-special token (`random_token_rate`) or stay unchanged (the rest).
Padding and special tokens (pad, unk, bos, eos, mask) are never chosen; the
loss is token-weighted CE over the chosen positions only.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jft.errors import ConfigError
from jft.objectives import base

DEFAULTS = dict(mask_rate=0.15, mask_token_rate=0.8, random_token_rate=0.1)


def mlm_rates(config) -> dict[str, float]:
  """`config.mlm` (see jft/config.py) over DEFAULTS, validated."""
  given = dict(config.get("mlm") or {})
  unknown = sorted(set(given) - set(DEFAULTS))
  if unknown:
    raise ConfigError(f"config.mlm: unknown keys {unknown}; known {DEFAULTS}")
  rates = {k: float(given.get(k, v)) for k, v in DEFAULTS.items()}
  if not 0.0 < rates["mask_rate"] <= 1.0:
    raise ConfigError(f"config.mlm.mask_rate must be in (0, 1]: {rates}")
  replace = rates["mask_token_rate"] + rates["random_token_rate"]
  if min(rates["mask_token_rate"], rates["random_token_rate"]) < 0 or (
    replace > 1.0
  ):
    raise ConfigError(
      "config.mlm.mask_token_rate and random_token_rate must be >= 0 and "
      f"sum to <= 1: {rates}"
    )
  return rates


def mlm_example(ids, bos_id: int, eos_id: int, special_ids) -> dict:
  """`[bos] + ids + [eos]` as inputs and targets; weight 0 on specials."""
  seq = np.asarray([bos_id, *ids, eos_id], np.int32)
  weights = (~np.isin(seq, np.asarray(special_ids))).astype(np.float32)
  return {"inputs": seq, "targets": seq.copy(), "weights": weights}


def select_positions(
  rng: jax.Array,
  eligible: jax.Array,
  segment_ids: jax.Array,
  mask_rate: float,
) -> jax.Array:
  """Bool [B, T]: `floor(mask_rate * n + u)` of each segment's n eligible.

  Eligible tokens are ranked within their segment by a random score (one
  lexsort per row, O(T log T)); those ranked below the segment's count are
  chosen. Non-eligible positions are never chosen.
  """
  b, t = eligible.shape
  k_score, k_round = jax.random.split(rng)
  score = jax.random.uniform(k_score, (b, t))  # [B, T]
  seg = jnp.where(eligible, segment_ids, t + 1)  # [B, T]; ineligible last
  order = jnp.lexsort((score, seg), axis=-1)  # [B, T]
  rank = jnp.argsort(order, axis=-1)  # [B, T] row-wide rank
  n = jax.vmap(lambda e, s: jax.ops.segment_sum(e, s, t + 2))(
    eligible.astype(jnp.int32), seg
  )  # [B, S] eligible tokens per segment
  start = jnp.cumsum(n, axis=-1) - n  # [B, S] rank of a segment's first
  u = jax.random.uniform(k_round, n.shape)  # [B, S]
  k = jnp.floor(mask_rate * n + u).astype(jnp.int32)  # [B, S]
  in_seg = rank - jnp.take_along_axis(start, seg, axis=-1)  # [B, T]
  return eligible & (in_seg < jnp.take_along_axis(k, seg, axis=-1))


def mask_tokens(
  rng: jax.Array,
  tokens: jax.Array,
  eligible: jax.Array,
  segment_ids: jax.Array,
  *,
  mask_id: int,
  random_ids: jax.Array,
  mask_rate: float,
  mask_token_rate: float,
  random_token_rate: float,
) -> tuple[jax.Array, jax.Array]:
  """(corrupted inputs [B, T], selected [B, T]); a pure function of rng."""
  k_sel, k_kind, k_tok = jax.random.split(rng, 3)
  selected = select_positions(k_sel, eligible, segment_ids, mask_rate)
  kind = jax.random.uniform(k_kind, tokens.shape)  # [B, T]
  to_mask = selected & (kind < mask_token_rate)
  to_random = (
    selected
    & (kind >= mask_token_rate)
    & (kind < mask_token_rate + random_token_rate)
  )
  random_ids = jnp.asarray(random_ids, tokens.dtype)
  pick = jax.random.randint(k_tok, tokens.shape, 0, random_ids.shape[0])
  inputs = jnp.where(to_random, random_ids[pick], tokens)  # [B, T]
  inputs = jnp.where(to_mask, jnp.asarray(mask_id, tokens.dtype), inputs)
  return inputs, selected


class MLM(base.Objective):
  """Token-weighted CE over masked positions of packed documents."""

  name = "mlm"
  fields = ("text",)
  builtin_split = "pretrain"

  def __init__(self, config, tokenizer):
    super().__init__(config, tokenizer)
    self.rates = mlm_rates(config)
    tok = tokenizer
    self.mask_id = tok.mask_id  # Raises, saying so, if there is none.
    ids = (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, self.mask_id)
    ids = {i for i in ids if i is not None and i >= 0}  # unk/bos may be None
    self.special_ids = np.asarray(sorted(ids), np.int32)
    self.random_ids = np.setdiff1d(
      np.arange(tok.vocab_size, dtype=np.int32), self.special_ids
    )
    if config.model.get("causal") is not False:
      logging.warning(
        "objective 'mlm' with a causal model: masked tokens see only their "
        "left context. Set config.model.causal=False for BERT-style MLM."
      )

  def make_examples(self, records, split="train"):
    del split  # train and eval examples are alike; eval masks with a fixed rng
    tok, special = self.tokenizer, self.special_ids
    return [
      mlm_example(tok.encode(r["text"]), tok.bos_id, tok.eos_id, special)
      for r in records
    ]

  def corrupt(self, batch, rng) -> tuple[jax.Array, jax.Array]:
    """(inputs, selected) for `batch`: the masking the loss applies."""
    tokens = batch["targets"]  # [B, T]
    eligible = (
      (batch["weights"] > 0)
      & (batch["segment_ids"] > 0)
      & ~jnp.isin(tokens, jnp.asarray(self.special_ids))
    )  # [B, T]
    return mask_tokens(
      rng,
      tokens,
      eligible,
      batch["segment_ids"],
      mask_id=self.mask_id,
      random_ids=self.random_ids,
      **self.rates,
    )

  def loss(self, apply_fn, params, batch, rng, train, ref=None):
    del ref  # MLM has no reference model
    chex.assert_rank(batch["inputs"], 2)
    mask_rng, model_rng = jax.random.split(rng)
    inputs, selected = self.corrupt(batch, mask_rng)  # [B, T]
    scores = apply_fn(
      params,
      inputs,
      batch["positions"],
      batch["segment_ids"],
      rng=model_rng,
      train=train,
      targets=batch["targets"],
    )  # TokenScores [B, T]
    weights = batch["weights"] * selected  # [B, T]
    ce, w, correct = base.scores_cross_entropy(scores, weights)
    return ce, w, {"masked_accuracy": (correct, w)}
