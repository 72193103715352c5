"""Rotary position embeddings and their scalings, as Hugging Face has them.

`RopeScaling` is the frozen form of a checkpoint's `rope_scaling` (written
by transformers 4) or `rope_parameters` (transformers 5) dict. The inverse
frequencies follow `transformers.modeling_rope_utils` formula by formula:

  default  1 / theta^(2i/d)
  linear   default / factor (position interpolation)
  dynamic  NTK: theta * (factor * n / max_pos - (factor - 1))^(d / (d - 2))
           with n = max(positions) + 1 when it exceeds `max_position_
           embeddings` (per call, as HF's cache-growth update does)
  llama3   Llama 3.1: long wavelengths / factor, short kept, a smooth ramp
           between `low_freq_factor` and `high_freq_factor`
  yarn     YaRN: NTK-by-parts ramp between interpolation and extrapolation
           plus an attention factor that scales cos and sin

Every table is float32 and laid out as HF Llama's (rotate-half halves).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("default", "linear", "dynamic", "llama3", "yarn")
_FIELDS = (
  "factor",
  "low_freq_factor",
  "high_freq_factor",
  "original_max_position_embeddings",
  "beta_fast",
  "beta_slow",
  "attention_factor",
  "mscale",
  "mscale_all_dim",
  "truncate",
)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """One RoPE scaling; `kind='default'` is plain RoPE."""

  kind: str = "default"
  factor: float | None = None
  low_freq_factor: float | None = None
  high_freq_factor: float | None = None
  original_max_position_embeddings: int | None = None
  beta_fast: float | None = None
  beta_slow: float | None = None
  attention_factor: float | None = None
  mscale: float | None = None
  mscale_all_dim: float | None = None
  truncate: bool | None = None

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(
        f"RoPE scaling {self.kind!r} is not supported; jft implements {KINDS}"
      )
    need = {
      "linear": ("factor",),
      "dynamic": ("factor",),
      "llama3": (
        "factor",
        "low_freq_factor",
        "high_freq_factor",
        "original_max_position_embeddings",
      ),
      "yarn": ("factor", "original_max_position_embeddings"),
    }.get(self.kind, ())
    missing = [k for k in need if getattr(self, k) is None]
    if missing:
      raise ValueError(f"RoPE scaling {self.kind!r} needs {missing}")

  def to_hf(self) -> dict | None:
    """The HF dict (`rope_type` + fields), or None for plain RoPE."""
    if self.kind == "default":
      return None
    out = {"rope_type": self.kind}
    out.update(
      {k: getattr(self, k) for k in _FIELDS if getattr(self, k) is not None}
    )
    return out


DEFAULT = RopeScaling()


def from_hf(d: Mapping | None, where: str = "config.json") -> RopeScaling:
  """A HF `rope_scaling` / `rope_parameters` dict -> RopeScaling.

  `rope_theta` (transformers 5 keeps it in this dict) is the caller's to
  read; unknown keys other than the theta are refused, naming them, since a
  silently ignored field would be a different model.
  """
  if not d:
    return DEFAULT
  if isinstance(d, RopeScaling):
    return d
  d = dict(d)
  kind = d.pop("rope_type", None) or d.pop("type", None) or "default"
  d.pop("type", None)
  d.pop("rope_theta", None)
  if d.pop("partial_rotary_factor", 1.0) not in (1, 1.0, None):
    raise ValueError(f"{where}: partial_rotary_factor < 1 is not supported")
  unknown = sorted(set(d) - set(_FIELDS))
  if unknown:
    raise ValueError(
      f"{where}: RoPE scaling {kind!r} has field(s) {unknown} that jft "
      "does not implement"
    )
  if kind == "default":
    return DEFAULT
  try:
    return RopeScaling(kind=kind, **d)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None


def _default_inv_freq(dim: int, theta: float) -> np.ndarray:
  exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim
  return (1.0 / (np.float32(theta) ** exponent)).astype(np.float32)  # [d/2]


def _llama3(inv_freq: np.ndarray, s: RopeScaling) -> np.ndarray:
  old = s.original_max_position_embeddings
  low_wavelen = old / s.low_freq_factor
  high_wavelen = old / s.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  out = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
  smooth = (old / wavelen - s.low_freq_factor) / (
    s.high_freq_factor - s.low_freq_factor
  )
  smoothed = (1 - smooth) * out / s.factor + smooth * out
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, out).astype(np.float32)


def _yarn(dim: int, theta: float, s: RopeScaling, max_pos: int | None):
  factor = s.factor
  if factor is None:
    factor = max_pos / s.original_max_position_embeddings

  def mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  attn = s.attention_factor
  if attn is None:
    if s.mscale and s.mscale_all_dim:
      attn = mscale(factor, s.mscale) / mscale(factor, s.mscale_all_dim)
    else:
      attn = mscale(factor)
  beta_fast, beta_slow = s.beta_fast or 32, s.beta_slow or 1

  def correction_dim(rotations):
    orig = s.original_max_position_embeddings
    return (dim * math.log(orig / (rotations * 2 * math.pi))) / (
      2 * math.log(theta)
    )

  low, high = correction_dim(beta_fast), correction_dim(beta_slow)
  if s.truncate is None or s.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip(
    (np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1
  )
  pos_freqs = np.float32(theta) ** (
    np.arange(0, dim, 2).astype(np.float32) / dim
  )
  extrapolation = 1.0 / pos_freqs
  interpolation = 1.0 / (factor * pos_freqs)
  keep = 1 - ramp  # extrapolation weight per frequency
  inv = interpolation * (1 - keep) + extrapolation * keep
  return inv.astype(np.float32), float(attn)


def static_inv_freq(
  dim: int, theta: float, s: RopeScaling, max_pos: int | None = None
) -> tuple[np.ndarray, float]:
  """(inv_freq [dim/2], attention factor) for every non-dynamic kind."""
  if s.kind == "yarn":
    return _yarn(dim, theta, s, max_pos)
  inv = _default_inv_freq(dim, theta)
  if s.kind == "linear":
    inv = (inv / np.float32(s.factor)).astype(np.float32)
  elif s.kind == "llama3":
    inv = _llama3(inv, s)
  return inv, 1.0


def _dynamic_inv_freq(dim, theta, s: RopeScaling, max_pos, positions):
  """NTK-aware inverse frequencies for this call's longest position."""
  if max_pos is None:
    raise ValueError("dynamic RoPE needs max_position_embeddings")
  n = jnp.maximum(jnp.max(positions).astype(jnp.float32) + 1, max_pos)
  base = theta * ((s.factor * n / max_pos) - (s.factor - 1)) ** (
    dim / (dim - 2)
  )
  exponent = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
  return 1.0 / (base**exponent)  # [d/2]


