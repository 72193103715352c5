"""Tests for jft.peft.quant: 4-bit block-wise int4 / NF4 with double quant."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jft.peft import quant

NF4_MAX_HALF_GAP = float(np.max(np.diff(quant.NF4_LEVELS))) / 2  # 0.1519


def _normal(shape, seed=0):
  return np.array(jax.random.normal(jax.random.key(seed), shape))


def _np_unpack(packed):
  """Independent numpy unpack: row 2i in the high nibble, 2i+1 in the low."""
  packed = np.asarray(packed)
  out = np.empty(packed.shape[:-2] + (2 * packed.shape[-2], packed.shape[-1]))
  out[..., 0::2, :] = packed >> 4
  out[..., 1::2, :] = packed & 0xF
  return out.astype(np.int64)


def _np_codes(w, kind, bs):
  """Numpy reference codes [..., K, N] and scales [..., K//bs, N]."""
  *lead, k, n = w.shape
  x = np.asarray(w, np.float32).reshape(*lead, k // bs, bs, n)
  absmax = np.abs(x).max(-2)
  scale = (absmax / np.float32(7)) if kind == "int4" else absmax
  y = x / np.where(scale == 0, 1, scale)[..., None, :]
  if kind == "int4":
    codes = np.clip(np.round(y), -7, 7) + 8
  else:
    codes = np.abs(y[..., None] - quant.NF4_LEVELS).argmin(-1)
  return codes.reshape(*lead, k, n).astype(np.int64), scale


def _per_elem(block_vals, bs):
  """[..., K//bs, N] -> [..., K, N] by repeating each block's value."""
  return np.repeat(np.asarray(block_vals), bs, axis=-2)


def _bound(w, kind, bs):
  """Per-element worst-case round-trip error from each block's absmax."""
  absmax = np.abs(np.asarray(w, np.float32))
  absmax = absmax.reshape(*w.shape[:-2], -1, bs, w.shape[-1]).max(-2)
  half_step = absmax / 7 / 2 if kind == "int4" else absmax * NF4_MAX_HALF_GAP
  return _per_elem(half_step, bs) * (1 + 1e-5) + 1e-7


# ---------------------------------------------------------------- hand-computed


def test_int4_hand_example():
  # Block 0 = [7, -2]: scale 1, levels [7, -2] -> nibbles [15, 6] -> 0xF6.
  # Block 1 = [-0.7, 0.21]: scale 0.1, levels [-7, 2] -> [1, 10] -> 0x1A.
  w = np.array([[7.0], [-2.0], [-0.7], [0.21]], np.float32)
  q = quant.quantize(w, kind="int4", block_size=2)
  np.testing.assert_array_equal(q["packed"], [[0xF6], [0x1A]])
  np.testing.assert_allclose(q["scale"], [[1.0], [0.1]], rtol=1e-6)
  deq = quant.dequantize(q, kind="int4", block_size=2)
  np.testing.assert_allclose(deq, [[7.0], [-2.0], [-0.7], [0.2]], rtol=1e-6)


def test_nf4_hand_example():
  # Block 0 = [2, -1]: absmax 2, y = [1, -0.5] -> nearest levels idx [15, 2]
  #   (-0.525 beats -0.395) -> 0xF2.
  # Block 1 = [0.1, -0.4]: absmax 0.4, y = [0.25, -1] -> idx [10, 0] -> 0xA0.
  w = np.array([[2.0], [-1.0], [0.1], [-0.4]], np.float32)
  q = quant.quantize(w, kind="nf4", block_size=2)
  np.testing.assert_array_equal(q["packed"], [[0xF2], [0xA0]])
  np.testing.assert_allclose(q["scale"], [[2.0], [0.4]], rtol=1e-6)
  deq = quant.dequantize(q, kind="nf4", block_size=2)
  expected = [[2.0], [-2 * 0.5250730514526367], [0.4 * 0.24611230194568634],
              [-0.4]]  # fmt: skip
  np.testing.assert_allclose(deq, expected, rtol=1e-6)


def test_double_quant_hand_example():
  # Scales [1, 0.1]: offset 0.55, centred [0.45, -0.45], absmax 0.45
  #   -> second-level scale 0.45/127, codes [127, -127].
  w = np.array([[7.0], [-2.0], [-0.7], [0.21]], np.float32)
  q = quant.quantize(w, kind="int4", block_size=2, double_quant=True)
  np.testing.assert_array_equal(q["packed"], [[0xF6], [0x1A]])
  np.testing.assert_array_equal(q["scale_codes"], [[127], [-127]])
  assert q["scale_codes"].dtype == jnp.int8
  np.testing.assert_allclose(q["scale_scale"], [0.45 / 127], rtol=1e-6)
  np.testing.assert_allclose(q["scale_offset"], 0.55, rtol=1e-6)
  deq = quant.dequantize(q, kind="int4", block_size=2)
  np.testing.assert_allclose(deq, [[7.0], [-2.0], [-0.7], [0.2]], rtol=1e-5)


# Written out again (QLoRA paper / bitsandbytes) so a typo in the module fails.
_QLORA_NF4 = [
  -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
  -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
  0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
  0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
  0.7229568362236023, 1.0,
]  # fmt: skip


def test_nf4_levels_are_the_qlora_constants():
  np.testing.assert_array_equal(
    quant.NF4_LEVELS, np.asarray(_QLORA_NF4, np.float32)
  )
  assert quant.NF4_LEVELS.shape == (16,)
  assert quant.NF4_LEVELS[0] == -1.0 and quant.NF4_LEVELS[-1] == 1.0
  assert quant.NF4_LEVELS[7] == 0.0
  assert np.all(np.diff(quant.NF4_LEVELS) > 0)
  np.testing.assert_allclose(NF4_MAX_HALF_GAP, (1 - 0.6961928009986877) / 2)
  assert quant.KINDS == ("int4", "nf4")


# ------------------------------------------------------- codes vs numpy oracle


@pytest.mark.parametrize("kind", quant.KINDS)
def test_codes_and_scales_match_numpy_reference(kind):
  w = _normal((2, 128, 24), seed=1)
  q = quant.quantize(w, kind=kind, block_size=32)
  codes, scale = _np_codes(w, kind, 32)
  np.testing.assert_array_equal(_np_unpack(q["packed"]), codes)
  np.testing.assert_allclose(q["scale"], scale, rtol=1e-6)


# ------------------------------------------------------------ round-trip error


@pytest.mark.parametrize("kind", quant.KINDS)
@pytest.mark.parametrize("scale_dtype", [jnp.float32, jnp.bfloat16])
def test_round_trip_error_bounded_per_block(kind, scale_dtype):
  w = _normal((256, 48), seed=2)
  w[:64, 5] = 0.0  # an all-zero block
  w[70, 7] = 1e4  # a block with one huge outlier
  q = quant.quantize(w, kind=kind, block_size=64, scale_dtype=scale_dtype)
  assert q["scale"].dtype == scale_dtype
  deq = np.asarray(quant.dequantize(q, kind=kind, block_size=64))
  assert np.all(np.isfinite(deq))
  err = np.abs(deq - w)
  if scale_dtype == jnp.float32:
    assert np.all(err <= _bound(w, kind, 64))
  else:  # Codes use the bf16-rounded scale: allow its relative rounding.
    assert np.all(err <= _bound(w, kind, 64) * (1 + 2**-7))
  np.testing.assert_array_equal(deq[:64, 5], 0.0)  # exact zeros
  # The outlier is its block's absmax: it sits on the top level.
  np.testing.assert_allclose(deq[70, 7], 1e4, rtol=1e-2)
  # Blocks without the outlier are untouched by it.
  other = np.ones_like(w, bool)
  other[64:128, 7] = False
  assert np.all(err[other] <= 0.6)


@pytest.mark.parametrize("kind", quant.KINDS)
@pytest.mark.parametrize("double_quant", [False, True])
def test_all_zero_kernel(kind, double_quant):
  w = np.zeros((128, 8), np.float32)
  q = quant.quantize(w, kind=kind, double_quant=double_quant)
  for leaf in jax.tree.leaves(q):
    assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
  deq = quant.dequantize(q, kind=kind)
  np.testing.assert_array_equal(deq, 0.0)


# ------------------------------------------------------------- spec and bytes


@pytest.mark.parametrize("double_quant", [False, True])
def test_shapes_dtypes_and_layer_slicing(double_quant):
  num_layers, k, n, bs = 3, 128, 40, 32
  w = _normal((num_layers, k, n), seed=3)
  q = quant.quantize(w, kind="nf4", block_size=bs, double_quant=double_quant)
  spec = quant.quantized_shapes(
    w.shape, block_size=bs, double_quant=double_quant
  )
  assert {name: (x.shape, x.dtype) for name, x in q.items()} == spec
  assert spec["packed"] == ((num_layers, k // 2, n), np.uint8)
  if double_quant:
    # 4*40 = 160 scales per layer -> one (padded) block of 256.
    assert spec["scale_codes"] == ((num_layers, k // bs, n), np.int8)
    assert spec["scale_scale"] == ((num_layers, 1), np.float32)
    assert spec["scale_offset"] == ((num_layers,), np.float32)
  else:
    assert spec["scale"] == ((num_layers, k // bs, n), np.float32)
  # Every leaf keeps the layer dim, so nn.scan's per-layer slice of the
  # quantized stack equals quantizing that layer alone.
  for i in range(num_layers):
    qi = quant.quantize(
      w[i], kind="nf4", block_size=bs, double_quant=double_quant
    )
    chex.assert_trees_all_close(jax.tree.map(lambda x, i=i: x[i], q), qi)
  # eval_shape agrees (abstract param trees).
  abstract = jax.eval_shape(
    lambda w: quant.quantize(
      w, kind="nf4", block_size=bs, double_quant=double_quant
    ),
    w,
  )
  assert {n_: (x.shape, x.dtype) for n_, x in abstract.items()} == spec


def test_nbytes():
  k, n, bs = 512, 256, 64
  w = _normal((k, n), seed=4)
  q = quant.quantize(w, kind="int4", block_size=bs)
  held = sum(x.nbytes for x in jax.tree.leaves(q))
  assert quant.nbytes(q) == held == k * n // 2 + (k // bs) * n * 4
  assert quant.nbytes(jax.eval_shape(lambda: q)) == held
  qd = quant.quantize(w, kind="int4", block_size=bs, double_quant=True)
  assert quant.nbytes(qd) == sum(x.nbytes for x in jax.tree.leaves(qd))
  scale_bytes = quant.nbytes(q) - k * n // 2
  dq_scale_bytes = quant.nbytes(qd) - k * n // 2
  # 2048 scales: 2048 int8 + 8 f32 block scales + 1 f32 offset.
  assert dq_scale_bytes == 2048 + 8 * 4 + 4
  assert 3.5 < scale_bytes / dq_scale_bytes < 4.0


# ----------------------------------------------------------- double quant


@pytest.mark.parametrize("kind", quant.KINDS)
def test_double_quant_error_and_padding(kind):
  # 3 blocks x 100 columns = 300 scales: not a multiple of 256, so the
  # second block of the double quant is padded. Put a large scale in the tail
  # so dropping it would show.
  bs, k, n = 64, 192, 100
  w = _normal((k, n), seed=5)
  w[150, 99] = 40.0  # last scale (flat index 299), in the padded block
  single = quant.quantize(w, kind=kind, block_size=bs)
  double = quant.quantize(w, kind=kind, block_size=bs, double_quant=True)
  assert double["scale_codes"].shape == (3, 100)
  assert double["scale_scale"].shape == (2,)
  np.testing.assert_array_equal(double["packed"], single["packed"])
  deq1 = np.asarray(quant.dequantize(single, kind=kind, block_size=bs))
  deq2 = np.asarray(quant.dequantize(double, kind=kind, block_size=bs))
  # |Δ| = |level| * |Δscale| <= max|level| * scale_scale / 2.
  ss = np.repeat(np.asarray(double["scale_scale"]), 256)[:300].reshape(3, 100)
  max_level = 7.0 if kind == "int4" else 1.0
  bound = _per_elem(ss, bs) * max_level / 2 * (1 + 1e-4) + 1e-6
  assert np.all(np.abs(deq2 - deq1) <= bound)
  np.testing.assert_allclose(deq2[150, 99], deq1[150, 99], rtol=1e-3)


@pytest.mark.parametrize("kind", quant.KINDS)
def test_double_quant_extra_error_is_small(kind):
  # Without outliers the scales are tightly spread: the extra error of the
  # 8-bit scales is ~1% of the 4-bit error itself (measured ~0.009 / ~0.010).
  w = _normal((192, 100), seed=5)
  deq1 = quant.dequantize(quant.quantize(w, kind=kind), kind=kind)
  q2 = quant.quantize(w, kind=kind, double_quant=True)
  deq2 = quant.dequantize(q2, kind=kind)
  extra = np.linalg.norm(deq2 - deq1) / np.linalg.norm(deq1 - w)
  assert extra < 0.03
  rel1 = np.linalg.norm(deq1 - w) / np.linalg.norm(w)
  rel2 = np.linalg.norm(deq2 - w) / np.linalg.norm(w)
  assert rel2 < rel1 * 1.01


# ------------------------------------------------------------------- matmul


@pytest.mark.parametrize(
  "kind,tol",
  [("int4", 0.13), ("nf4", 0.12)],  # measured ~0.107 / ~0.092
)
def test_quantized_matmul_close_to_float_under_jit(kind, tol):
  w = _normal((512, 128), seed=6)
  x = _normal((16, 512), seed=7)

  @jax.jit
  def qmatmul(x, w):
    q = quant.quantize(w, kind=kind, double_quant=True)
    return x @ quant.dequantize(q, kind=kind, dtype=jnp.float32)

  ref = x @ w
  out = qmatmul(x, w)
  rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
  assert rel < tol
  eager = x @ quant.dequantize(
    quant.quantize(w, kind=kind, double_quant=True), kind=kind
  )
  np.testing.assert_allclose(out, eager, rtol=1e-4, atol=1e-4)
  # Also with the quantized dict as a jit argument (params in the tree).
  q = quant.quantize(w, kind=kind)
  deq = jax.jit(lambda q: quant.dequantize(q, kind=kind))(q)
  np.testing.assert_array_equal(deq, quant.dequantize(q, kind=kind))


def test_nf4_beats_int4_on_gaussian_weights():
  w = _normal((512, 128), seed=8)
  errs = {
    kind: np.linalg.norm(
      quant.dequantize(quant.quantize(w, kind=kind), kind=kind) - w
    )
    for kind in quant.KINDS
  }
  assert errs["nf4"] < 0.95 * errs["int4"]


def test_bfloat16_input_and_output():
  w32 = _normal((128, 16), seed=9)
  w16 = jnp.asarray(w32, jnp.bfloat16)
  q = quant.quantize(w16, kind="nf4")
  ref = quant.quantize(jnp.asarray(w16, jnp.float32), kind="nf4")
  chex.assert_trees_all_equal(q, ref)
  assert q["scale"].dtype == jnp.float32
  deq = quant.dequantize(q, kind="nf4", dtype=jnp.bfloat16)
  assert deq.dtype == jnp.bfloat16
  w16f = np.asarray(w16, np.float32)
  err = np.abs(np.asarray(deq, np.float32) - w16f)
  # bf16 output adds at most half a bf16 ulp of |w| on top of the nf4 bound.
  assert np.all(err <= _bound(w16f, "nf4", 64) + np.abs(w16f) * 2**-8 * 2)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
  "shape,block_size",
  [((96, 4), 64), ((6, 3), 4), ((3, 5), 1), ((2, 7, 4), 2), ((64,), 64)],
)
def test_bad_shapes_raise(shape, block_size):
  w = np.zeros(shape, np.float32)
  with pytest.raises(ValueError, match=re.escape(str(shape))):
    quant.quantize(w, kind="int4", block_size=block_size)
  with pytest.raises(ValueError, match=re.escape(str(shape))):
    quant.quantized_shapes(shape, block_size=block_size, double_quant=False)


def test_bad_kind_and_mismatched_block_size_raise():
  w = _normal((128, 4))
  with pytest.raises(ValueError, match="int8"):
    quant.quantize(w, kind="int8")
  q = quant.quantize(w, kind="int4", block_size=64)
  with pytest.raises(ValueError, match="block_size=32"):
    quant.dequantize(q, kind="int4", block_size=32)
