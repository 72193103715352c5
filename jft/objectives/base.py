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
from flax import traverse_util

from jft.models import head_loss
from jft.peft import lora
from jft.state import flat_paths, model_params

# name -> (sum, weight); the logged value is sum / weight.
MetricSums = dict[str, tuple[jax.Array, jax.Array]]
# apply_fn(params, inputs, positions, segment_ids, *, rng, train) -> logits
ApplyFn = Callable[..., jax.Array]


class Objective:
  """Base class; subclasses set `name` and `fields` and implement `loss`.

  An objective is host parsing (`make_examples`) plus a pure `loss`, and
  says as data what else a run needs: `source` ('examples': JSONL files;
  'rollouts': online RL), `builtin_split` (the built-in data), the
  `evaluators` to run and the `summary_rows` of the before/after table.
  Data making and evaluation are the plug-ins' (`jft.data.feed`,
  `jft.evaluators`), never the objective's.
  """

  name: str = ""
  fields: tuple[str, ...] = ()  # JSONL fields each record must have
  packing: bool | None = None  # None = config.data.packing decides
  token_loss: bool = True  # loss is per token: eval/perplexity is meaningful
  source: str = "examples"  # 'examples' | 'rollouts'
  builtin_split: str = "pretrain"  # the built-in suite's files it reads
  evaluators: tuple[str, ...] = ()  # names in jft.evaluators
  summary_rows: tuple[tuple[str, str], ...] = ()  # (label, metric key)
  # The example fields `precompute` fills (cached on disk by
  # `jft.data.refcache`); () = it adds nothing.
  precomputed_fields: tuple[str, ...] = ()
  # Rows hold this many times `seq_len` tokens (2: packed preference pairs,
  # a row with room for both sequences of the longest pair).
  seq_len_factor: int = 1

  def __init__(self, config, tokenizer):
    self.config = config
    self.tokenizer = tokenizer
    self.data_stats: dict[str, float] = {}  # counts logged at step 0

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

  def reference_params(self, params, trainable) -> Any:
    """Extra frozen params the loss needs (a reference copy); default none.

    `trainable` is the subtree that will train (the freeze table's split).
    """
    del params, trainable
    return {}

  def precompute(self, examples, apply_fn, params, run_batches):
    """A pass over the examples before training (e.g. reference log-probs)."""
    del apply_fn, params, run_batches
    return examples


class Reference:
  """The frozen model a KL-regularised objective compares against.

  mode 'copy': a frozen copy of the starting params in the train state
  (full fine-tuning); 'adapters_off': the same forward with every LoRA
  `lora_b` zeroed (no copy), plus a frozen copy of any non-adapter leaf the
  freeze table trains, so the reference never moves with training; 'none':
  no reference (reference-free losses, or a KL weight of 0).
  """

  def __init__(self, mode: str):
    if mode not in ("copy", "adapters_off", "none"):
      raise ValueError(f"unknown reference mode {mode!r}")
    self.mode = mode

  @classmethod
  def for_run(cls, config, needed: bool = True) -> Reference:
    if not needed:
      return cls("none")
    return cls("adapters_off" if config.lora.rank > 0 else "copy")

  def stored(self, params, trainable) -> dict:
    """What the train state keeps (`TrainState.ref`)."""
    if self.mode == "copy":
      return jax.tree.map(jnp.copy, model_params(params))
    if self.mode == "adapters_off":
      moving = {
        p: jnp.copy(v)
        for p, v in flat_paths(model_params(trainable)).items()
        if p.rsplit("/", 1)[-1] not in lora.LORA_LEAVES
      }
      return traverse_util.unflatten_dict(moving, sep="/")
    return {}

  def tree(self, params, stored):
    """The reference's params for a forward (None without a reference)."""
    if self.mode == "none":
      return None
    if self.mode == "copy":
      return stored
    flat = flat_paths(model_params(params))
    flat.update(flat_paths(stored))  # the starting values of moving leaves
    return lora.zero_adapters(traverse_util.unflatten_dict(flat, sep="/"))


def token_cross_entropy(
  logits: jax.Array, targets: jax.Array, weights: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Weighted token CE in float32, from logits [B, T, V].

  Returns (ce_sum, weight_sum, correct_sum) over all tokens.
  """
  scores = head_loss.plain_token_logps(logits, targets)
  return scores_cross_entropy(scores, weights)


def scores_cross_entropy(
  scores: head_loss.TokenScores, weights: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`token_cross_entropy` from the model's TokenScores (a forward given
  `targets`): (ce_sum, weight_sum, correct_sum)."""
  weights = weights.astype(jnp.float32)  # [B, T]
  ce_sum = -jnp.sum(scores.logp * weights)
  correct = scores.correct.astype(jnp.float32)  # [B, T]
  return ce_sum, jnp.sum(weights), jnp.sum(correct * weights)