def cos_sin(
  positions: jax.Array,
  dim: int,
  theta: float,
  scaling: RopeScaling = DEFAULT,
  max_pos: int | None = None,
) -> tuple[jax.Array, jax.Array]:
  """cos/sin tables [B, T, dim] in float32 for integer `positions` [B, T]."""
  if scaling.kind == "dynamic":
    inv = _dynamic_inv_freq(dim, theta, scaling, max_pos, positions)
    attn = 1.0
  elif scaling.kind == "default":  # traced, as jft always computed it
    exponent = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    inv, attn = 1.0 / (theta**exponent), 1.0
  else:
    inv, attn = static_inv_freq(dim, theta, scaling, max_pos)
    inv = jnp.asarray(inv)
  freqs = positions.astype(jnp.float32)[..., None] * inv  # [B, T, d/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, d]
  cos, sin = jnp.cos(emb), jnp.sin(emb)
  if attn != 1.0:
    cos, sin = cos * attn, sin * attn
  return cos, sin


def rotate_half(x: jax.Array) -> jax.Array:
  """[x1, x2] -> [-x2, x1] over the two halves of the last axis."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates x [B, T, N, Dh] by cos/sin [B, T, Dh]; float32 math.

  The result is cast back to x's dtype, as HF casts cos/sin to it first.
  """
  x32 = x.astype(jnp.float32)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [B, T, 1, Dh]
  return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)
