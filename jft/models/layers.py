"""Building blocks: the one dense layer, embeddings and RMSNorm.

Every projection in the model is a `Linear`, so LoRA adapters and quantized
kernels (jft/peft) only ever need to change this one module: `_kernel()` is
the seam that returns the float kernel the matmul uses. Its matmuls (the
kernel's and LoRA's A and B) are `jft.models.matmul.dense`: autodiff's
numbers with a backward pass in the dot layouts XLA:CPU runs fast.

Init: kernels and embeddings use a plain (untruncated) normal with
stddev 0.02, as Hugging Face's `initializer_range`; biases are zeros and norm
scales ones. Every param carries logical axis names for sharding.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jft.models import matmul
from jft.peft import quant
from jft.peft.options import PeftOptions

Dtype = Any

INIT_STDDEV = 0.02
default_init = nn.initializers.normal(stddev=INIT_STDDEV)


# Axes of the 4-bit leaves: the packed codes shard like the kernel; scales are
# few along K (K / block_size rows), so only their out axis is sharded.
def _quant_axes(kernel_axes):
  return {
    "packed": kernel_axes,
    "scale": (None, kernel_axes[1]),
    "scale_codes": (None, kernel_axes[1]),
    "scale_scale": (None,),
    "scale_offset": (),
  }


# PEFT's default A init (kaiming-uniform, a=sqrt(5)): U(-1/sqrt(in), ..).
lora_a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


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
  peft: PeftOptions = PeftOptions()
  deterministic: bool = True

  @property
  def _quantized(self) -> bool:
    return self.peft.quantized("/".join(self.path) + "/kernel")

  def _stored_kernel(self, in_features: int):
    """The kernel as stored: [in, out] in the compute dtype, or 4-bit.

    A 4-bit kernel is stored as `kernel_packed` (uint8, two codes a byte) plus
    `kernel_scale*` leaves and dequantized here, inside the jitted step, so
    XLA fuses it into the matmul. Its init is zeros: real values come from
    quantizing a float base (`jft.peft.quant.quantize_params`).
    """
    p = self.peft
    path = "/".join(self.path)
    if not self._quantized:
      kernel = self.param(
        "kernel",
        nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
        (in_features, self.features),
        self.param_dtype,
      )
      return kernel.astype(self.dtype)
    if in_features % p.quant_block_size or in_features % 2:
      raise ValueError(
        f"{path}/kernel: contraction dim {in_features} is not divisible by "
        f"config.quant.block_size={p.quant_block_size}; pick a block size "
        "that divides it or keep this kernel float in config.quant.table"
      )
    shapes = quant.quantized_shapes(
      (in_features, self.features),
      block_size=p.quant_block_size,
      double_quant=p.quant_double,
    )
    axes = _quant_axes(self.kernel_axes)
    q = {
      name: self.param(
        f"kernel_{name}",
        nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[name]),
        shape,
        dtype,
      )
      for name, (shape, dtype) in shapes.items()
    }
    return q

  def _dequant_fn(self):
    """The 4-bit kernel's expansion to the compute dtype (hashable)."""
    p = self.peft
    return functools.partial(
      quant.dequantize,
      kind=p.quant_kind,
      block_size=p.quant_block_size,
      dtype=jnp.dtype(self.dtype),
    )

  def _kernel(self, in_features: int) -> jax.Array:
    """The kernel [in, out] in the compute dtype (4-bit: dequantized)."""
    stored = self._stored_kernel(in_features)
    if self._quantized:
      return self._dequant_fn()(stored)
    return stored

  def _lora(self, x: jax.Array, out_dtype) -> jax.Array:
    """scale * dropout(x) @ A @ B, adapters kept in float32."""
    p = self.peft
    a = self.param(
      "lora_a",
      nn.with_logical_partitioning(lora_a_init, (self.kernel_axes[0], None)),
      (x.shape[-1], p.lora_rank),
      jnp.float32,
    )  # [in, r]
    b = self.param(
      "lora_b",
      nn.with_logical_partitioning(
        nn.initializers.zeros_init(), (None, self.kernel_axes[1])
      ),
      (p.lora_rank, self.features),
      jnp.float32,
    )  # [r, out]
    if p.lora_dropout > 0:
      x = nn.Dropout(p.lora_dropout)(x, deterministic=self.deterministic)
    h = matmul.dense(x.astype(self.dtype), a.astype(self.dtype))  # [..., r]
    y = matmul.dense(h, b.astype(self.dtype))  # [..., out]
    return (p.lora_scale * y).astype(out_dtype)

  @nn.compact
  def __call__(self, x: jax.Array, *, head_fn=None) -> jax.Array:
    """`x [..., in] -> [..., out]`; see the class docstring.

    `head_fn(x, kernel, kernel_grad)`, when given, replaces the matmul: it
    gets x and the kernel [in, out] in the compute dtype, and whether the
    kernel takes gradients (not a 4-bit one), and its result is returned as
    is. The LM head's fused loss uses it, so that [..., vocab] logits are
    never formed. Not with a bias or LoRA.
    """
    out_dtype = self.out_dtype or self.dtype
    frozen = self._quantized  # 4-bit codes: no gradient to give the kernel
    if head_fn is not None:
      if self.use_bias or self.peft.lora_on("/".join(self.path)):
        raise ValueError(f"{self.path}: head_fn with a bias or LoRA")
      kernel = self._kernel(x.shape[-1])  # [in, out]
      return head_fn(x.astype(self.dtype), kernel, not frozen)
    if frozen:  # expanded in the forward and again in the backward
      y = matmul.dense_frozen(
        x.astype(self.dtype),
        self._stored_kernel(x.shape[-1]),
        self._dequant_fn(),
        out_dtype,
      )  # [..., out]
    else:
      y = matmul.dense(
        x.astype(self.dtype), self._stored_kernel(x.shape[-1]), out_dtype
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
    if self.peft.lora_on("/".join(self.path)):
      y = y + self._lora(x, out_dtype)
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
    table = self.embedding.astype(self.dtype)  # [V, D]
    return matmul.dense(
      x.astype(self.dtype), table, jnp.float32, transpose_w=True
    )  # [B, T, V]

  def table(self) -> jax.Array:
    """The embedding [V, D] in the compute dtype (a tied head's kernel)."""
    return self.embedding.astype(self.dtype)


class RMSNorm(nn.Module):
  """RMSNorm with float32 math, output in `dtype`.

  `plus_one` is Gemma's variant: the scale is `1 + w` (w initialised to 0),
  as HF's GemmaRMSNorm computes it, in float32.
  """

  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  plus_one: bool = False
  axis_name: str | None = "embed"  # None: replicated (per-head norms)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = (
      nn.initializers.zeros_init()
      if self.plus_one
      else (nn.initializers.ones_init())
    )
    scale = self.param(
      "scale",
      nn.with_logical_partitioning(init, (self.axis_name,)),
      (x.shape[-1],),
      self.param_dtype,
    )
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(var + self.eps)
    scale = scale.astype(jnp.float32)
    if self.plus_one:
      scale = 1.0 + scale
    return (y * scale).astype(self.dtype)
