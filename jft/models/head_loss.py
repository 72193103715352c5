"""The LM head fused with log-softmax: target log-probs without [B, T, V].

`chunked_token_logps(x, w, targets)` is `log_softmax(x @ w)[targets]` (and
whether each target is the argmax) for final hidden states x [B, T, D], with
the logits made and dropped one chunk of positions at a time. Its custom VJP
recomputes each chunk's logits in the backward pass and forms
`g * (onehot - softmax)` there, accumulating dW and writing dx per chunk, so
neither the float32 logits nor their gradient exist for the whole batch at
once (the plain path keeps [B, T, V] logits, log-probs and a zero-filled
scatter for the gradient). What it supports, as the plain path in
`transformer.Transformer` does:

- untied heads (w [D, V], the `lm_head` Linear's kernel, float or 4-bit
  dequantized) and tied ones (w = the embedding [V, D], `transposed`);
- Gemma 2/3's final soft-capping `cap * tanh(z / cap)` (`softcap`);
- any use of the per-token log-probs: weights, masks, sums per row (DPO)
  are applied by the caller and reach the backward as the cotangent.

Numerics: logits accumulate in float32 (`preferred_element_type`), all
softmax math is float32, and the log-prob is computed with the same
operations as `jax.nn.log_softmax` (shift by the max, subtract the log of
the summed exponentials), so in float32 it equals the plain path to
rounding. The backward's dots accumulate in float32 and run in the kernel's
dtype (`grad_dtype`, see `chunked_token_logps`). Chunks are taken along T
with every row in each (`chunk` target tokens: `max(1, chunk // B)`
positions of each row), so rows stay sharded over the batch mesh axes as
the rest of the model has them.
"""

from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
from jax import lax

from jft.models.matmul import canonical_transpose, dot


@flax.struct.dataclass
class TokenScores:
  """What a forward given `targets` returns instead of logits.

  logp: [B, T] float32 log-probability of each target token.
  correct: [B, T] bool, whether the target is the argmax (the first
    maximal logit, as `jnp.argmax`).
  """

  logp: jax.Array
  correct: jax.Array


def plain_token_logps(logits: jax.Array, targets: jax.Array) -> TokenScores:
  """The reference path: full float32 log-softmax, then the targets."""
  logits = logits.astype(jnp.float32)  # [B, T, V]
  logp = jax.nn.log_softmax(logits, axis=-1)  # [B, T, V]
  tgt = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return TokenScores(tgt, jnp.argmax(logits, axis=-1) == targets)


def _logits(x, w, softcap, transposed):
  """x [R, D] -> (float32 logits [R, V], tanh of the capped ones or None)."""
  z = dot(x, w, jnp.float32, transpose_b=transposed)  # [R, V]
  if not softcap:
    return z, None
  t = jnp.tanh(z / softcap)  # [R, V]
  return t * softcap, t


def _chunk_fwd(x, w, tgt, softcap, transposed):
  """One chunk: x [R, D], tgt [R] -> logp, correct, max, log-sum-exp [R]."""
  z, _ = _logits(x, w, softcap, transposed)  # [R, V]
  m = jnp.max(z, axis=-1, keepdims=True)  # [R, 1]
  shifted = z - m  # [R, V]
  lse = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))  # [R]
  picked = jnp.take_along_axis(shifted, tgt[:, None], axis=-1)[:, 0]  # [R]
  correct = jnp.argmax(z, axis=-1) == tgt  # [R]
  return picked - lse, correct, m[:, 0], lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _fused(xs, w, tgts, softcap, transposed, w_grad, grad_dtype):
  """xs [C, R, D], tgts [C, R] -> (logp [C, R] f32, correct [C, R] bool)."""
  out, _ = _fused_fwd(xs, w, tgts, softcap, transposed, w_grad, grad_dtype)
  return out


def _fused_fwd(xs, w, tgts, softcap, transposed, w_grad, grad_dtype):
  del w_grad, grad_dtype

  def body(args):
    return _chunk_fwd(*args[:2], args[2], softcap, transposed)

  logp, correct, m, lse = lax.map(
    lambda a: body((a[0], w, a[1])), (xs, tgts)
  )  # [C, R] each
  return (logp, correct), (xs, w, tgts, m, lse)


def _fused_bwd(softcap, transposed, w_grad, grad_dtype, res, g):
  xs, w, tgts, m, lse = res
  g_logp = g[0]  # [C, R]; `correct` has no gradient
  d, v = xs.shape[-1], (w.shape[0] if transposed else w.shape[1])
  mm_dtype = jnp.dtype(grad_dtype or jnp.float32)

  def body(dw_t, chunk):
    x, tgt, gc, mc, lc = chunk  # [R, D], [R], [R], [R], [R]
    z, t = _logits(x, w, softcap, transposed)  # [R, V]
    p = jnp.exp((z - mc[:, None]) - lc[:, None])  # [R, V] softmax
    onehot = lax.broadcasted_iota(jnp.int32, z.shape, 1) == tgt[:, None]
    dz = gc[:, None] * (onehot.astype(jnp.float32) - p)  # [R, V]
    if softcap:
      dz = dz * (1.0 - t * t)  # d(cap * tanh(u / cap)) / du
    dz = dz.astype(mm_dtype)
    dx = dot(dz, w, x.dtype, transpose_b=not transposed)  # [R, D]
    if w_grad:
      dw_t = dw_t + dot(canonical_transpose(x), dz, jnp.float32)  # [D, V]
    return dw_t, dx

  dw_t = jnp.zeros((d, v) if w_grad else (), jnp.float32)
  dw_t, dxs = lax.scan(body, dw_t, (xs, tgts, g_logp, m, lse))
  if not w_grad:
    return dxs, None, None
  dw = dw_t.T if transposed else dw_t  # tied: [D, V] -> [V, D], once
  return dxs, dw.astype(w.dtype), None


_fused.defvjp(_fused_fwd, _fused_bwd)


def chunked_token_logps(
  x: jax.Array,
  w: jax.Array,
  targets: jax.Array,
  *,
  chunk: int,
  softcap: float | None = None,
  transposed: bool = False,
  w_grad: bool = True,
  grad_dtype=None,
) -> TokenScores:
  """Target log-probs of `x @ w` without [B, T, V] logits (module doc).

  x: [B, T, D] final hidden states in the compute dtype; w: [D, V] kernel
  in the same dtype, or [V, D] with `transposed` (a tied embedding);
  targets: [B, T] ints. `chunk`: target tokens per chunk (each chunk is
  `max(1, chunk // B)` positions of every row; T need not divide).
  `w_grad=False`: w is frozen (4-bit), only dx is computed.
  `grad_dtype`: dtype of the backward's dots (float32 accumulation either
  way); None is float32, autodiff's choice for float32 logits.
  """
  b, t, d = x.shape
  c = max(1, min(t, chunk // b))  # positions per chunk
  n = -(-t // c)  # chunks
  pad = n * c - t
  if pad:
    x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
  xs = x.reshape(b, n, c, d).transpose(1, 0, 2, 3).reshape(n, b * c, d)
  ts = targets.reshape(b, n, c).transpose(1, 0, 2).reshape(n, b * c)
  logp, correct = _fused(
    xs, w, ts.astype(jnp.int32), softcap, transposed, w_grad, grad_dtype
  )  # [N, B*C]

  def back(a):  # [N, B*C] -> [B, T]
    return a.reshape(n, b, c).transpose(1, 0, 2).reshape(b, n * c)[:, :t]

  return TokenScores(back(logp), back(correct))
