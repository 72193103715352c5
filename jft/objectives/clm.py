"""Causal-LM (next-token) pretraining objective on `{"text"}` records."""

from __future__ import annotations

import chex

from jft.data import pipeline
from jft.objectives import base


class CLM(base.Objective):
  """Token-weighted next-token cross-entropy over packed documents."""

  name = "clm"
  fields = ("text",)

  def make_examples(self, records, split="train"):
    tok = self.tokenizer
    return [
      pipeline.clm_example(r["text"], tok.encode, tok.bos_prefix, tok.eos_id)
      for r in records
    ]

  def loss(self, apply_fn, params, batch, rng, train, ref=None):
    chex.assert_rank(batch["inputs"], 2)
    scores = apply_fn(
      params,
      batch["inputs"],
      batch["positions"],
      batch["segment_ids"],
      rng=rng,
      train=train,
      targets=batch["targets"],
    )  # TokenScores [B, T]: no [B, T, V] logits with model.logits_chunk
    ce, w, correct = base.scores_cross_entropy(scores, batch["weights"])
    return ce, w, {"accuracy": (correct, w)}
