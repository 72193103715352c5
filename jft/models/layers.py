"""Building blocks: the one dense layer, embeddings, RMSNorm and RoPE.

Every projection in the model is a `Linear`, so LoRA adapters and quantized
kernels (jft/peft) only ever need to change this one module: `_kernel()` is
the seam that returns the float kernel the matmul uses.

Init: kernels and embeddings use a plain (untruncated) normal with
stddev 0.02, as Hugging Face's `initializer_range`; biases are zeros and norm
scales ones. Every param carries logical axis names for sharding.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

INIT_STDDEV = 0.02
default_init = nn.initializers.normal(stddev=INIT_STDDEV)


class Linear(nn.Module):
  """`y = x @ kernel (+ bias)` with a 2-D kernel [in, out].

  Attributes:
    features: output size (heads are flattened into it by the caller).
    kernel_axes: logical axis names of the kernel, (in, out).
    use_bias: add a bias, named by the out axis.
    dtype: compute dtype; input and kernel are cast to it.
    param_dtype: storage dtype of kernel and bias.
    out_dtype: dtype of the matmul result (default: `dtype`). The LM head uses
      float32 so logits are accumulated and returned in full precision.
  """

  features: int
  kernel_axes: tuple[str, str]
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  out_dtype: Dtype | None = None
  kernel_init: Any = default_init

  def _kernel(self, in_features: int) -> jax.Array:
    """Returns the float kernel [in, out]; the seam for LoRA / quantization."""
    return self.param(
      "kernel",
      nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
      (in_features, self.features),
      self.param_dtype,
    )

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    out_dtype = self.out_dtype or self.dtype
    kernel = self._kernel(x.shape[-1]).astype(self.dtype)  # [in, out]
    y = jax.lax.dot_general(
      x.astype(self.dtype),
      kernel,
      (((x.ndim - 1,), (0,)), ((), ())),
      preferred_element_type=out_dtype,
    )  # [..., out]
    if self.use_bias:
      bias = self.param(
        "bias",
        nn.with_logical_partitioning(
          nn.initializers.zeros_init(), (self.kernel_axes[1],)
        ),
        (self.features,),
        self.param_dtype,
      )
      y = y + bias.astype(out_dtype)
    return y.astype(out_dtype)


class Embed(nn.Module):
  """Token embedding [V, D]; `attend` reuses it as a tied LM head."""

  vocab_size: int
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.embedding = self.param(
      "embedding",
      nn.with_logical_partitioning(default_init, ("vocab", "embed")),
      (self.vocab_size, self.features),
      self.param_dtype,
    )

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """Tied logits `x @ embedding.T`, accumulated in float32."""
    return jnp.einsum(
      "btd,vd->btv",
      x.astype(self.dtype),
      self.embedding.astype(self.dtype),
      preferred_element_type=jnp.float32,
    )  # [B, T, V]


class RMSNorm(nn.Module):
  """RMSNorm with float32 math (as HF Llama), output in `dtype`."""

  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param(
      "scale",
      nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
      (x.shape[-1],),
      self.param_dtype,
    )
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(var + self.eps)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


def rope_cos_sin(
  positions: jax.Array, head_dim: int, theta: float
) -> tuple[jax.Array, jax.Array]:
  """cos/sin tables [B, T, head_dim] in float32 (HF Llama layout)."""
  inv_freq = 1.0 / (
    theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  )  # [Dh/2]
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, Dh]
  return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x: jax.Array) -> jax.Array:
  """[x1, x2] -> [-x2, x1] over the two halves of the last axis."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates x [B, T, N, Dh] by cos/sin [B, T, Dh]; float32 math."""
  x32 = x.astype(jnp.float32)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [B, T, 1, Dh]
  return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)
