"""The objective interface the one trainer loop drives.

An objective owns (a) host-side conversion of JSONL records to examples and
(b) a pure loss returning sums and weights, so gradient accumulation and
multi-device reduction normalise once (token-weighted, MaxText style).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

# name -> (sum, weight); the logged value is sum / weight.
MetricSums = dict[str, tuple[jax.Array, jax.Array]]
# apply_fn(params, inputs, positions, segment_ids, *, rng, train) -> logits
ApplyFn = Callable[..., jax.Array]


class Objective:
  """Base class; subclasses set `name` and `fields` and implement `loss`."""

  name: str = ""
  fields: tuple[str, ...] = ()  # JSONL fields each record must have
  packing: bool | None = None  # None = config.data.packing decides
  token_loss: bool = True  # loss is per token: eval/perplexity is meaningful

  def __init__(self, config, tokenizer):
    self.config = config
    self.tokenizer = tokenizer

  # Counts logged at step 0 (e.g. truncated / skipped rows).
  data_stats: dict[str, float] = {}

  def make_examples(
    self, records: Sequence[Mapping[str, Any]], split: str = "train"
  ) -> list[dict]:
    raise NotImplementedError

  def loss(
    self,
    apply_fn: ApplyFn,
    params: Any,
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
    train: bool,
    ref: Any = None,
  ) -> tuple[jax.Array, jax.Array, MetricSums]:
    """Returns (loss_sum, weight, metric_sums); loss = loss_sum / weight.

    `ref` is the state's frozen reference params (see `reference_params`).
    """
    raise NotImplementedError

  def reference_params(self, params) -> Any:
    """Extra frozen params the loss needs (DPO's reference copy)."""
    del params
    return {}

  def prepare_data(
    self, train_spec: str, eval_spec: str, *, workdir, apply_fn, params
  ) -> tuple[str, str]:
    """(train_spec, eval_spec) to read; data made with the starting model
    (DPO's on-policy pairs) is written here. Default: unchanged."""
    del workdir, apply_fn, params
    return train_spec, eval_spec

  def precompute(self, examples, apply_fn, params, run_batches):
    """A pass over the examples before training (e.g. reference log-probs)."""
    del apply_fn, params, run_batches
    return examples

  def summary(self, first: dict, last: dict) -> str:
    """Text printed (and saved as summary.md) at the end of a run."""
    del first, last
    return ""

  def eval_setup(self, records) -> None:
    """Sees the held-out records (e.g. prompts to generate from)."""
    del records

  def host_eval(self, predict, params) -> dict[str, float]:
    """Extra host-side evaluation (e.g. generation accuracy); default none."""
    del predict, params
    return {}


def token_cross_entropy(
  logits: jax.Array, targets: jax.Array, weights: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Weighted token CE in float32.

  Returns (ce_sum, weight_sum, correct_sum) over all tokens.
  """
  logits = logits.astype(jnp.float32)  # [B, T, V]
  logp = jax.nn.log_softmax(logits, axis=-1)  # [B, T, V]
  tgt_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  weights = weights.astype(jnp.float32)  # [B, T]
  ce_sum = -jnp.sum(tgt_logp * weights)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return ce_sum, jnp.sum(weights), jnp.sum(correct * weights)
