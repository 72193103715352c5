"""Train state pytree and the trainable/frozen parameter split.

The split is an ordered `(regex, label)` table (first full match wins, every
leaf must match) so freezing is data in the config, never a code branch.
Only `trainable` is differentiated and carries optimizer state.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
from flax import traverse_util

Params = Any
TRAINABLE, FROZEN = "trainable", "frozen"


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # [] int32
  trainable: Params
  frozen: Params
  opt_state: Any
  rng: jax.Array  # [2] uint32 key data
  ref: Params = flax.struct.field(default_factory=dict)  # frozen, no opt

  @property
  def params(self) -> Params:
    return merge_params(self.trainable, self.frozen)


def flat_paths(tree: Mapping) -> dict[str, Any]:
  """Flattens a nested dict to `{'a/b/c': leaf}`."""
  return traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def label_params(
  params: Mapping, table: Sequence[tuple[str, str]]
) -> dict[str, str]:
  """Maps each leaf path to the label of the first regex that fully matches.

  Raises a ValueError that lists every unmatched path: a silently unmatched
  leaf would train (or freeze) weights the user did not mean to.
  """
  compiled = [(re.compile(rx), label) for rx, label in table]
  labels, unmatched = {}, []
  for path in flat_paths(params):
    for rx, label in compiled:
      if rx.fullmatch(path):
        labels[path] = label
        break
    else:
      unmatched.append(path)
  if unmatched:
    raise ValueError(
      f"config.freeze: no (regex, label) rule matches parameter(s) "
      f"{unmatched}; rules were {list(table)}"
    )
  return labels


def split_params(
  params: Mapping, table: Sequence[tuple[str, str]]
) -> tuple[dict, dict]:
  """Splits `params` into (trainable, frozen) nested dicts by the table."""
  labels = label_params(params, table)
  bad = {lb for lb in labels.values() if lb not in (TRAINABLE, FROZEN)}
  if bad:
    raise ValueError(
      f"config.freeze: labels must be 'trainable' or 'frozen', got {bad}"
    )
  flat = flat_paths(params)
  parts = {TRAINABLE: {}, FROZEN: {}}
  for path, leaf in flat.items():
    parts[labels[path]][path] = leaf
  return (
    traverse_util.unflatten_dict(parts[TRAINABLE], sep="/"),
    traverse_util.unflatten_dict(parts[FROZEN], sep="/"),
  )


def merge_params(*trees: Mapping) -> dict:
  """Deep-merges disjoint nested dicts (inverse of `split_params`)."""
  flat = {}
  for tree in trees:
    for path, leaf in flat_paths(tree).items():
      if path in flat:
        raise ValueError(f"parameter {path!r} is in more than one subtree")
      flat[path] = leaf
  return traverse_util.unflatten_dict(flat, sep="/")


# Top-level keys of the params tree that hold another model trained along
# with the policy (PPO's critic, `jft.rl.critic`): trained, checkpointed
# and resumed with it, but never part of the model that is applied,
# exported or loaded as `init`.
AUX_KEYS = ("critic",)


def model_params(params: Mapping) -> dict:
  """`params` without the auxiliary models (`AUX_KEYS`)."""
  return {k: v for k, v in params.items() if k not in AUX_KEYS}
