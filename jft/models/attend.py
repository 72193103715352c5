"""The attention core (scores, mask, softmax, values) with a hand-written
backward pass in canonical dot layouts.

`attend(q, k, v, mask, ...)` is the einsum-softmax-einsum the model always
used, with the same value; only the backward differs, in three ways (so the
gradients agree to float rounding, pinned by tests/test_fastpath.py):

- Every dot is laid out the way XLA:CPU runs on its fast library kernels
  (lhs row-major, contracted on its last axis; see matmul.py): heads are
  batch dimensions in front, and where a gradient would contract the lhs on
  a non-last axis, a [.., T, Dh] operand is transposed first and the
  [.., Dh, S] result transposed back (never a [.., T, S] one).
- The softmax backward takes each row's `sum_s p_s dp_s` as `do . o`
  (FlashAttention's identity: `o = sum_s p_s v_s`), a sum over Dh instead of
  over the keys. Autodiff's sum over [B, H, T, S] was the step's largest
  single attention op.
- The probabilities are recomputed in the backward from q and k (as
  FlashAttention does) instead of kept from the forward: a scanned model
  would otherwise stack a float32 [layers, B, H, T, S] residual, whose
  zero-fill and per-layer writes cost more than one more q . k dot (the
  ref-5M float32 step: 0.88x the plain step, against 0.99x when kept;
  bf16 0.80x against 0.85x; measured side by side in one process).

Masked scores get no gradient, as with `jnp.where`.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Large negative, finite: fully masked rows give a uniform softmax, not NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

_REFERENCE = False  # see `autodiff_reference`


@contextlib.contextmanager
def autodiff_reference():
  """While active (at trace time), `attend` is the plain einsum path with
  autodiff's backward: the reference the tests and benches compare with."""
  global _REFERENCE
  old, _REFERENCE = _REFERENCE, True
  try:
    yield
  finally:
    _REFERENCE = old


def _bdot(a, b, ca: int, cb: int):
  """Batched over the two leading axes, f32 accumulation: a [B, K, ...]
  contracted on axis `ca` with b on axis `cb`."""
  if a.dtype != b.dtype:
    wide = jnp.promote_types(a.dtype, b.dtype)
    a, b = a.astype(wide), b.astype(wide)
  return lax.dot_general(
    a, b, (((ca,), (cb,)), ((0, 1), (0, 1))), preferred_element_type=jnp.float32
  )


def _swap(a):
  """[B, K, M, N] -> [B, K, N, M], materialised row-major: a plain
  transpose is folded into the consuming dot as a layout, which XLA:CPU
  then runs on its slow emitter (no bf16 x bf16 -> f32 there at all); the
  extra unit axis makes it write a copy (matmul.canonical_transpose)."""
  b, k, m, n = a.shape
  return jnp.transpose(a[..., None], (0, 1, 3, 2, 4)).reshape(b, k, n, m)


def _scale(s, scale):
  """`scale` is ("mul", c) or ("div", c): the model's own operation, so the
  forward rounds exactly as before."""
  how, c = scale
  return s * np.float32(c) if how == "mul" else s / np.float32(c)


def _scores(q, k, scale, softcap):
  """Raw scores [B, KV, G*T, S] f32 (scaled, soft-capped) and tanh(.) for
  the soft-cap's backward (None without one)."""
  s = _scale(_bdot(q, k, 3, 3), scale)
  if not softcap:
    return s, None
  t = jnp.tanh(s / softcap)
  return t * softcap, t


def _probs(s, mask, g):
  """Masked softmax of s [B, KV, G*T, S] with mask [B, 1, 1, T, S]."""
  b, kv, gt, n = s.shape
  s5 = s.reshape(b, kv, g, gt // g, n)
  s5 = jnp.where(mask, s5, MASK_VALUE)
  return jax.nn.softmax(s5, axis=-1).reshape(b, kv, gt, n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _core(q, k, v, mask, scale, softcap, g):
  s, _ = _scores(q, k, scale, softcap)
  p = _probs(s, mask, g)
  return _bdot(p.astype(v.dtype), v, 3, 2).astype(v.dtype)  # [B, KV, GT, D]


def _core_fwd(q, k, v, mask, scale, softcap, g):
  s, t = _scores(q, k, scale, softcap)
  p = _probs(s, mask, g)
  o = _bdot(p.astype(v.dtype), v, 3, 2).astype(v.dtype)
  return o, (q, k, v, mask, o)


def _core_bwd(scale, softcap, g, res, do):
  q, k, v, mask, o = res
  s, t = _scores(q, k, scale, softcap)  # recomputed: nothing [T, S] is kept
  p = _probs(s, mask, g)
  cdt = v.dtype
  dp = _bdot(do, v, 3, 3)  # [B, KV, GT, S]
  dv = _swap(_bdot(_swap(do), p.astype(cdt), 3, 2))  # [B, KV, S, D]
  delta = jnp.sum(
    do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True
  )  # [B, KV, GT, 1]: sum_s p_s dp_s
  ds = p * (dp - delta)
  b, kv, gt, n = ds.shape
  ds = jnp.where(mask, ds.reshape(b, kv, g, gt // g, n), 0.0)
  ds = ds.reshape(b, kv, gt, n)
  if softcap:
    ds = ds * (1.0 - t * t)
  ds = _scale(ds, scale).astype(cdt)
  dq = _bdot(ds, k, 3, 2).astype(q.dtype)  # [B, KV, GT, D]
  dk = _swap(_bdot(_swap(q), ds, 3, 2)).astype(k.dtype)  # [B, KV, S, D]
  return dq, dk, dv.astype(v.dtype), None


_core.defvjp(_core_fwd, _core_bwd)


def _reference(q, k, v, mask, scale, softcap, out_dtype):
  scores = jnp.einsum(
    "btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32
  )  # [B, KV, G, T, S]
  scores = _scale(scores, scale)
  if softcap:
    scores = jnp.tanh(scores / softcap) * softcap
  scores = jnp.where(mask, scores, MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(out_dtype)
  return jnp.einsum("bkgts,bskd->btkgd", probs, v)  # [B, T, KV, G, Dh]


def attend(
  q, k, v, mask, *, scale: tuple, softcap: float | None = None, vjp=True
):
  """q [B, T, KV, G, Dh] (query head h = kv * G + g); k, v [B, S, KV, Dh];
  mask bool [B, 1, 1, T, S] -> [B, T, KV, G, Dh] in v's dtype.

  scores = q . k, scaled by `scale` (("mul", c) or ("div", c)), tanh
  soft-capped when `softcap`, masked, then a float32 softmax cast to v's
  dtype against v. `vjp=False` (or `autodiff_reference`): the einsum path,
  differentiated by autodiff.
  """
  mask = jnp.asarray(mask, bool)
  if _REFERENCE or not vjp:
    return _reference(q, k, v, mask, scale, softcap, v.dtype)
  b, t, kv, g, dh = q.shape
  qh = jnp.transpose(q, (0, 2, 3, 1, 4)).reshape(b, kv, g * t, dh)
  kh = jnp.transpose(k, (0, 2, 1, 3))  # [B, KV, S, Dh]
  vh = jnp.transpose(v, (0, 2, 1, 3))
  o = _core(qh, kh, vh, mask, (scale[0], float(scale[1])), softcap or None, g)
  o = o.reshape(b, kv, g, t, dh)
  return jnp.transpose(o, (0, 3, 1, 2, 4))  # [B, T, KV, G, Dh]
