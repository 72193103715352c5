"""4-bit block-wise quantization of frozen kernels (QLoRA).

A kernel `w` of shape `[..., K, N]` (leading dims such as a scanned `layers`
axis) is quantized along its contraction axis K (axis -2) in blocks of
`block_size` rows, each (block, column) pair with its own scale. Everything
here is pure `jax.numpy`, so `dequantize` can run inside the jitted step and
XLA fuses it into the matmul that consumes the kernel.

A quantized kernel is a plain dict of arrays (a pytree), so it can sit in a
Flax param tree and in orbax checkpoints. Static facts (`kind`, `block_size`)
are not stored in it; callers pass them again to `dequantize`. Every leaf keeps
the leading dims of `w`, so `nn.scan` can slice a stacked kernel per layer and
`q[i]` equals `quantize(w[i])` leaf by leaf.

Leaves:
  packed:       uint8 [..., K//2, N]  two 4-bit codes per byte along K: row
                2i in the high nibble, row 2i+1 in the low nibble (the
                bitsandbytes order).
  scale:        scale_dtype [..., K//bs, N]  (single-level only)
  scale_codes:  int8 [..., K//bs, N]      (double quant)
  scale_scale:  float32 [..., ceil(K//bs*N / 256)]
  scale_offset: float32 [...]

Kinds:
  int4: symmetric absmax, levels -7..7 (-8 unused, so the grid is symmetric
        and 0 is exact), scale = absmax / 7, code nibble = level + 8.
  nf4:  the 16 NormalFloat levels of QLoRA (Dettmers et al. 2023, as in
        bitsandbytes), scale = absmax, code nibble = index of nearest level.
Both grids contain 0 exactly, so an all-zero block round-trips to exact zeros.

Double quantization (QLoRA sec. 3): the scales of each leading-dim slice are
flattened, their mean is subtracted (`scale_offset`), and the centred values
are quantized to symmetric int8 (-127..127) with one float32 scale per block of
256 (`scale_scale`). The last block is zero-padded internally; the true count
is the shape of `scale_codes`, which is stored unpadded. As in QLoRA, the 4-bit
codes are computed against the unquantized scales.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("int4", "nf4")

NF4_LEVELS = np.array(
  [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
  ],
  dtype=np.float32,
)
# Decision boundaries between adjacent NF4 levels: nearest-level search.
_NF4_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2

INT4_MAX = 7  # int4 levels are -INT4_MAX..INT4_MAX.
DQ_BLOCK_SIZE = 256  # Double-quant block size over flattened scales.
_DQ_MAX = 127  # int8 levels of the double-quantized scales.


def _check(shape, block_size, kind=None):
  """Raises ValueError unless `shape` can be quantized with `block_size`."""
  if kind is not None and kind not in KINDS:
    raise ValueError(f"Unknown quant kind {kind!r}; expected one of {KINDS}.")
  shape = tuple(shape)
  if block_size <= 0:
    raise ValueError(f"block_size must be positive, got {block_size}.")
  if len(shape) < 2:
    raise ValueError(f"Kernel shape {shape} needs at least 2 dims [..., K, N].")
  k = shape[-2]
  if k % block_size or k % 2:
    raise ValueError(
      f"Kernel shape {shape}: K={k} (axis -2) must be divisible by "
      f"block_size={block_size} and by 2."
    )
  return shape


def quantized_shapes(
  shape,
  *,
  block_size: int = 64,
  double_quant: bool = False,
  scale_dtype=jnp.float32,
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Leaf name -> (shape, dtype) of `quantize` for a kernel of `shape`.

  Lets callers build abstract param trees and sharding specs without data.
  """
  shape = _check(shape, block_size)
  *lead, k, n = shape
  lead = tuple(lead)
  nblocks = k // block_size
  out = {"packed": (lead + (k // 2, n), np.dtype(np.uint8))}
  if not double_quant:
    out["scale"] = (lead + (nblocks, n), np.dtype(scale_dtype))
    return out
  nblocks2 = -(-nblocks * n // DQ_BLOCK_SIZE)
  out["scale_codes"] = (lead + (nblocks, n), np.dtype(np.int8))
  out["scale_scale"] = (lead + (nblocks2,), np.dtype(np.float32))
  out["scale_offset"] = (lead, np.dtype(np.float32))
  return out


def _pack(codes):
  """[..., K, N] uint8 codes in 0..15 -> [..., K//2, N] bytes."""
  hi = codes[..., 0::2, :]  # [..., K//2, N]
  lo = codes[..., 1::2, :]  # [..., K//2, N]
  return (hi << 4) | lo


def _unpack(packed):
  """[..., K//2, N] bytes -> [..., K, N] uint8 codes in 0..15."""
  *lead, k2, n = packed.shape
  codes = jnp.stack([packed >> 4, packed & 0xF], axis=-2)  # [..., K//2, 2, N]
  return codes.reshape(*lead, 2 * k2, n)


def _safe(scale):
  """Scale usable as a divisor: all-zero blocks divide by 1 (codes -> 0)."""
  return jnp.where(scale == 0, 1.0, scale)


def _double_quantize(scale):
  """f32 [..., S, N] scales -> int8 codes, per-256 scales, per-slice offset."""
  *lead, s, n = scale.shape
  count = s * n
  nblocks2 = -(-count // DQ_BLOCK_SIZE)
  flat = scale.reshape(*lead, count)  # [..., C]
  offset = jnp.mean(flat, axis=-1)  # [...]
  centred = flat - offset[..., None]  # [..., C]
  pad = [(0, 0)] * len(lead) + [(0, nblocks2 * DQ_BLOCK_SIZE - count)]
  blocks = jnp.pad(centred, pad).reshape(*lead, nblocks2, DQ_BLOCK_SIZE)
  scale2 = jnp.max(jnp.abs(blocks), axis=-1) / _DQ_MAX  # [..., nblocks2]
  codes = jnp.round(blocks / _safe(scale2)[..., None])
  codes = jnp.clip(codes, -_DQ_MAX, _DQ_MAX).astype(jnp.int8)
  codes = codes.reshape(*lead, nblocks2 * DQ_BLOCK_SIZE)[..., :count]
  return {
    "scale_codes": codes.reshape(scale.shape),  # [..., S, N]
    "scale_scale": scale2,  # [..., nblocks2]
    "scale_offset": offset,  # [...]
  }


def _double_dequantize(q):
  """Inverse of `_double_quantize`: f32 scales [..., S, N]."""
  codes = q["scale_codes"]
  *lead, s, n = codes.shape
  count = s * n
  nblocks2 = q["scale_scale"].shape[-1]
  if nblocks2 != -(-count // DQ_BLOCK_SIZE):
    raise ValueError(
      f"scale_scale shape {q['scale_scale'].shape} does not match "
      f"scale_codes shape {codes.shape} (blocks of {DQ_BLOCK_SIZE})."
    )
  flat = codes.reshape(*lead, count).astype(jnp.float32)  # [..., C]
  pad = [(0, 0)] * len(lead) + [(0, nblocks2 * DQ_BLOCK_SIZE - count)]
  blocks = jnp.pad(flat, pad).reshape(*lead, nblocks2, DQ_BLOCK_SIZE)
  blocks = blocks * q["scale_scale"].astype(jnp.float32)[..., None]
  flat = blocks.reshape(*lead, nblocks2 * DQ_BLOCK_SIZE)[..., :count]
  flat = flat + q["scale_offset"].astype(jnp.float32)[..., None]  # [..., C]
  return flat.reshape(codes.shape)


def quantize(
  w,
  *,
  kind: str,
  block_size: int = 64,
  double_quant: bool = False,
  scale_dtype=jnp.float32,
) -> dict[str, jax.Array]:
  """Quantizes a kernel `[..., K, N]` to 4 bits along K (see module doc).

  Computes in float32 whatever the input dtype (e.g. bfloat16). Codes are
  chosen against the scale as stored (`scale_dtype`), so dequantization is
  consistent with what is kept.
  """
  w = jnp.asarray(w)
  *lead, k, n = _check(w.shape, block_size, kind)
  nblocks = k // block_size
  x = w.astype(jnp.float32).reshape(*lead, nblocks, block_size, n)
  absmax = jnp.max(jnp.abs(x), axis=-2)  # [..., K//bs, N]
  scale = absmax / INT4_MAX if kind == "int4" else absmax
  scale = scale.astype(scale_dtype).astype(jnp.float32)  # [..., K//bs, N]
  y = x / _safe(scale)[..., None, :]  # [..., K//bs, bs, N]
  if kind == "int4":
    levels = jnp.clip(jnp.round(y), -INT4_MAX, INT4_MAX)
    codes = (levels + 8).astype(jnp.uint8)
  else:
    # Index of the nearest NF4 level: count of midpoints below y.
    mid = jnp.asarray(_NF4_MIDPOINTS)
    codes = jnp.searchsorted(mid, y, side="left").astype(jnp.uint8)
  codes = codes.reshape(*lead, k, n)  # [..., K, N]
  out = {"packed": _pack(codes)}  # [..., K//2, N]
  if double_quant:
    out.update(_double_quantize(scale))
  else:
    out["scale"] = scale.astype(scale_dtype)  # [..., K//bs, N]
  return out


def dequantize(
  q: dict, *, kind: str, block_size: int = 64, dtype=jnp.float32
) -> jax.Array:
  """Quantized dict -> kernel `[..., K, N]` in `dtype` (math in float32)."""
  if kind not in KINDS:
    raise ValueError(f"Unknown quant kind {kind!r}; expected one of {KINDS}.")
  codes = _unpack(q["packed"])  # [..., K, N]
  *lead, k, n = _check(codes.shape, block_size)
  nblocks = k // block_size
  if "scale" in q:
    scale = q["scale"].astype(jnp.float32)
  else:
    scale = _double_dequantize(q)
  if scale.shape != (*lead, nblocks, n):
    raise ValueError(
      f"Scale shape {scale.shape} does not match packed shape "
      f"{q['packed'].shape} with block_size={block_size}."
    )
  if kind == "int4":
    vals = codes.astype(jnp.float32) - 8.0  # [..., K, N]
  else:
    vals = jnp.take(jnp.asarray(NF4_LEVELS), codes.astype(jnp.int32))
  vals = vals.reshape(*lead, nblocks, block_size, n)
  w = vals * scale[..., None, :]  # [..., K//bs, bs, N]
  return w.reshape(*lead, k, n).astype(dtype)


def nbytes(q) -> int:
  """Bytes held by the leaves of `q` (arrays or ShapeDtypeStructs)."""
  return sum(
    math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(q)
  )


def quantize_params(params, kernel_paths, *, kind, block_size, double_quant):
  """Float param tree -> the 4-bit model's tree (`X/kernel` -> `X/kernel_*`).

  `kernel_paths` are the `.../kernel` leaves to quantize (see
  `jft.peft.lora.check_quant_table`); other leaves pass through unchanged.
  """
  from flax import traverse_util

  flat = traverse_util.flatten_dict(dict(params), sep="/")
  out = {}
  for path, leaf in flat.items():
    if path not in kernel_paths:
      out[path] = leaf
      continue
    q = quantize(
      leaf, kind=kind, block_size=block_size, double_quant=double_quant
    )
    for name, v in q.items():
      out[f"{path}_{name}"] = v
  return traverse_util.unflatten_dict(out, sep="/")
