"""Dense matmuls with a hand-written backward pass in canonical layouts.

`dense(x, w)` is `x @ w` for x [..., K] and w [K, N] with the same value
and the same gradients as autodiff of `lax.dot_general`; only the layout of
the backward pass's dots differs (and with it the summation order, so the
numbers agree to float rounding). Why: XLA:CPU (jax 0.10) runs a dot on its
fast library kernels only when the lhs is row-major and contracted on its
last axis; autodiff's weight gradient `x.T @ g` contracts the lhs on axis 0
and falls back to XLA's slow emitter (8x slower in bf16), and a bf16 dot
whose *output* is bf16 is computed as f32 (see ../shared/PERF.md and
bench/matmul_layouts.py). So here:

  forward  y  = x @ w                    f32 accumulation, cast to out dtype
  backward dx = g @ w.T                  (a transposed rhs is fine)
           dw = canonical_transpose(x) @ g   the lhs made row-major first

(`transpose_w`: w is [N, K], y = x @ w.T, dx = g @ w, dw = (x.T @ g).T.)

Every dot accumulates in float32 (`preferred_element_type`) and is cast to
the dtype autodiff would give: dx in x's dtype, dw in w's. Operands of
different dtypes (an f32 cotangent of bf16 logits against a bf16 kernel) are
upcast to the wider one, as XLA does for autodiff's mixed dot.

`w_grad=False` is for frozen kernels (a 4-bit kernel dequantized in the
step): the backward computes only dx, and w's cotangent is a symbolic zero.
A float kernel that is merely frozen by the freeze table needs nothing: its
unused dw is dead code that XLA removes.

Nothing here is CPU-specific in its math; on GPU and TPU the custom VJP
costs one materialised transpose of x per weight gradient (not measured
there).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax


def canonical_transpose(a: jax.Array) -> jax.Array:
  """[M, K] -> [K, M] materialised in row-major order.

  `a.T` alone is lowered as a layout change that XLA folds into the
  consuming dot (lhs contracted on axis 0, the slow case); a rank-3
  transpose followed by a reshape makes XLA write a canonical copy instead.
  A 2-byte dtype (bf16, f16) with M even is moved as 32-bit words, two
  rows at a time (`_transpose_pairs`): the same bits, and XLA:CPU's
  transpose of 2-byte elements inside the backward scan was 3x slower.
  """
  m, k = a.shape
  if a.dtype.itemsize == 2 and m % 2 == 0:
    return _transpose_pairs(a)
  return jnp.transpose(a[:, :, None], (1, 0, 2)).reshape(k, m)  # [K, M]


def _transpose_pairs(a: jax.Array) -> jax.Array:
  """[M, K] of a 2-byte dtype, M even -> [K, M]: rows 2i and 2i+1 are
  interleaved into one uint32 row ([M/2, K]), that is transposed
  ([K, M/2]), and each word split back into its two elements, which are
  then adjacent in the output row: out[k, 2i + r] = a[2i + r, k]."""
  m, k = a.shape
  pairs = jnp.transpose(a.reshape(m // 2, 2, k), (0, 2, 1))  # [M/2, K, 2]
  words = lax.bitcast_convert_type(pairs, jnp.uint32)  # [M/2, K]
  words = jnp.transpose(words[:, :, None], (1, 0, 2)).reshape(k, m // 2)
  return lax.bitcast_convert_type(words, a.dtype).reshape(k, m)  # [K, M]


def dot(a: jax.Array, b: jax.Array, out_dtype, transpose_b: bool = False):
  """[M, K] @ [K, N] (or @ b.T for b [N, K]) with f32 accumulation.

  Operands of different dtypes are upcast to the wider one first.
  """
  if a.dtype != b.dtype:
    wide = jnp.promote_types(a.dtype, b.dtype)
    a, b = a.astype(wide), b.astype(wide)
  rc = 1 if transpose_b else 0
  y = lax.dot_general(
    a, b, (((1,), (rc,)), ((), ())), preferred_element_type=jnp.float32
  )
  return y.astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _matmul(x, w, out_dtype, w_grad, w_t):
  del w_grad
  return dot(x, w, out_dtype, transpose_b=w_t)  # [M, N]


def _matmul_fwd(x, w, out_dtype, w_grad, w_t):
  return _matmul(x, w, out_dtype, w_grad, w_t), (x, w)


def _matmul_bwd(out_dtype, w_grad, w_t, res, g):
  del out_dtype
  x, w = res  # [M, K], [K, N] (w_t: [N, K])
  dx = dot(g, w, x.dtype, transpose_b=not w_t)  # [M, K]
  if not w_grad:
    return dx, None
  dw = dot(canonical_transpose(x), g, jnp.float32)  # [K, N]
  if w_t:  # [K, N] -> [N, K]: a copy of the weight, not of g [M, N]
    dw = dw.T
  return dx, dw.astype(w.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul_frozen(x, q, dequant, out_dtype):
  return dot(x, dequant(q), out_dtype)  # [M, N]


def _matmul_frozen_fwd(x, q, dequant, out_dtype):
  return _matmul_frozen(x, q, dequant, out_dtype), q


def _matmul_frozen_bwd(dequant, out_dtype, q, g):
  del out_dtype
  w = dequant(q)  # [K, N], made again: never kept from the forward
  return dot(g, w, w.dtype, transpose_b=True), None  # dx [M, K]


_matmul_frozen.defvjp(_matmul_frozen_fwd, _matmul_frozen_bwd)


_REFERENCE = False  # see `autodiff_reference`


@contextlib.contextmanager
def autodiff_reference():
  """While active, `dense` traces as one plain `lax.dot_general` whose
  backward is autodiff's: the reference path that tests and benchmarks
  compare the custom VJP against. Read when a function is traced (jit
  caches what it traced), not when it runs."""
  global _REFERENCE
  old, _REFERENCE = _REFERENCE, True
  try:
    yield
  finally:
    _REFERENCE = old


def dense(
  x: jax.Array,
  w: jax.Array,
  out_dtype=None,
  *,
  w_grad: bool = True,
  transpose_w: bool = False,
) -> jax.Array:
  """x [..., K] @ w [K, N] -> [..., N] in `out_dtype` (default x's dtype).

  x and w must have one dtype (the compute dtype). `w_grad=False` gives w
  no gradient (frozen kernels); `transpose_w=True` takes w as [N, K] and
  computes x @ w.T (a tied LM head's embedding table).
  """
  if x.dtype != w.dtype:
    raise TypeError(f"dense: x is {x.dtype} but w is {w.dtype}; cast first")
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  if _REFERENCE:
    w = w if w_grad else lax.stop_gradient(w)
    return lax.dot_general(
      x,
      w,
      (((x.ndim - 1,), (1 if transpose_w else 0,)), ((), ())),
      preferred_element_type=out_dtype,
    )  # [..., N]
  lead, k = x.shape[:-1], x.shape[-1]
  n = w.shape[0] if transpose_w else w.shape[1]
  y = _matmul(x.reshape(-1, k), w, out_dtype, w_grad, transpose_w)  # [M, N]
  return y.reshape(*lead, n)  # [..., N]


def dense_frozen(
  x: jax.Array, q, dequant: Callable, out_dtype=None
) -> jax.Array:
  """x [..., K] @ dequant(q) [K, N] for a frozen stored kernel (4-bit codes
  and scales, `q`) that `dequant` expands to x's dtype.

  Only dx flows back, and the backward expands `q` again instead of keeping
  the expanded kernel from the forward: with `dense`, every layer's [K, N]
  float kernel stayed alive from its forward to its backward (QLoRA's base
  held in float for the whole step, with no remat: 192 MB more scratch than
  LoRA on the 50M base, bench/memory.py). `dequant` must be hashable (a
  `functools.partial` of module-level functions is).
  """
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  if _REFERENCE:
    w = lax.stop_gradient(dequant(q))
    return dense(x, w, out_dtype, w_grad=False)
  lead, k = x.shape[:-1], x.shape[-1]
  y = _matmul_frozen(x.reshape(-1, k), q, dequant, out_dtype)  # [M, N]
  return y.reshape(*lead, y.shape[-1])  # [..., N]
