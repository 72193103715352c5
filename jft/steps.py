"""Train and eval step factories: pure functions of pytrees.

`make_train_step` returns `train_step(state, batch) -> (state, metrics)`.
Gradient accumulation runs micro-batches through `lax.scan` and sums the
gradients of *loss sums*; dividing once by the total weight makes k
micro-batches exactly one big batch, whatever their token counts.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

from jft.objectives.base import MetricSums
from jft.state import TrainState, merge_params

FINITE = "finite"  # the train step's flag: loss, grad norm, params finite


def all_finite(tree) -> jax.Array:
  """One bool: every float in `tree` is finite (a save needs all)."""
  leaves = [
    jnp.all(jnp.isfinite(x))
    for x in jax.tree.leaves(tree)
    if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _add_metrics(a: MetricSums, b: MetricSums) -> MetricSums:
  return {k: (a[k][0] + b[k][0], a[k][1] + b[k][1]) for k in a}


def _finalise(sums: MetricSums, prefix: str) -> dict[str, jax.Array]:
  return {
    f"{prefix}/{k}": s / jnp.maximum(w, 1e-12) for k, (s, w) in sums.items()
  }


def split_microbatches(batch: Mapping, k: int) -> dict:
  """[B, ...] -> [k, B/k, ...], micro-batch j taking rows j, j+k, ...

  Strided rows keep every micro-batch spread evenly over the devices that
  hold contiguous row blocks of the global batch.
  """

  def split(x):
    if x.shape[0] % k:
      raise ValueError(
        f"batch of {x.shape[0]} rows does not split into "
        f"config.grad_accum_steps={k} micro-batches"
      )
    x = x.reshape((x.shape[0] // k, k) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  return jax.tree.map(split, dict(batch))


def make_train_step(objective, apply_fn, optimizer, schedule, grad_accum_steps):
  """Builds the pure train step for `objective` (see module docstring)."""

  def grads_of(trainable, frozen, ref, batch, rng):
    def loss_fn(tr):
      params = merge_params(tr, frozen)
      loss_sum, weight, mets = objective.loss(
        apply_fn, params, batch, rng, train=True, ref=ref
      )
      return loss_sum, (weight, mets)

    (loss_sum, (weight, mets)), grads = jax.value_and_grad(
      loss_fn, has_aux=True
    )(trainable)
    return grads, loss_sum, weight, mets

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    if grad_accum_steps == 1:
      grads, loss_sum, weight, mets = grads_of(
        state.trainable, state.frozen, state.ref, batch, rng
      )
    else:
      micro = split_microbatches(batch, grad_accum_steps)
      first = jax.tree.map(lambda x: x[0], micro)
      shapes = jax.eval_shape(
        grads_of, state.trainable, state.frozen, state.ref, first, rng
      )
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

      def body(carry, xs):
        mb, i = xs
        out = grads_of(
          state.trainable,
          state.frozen,
          state.ref,
          mb,
          jax.random.fold_in(rng, i),
        )
        g, ls, w, m = out
        cg, cls, cw, cm = carry
        return (
          jax.tree.map(jnp.add, cg, g),
          cls + ls,
          cw + w,
          _add_metrics(cm, m),
        ), None

      idx = jnp.arange(grad_accum_steps)
      (grads, loss_sum, weight, mets), _ = jax.lax.scan(
        body, zeros, (micro, idx)
      )

    denom = jnp.maximum(weight, 1e-12)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = optimizer.update(
      grads, state.opt_state, state.trainable
    )
    trainable = optax.apply_updates(state.trainable, updates)
    loss, grad_norm = loss_sum / denom, optax.tree.norm(grads)
    metrics = {
      "train/loss": loss,
      "train/lr": schedule(state.step),
      "train/grad_norm": grad_norm,
      "train/weight": weight,
      # Not logged: whether this step may be saved (train.py checks it).
      FINITE: all_finite((loss, grad_norm, trainable)),
      **_finalise(mets, "train"),
    }
    new_state = state.replace(
      step=state.step + 1, trainable=trainable, opt_state=opt_state
    )
    return new_state, metrics

  return train_step


def make_eval_step(objective, apply_fn):
  """`eval_step(params, ref, batch) -> metric sums` (summed on the host)."""

  def eval_step(params, ref, batch):
    loss_sum, weight, mets = objective.loss(
      apply_fn, params, batch, jax.random.PRNGKey(0), train=False, ref=ref
    )
    return {"loss": (loss_sum, weight), **mets}

  return eval_step
