"""Decoder-only transformer (Llama / Qwen2 / SmolLM family), causal or not.

Pre-norm residual blocks of grouped-query attention with RoPE and a SwiGLU
MLP; final RMSNorm; tied or untied LM head. Inputs may be packed: tokens
attend only within their segment (segment id 0 = padding), and RoPE uses the
`positions` input, which restarts per packed document.

Param tree (scanned): `embed/embedding` [V, D], `layers/{attn_norm,mlp_norm}/
scale` [L, D], `layers/attn/{q,k,v,o}/kernel`, `layers/mlp/{gate,up,down}/
kernel`, `final_norm/scale`, `lm_head/kernel` [D, V] (untied only). With
`scan_layers=False` the stack is `layers_0 ...` without the leading L axis.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jft.models import layers
from jft.models.presets import PRESETS

# Large negative, finite: fully masked rows give a uniform softmax, not NaN.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

_DTYPES = ("float32", "bfloat16", "float16")

# Logical axes of the residual stream [B, T, D]. Under `sharding.
# with_mesh_rules` (train.py) they pin it to the batch axes between blocks,
# so XLA never keeps a replicated copy; elsewhere they are no-ops.
ACTIVATION_AXES = ("batch", "length", "embed")

_REMAT_POLICIES = {
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.checkpoint_dots,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Model shape and numerics; frozen and hashable (usable as a static arg).

  `dtype` is the compute dtype (activations and kernels are cast to it),
  `param_dtype` the storage dtype. `remat` is one of 'none', 'full', 'dots',
  'dots_no_batch' (jax.checkpoint_policies applied per block).
  """

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  mlp_dim: int
  head_dim: int | None = None
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  qkv_bias: bool = False
  tie_embeddings: bool = False
  causal: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = True
  remat: str = "none"
  # PEFT (see jft/peft): LoRA adapters on the Linear layers whose module path
  # (e.g. `layers/attn/q`) fully matches `lora_targets`; 4-bit frozen kernels
  # where the first `(regex, 'quantize'|'float')` row of `quant_table` that
  # matches the kernel path (e.g. `layers/attn/q/kernel`) says 'quantize'.
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0
  lora_rslora: bool = False
  lora_targets: str = ""
  quant_kind: str = ""  # '' | 'int4' | 'nf4'
  quant_table: tuple = ()
  quant_block_size: int = 64
  quant_double: bool = False

  def __post_init__(self):
    for name in (
      "vocab_size",
      "d_model",
      "n_layers",
      "n_heads",
      "n_kv_heads",
      "mlp_dim",
    ):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
        f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
        f"({self.n_kv_heads})"
      )
    if self.head_dim is None:
      if self.d_model % self.n_heads:
        raise ValueError(
          f"head_dim is None but d_model ({self.d_model}) is not divisible "
          f"by n_heads ({self.n_heads}); set head_dim"
        )
      object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
    if self.head_dim <= 0 or self.head_dim % 2:
      raise ValueError(
        f"head_dim must be positive and even (RoPE halves), got {self.head_dim}"
      )
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ValueError(
          f"{name} must be one of {_DTYPES}, got {getattr(self, name)!r}"
        )
    if self.remat not in _REMAT_POLICIES:
      raise ValueError(
        f"remat must be one of {tuple(_REMAT_POLICIES)}, got {self.remat!r}"
      )

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)


_FIELDS = {f.name for f in dataclasses.fields(TransformerConfig)}


def config_from_dict(d: Mapping[str, Any]) -> TransformerConfig:
  """Builds a config from `{'preset': name or '', **fields}`.

  A field set to None takes the preset's value (or the dataclass default);
  unknown keys raise, naming the key, so a typo never passes silently.
  """
  d = dict(d)
  preset = d.pop("preset", "") or ""
  if preset and preset not in PRESETS:
    raise ValueError(
      f"unknown model preset {preset!r}; known: {sorted(PRESETS)}"
    )
  unknown = sorted(set(d) - _FIELDS)
  if unknown:
    raise ValueError(
      f"unknown model config key(s) {unknown}; known: {sorted(_FIELDS)}"
    )
  kwargs = dict(PRESETS[preset]) if preset else {}
  kwargs.update({k: v for k, v in d.items() if v is not None})
  required = {
    f.name
    for f in dataclasses.fields(TransformerConfig)
    if f.default is dataclasses.MISSING
  }
  missing = sorted(required - set(kwargs))
  if missing:
    raise ValueError(
      f"model config is missing {missing} (no preset {preset!r} value)"
    )
  return TransformerConfig(**kwargs)


def peft_options(cfg: TransformerConfig) -> layers.PeftOptions:
  return layers.PeftOptions(
    lora_rank=cfg.lora_rank,
    lora_alpha=cfg.lora_alpha,
    lora_dropout=cfg.lora_dropout,
    lora_rslora=cfg.lora_rslora,
    lora_targets=cfg.lora_targets,
    quant_kind=cfg.quant_kind,
    quant_table=tuple(tuple(r) for r in cfg.quant_table),
    quant_block_size=cfg.quant_block_size,
    quant_double=cfg.quant_double,
  )


def _linear(
  cfg: TransformerConfig,
  features,
  axes,
  name,
  use_bias=False,
  deterministic=True,
  **kw,
):
  return layers.Linear(
    features,
    axes,
    use_bias=use_bias,
    dtype=cfg.compute_dtype,
    param_dtype=cfg.weight_dtype,
    peft=peft_options(cfg),
    deterministic=deterministic,
    name=name,
    **kw,
  )


def attention_mask(segment_ids: jax.Array, causal: bool) -> jax.Array:
  """Boolean mask [B, 1, 1, T, S]: same segment and (if causal) k <= q.

  The causal part uses the index in the row, not `positions`, so packed
  documents with restarted positions stay causal.
  """
  mask = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, S]
  if causal:
    t = segment_ids.shape[1]
    mask = mask & jnp.tril(jnp.ones((t, t), dtype=bool))[None]
  return mask[:, None, None]  # [B, 1, 1, T, S]


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE; softmax in float32."""

  config: TransformerConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, positions, segment_ids):
    cfg = self.config
    b, t, _ = x.shape
    h, kv, dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    bias, det = cfg.qkv_bias, self.deterministic
    q = _linear(cfg, h * dh, ("embed", "heads"), "q", bias, det)(x)
    k = _linear(cfg, kv * dh, ("embed", "kv"), "k", bias, det)(x)
    v = _linear(cfg, kv * dh, ("embed", "kv"), "v", bias, det)(x)
    # q [B, T, H*Dh]; k, v [B, T, KV*Dh]
    q = q.reshape(b, t, h, dh)
    k = k.reshape(b, t, kv, dh)
    v = v.reshape(b, t, kv, dh)

    cos, sin = layers.rope_cos_sin(positions, dh, cfg.rope_theta)
    q = layers.apply_rope(q, cos, sin)
    k = layers.apply_rope(k, cos, sin)

    # GQA without materialising repeated kv: query head h uses kv head
    # h // (H // KV), as HF `repeat_kv`.
    q = q.reshape(b, t, kv, h // kv, dh)  # [B, T, KV, G, Dh]
    scores = jnp.einsum(
      "btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32
    )  # [B, KV, G, T, S]
    scores = scores / np.sqrt(dh).astype(np.float32)
    mask = attention_mask(segment_ids, cfg.causal)  # [B, 1, 1, T, S]
    scores = jnp.where(mask, scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(cfg.compute_dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)  # [B, T, KV, G, Dh]
    out = out.reshape(b, t, h * dh)  # [B, T, H*Dh]
    return _linear(cfg, cfg.d_model, ("heads", "embed"), "o", False, det)(out)


class Mlp(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  config: TransformerConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x):
    cfg, det = self.config, self.deterministic
    gate = _linear(cfg, cfg.mlp_dim, ("embed", "mlp"), "gate", False, det)(x)
    up = _linear(cfg, cfg.mlp_dim, ("embed", "mlp"), "up", False, det)(x)
    hidden = nn.silu(gate) * up  # [B, T, F]
    return _linear(cfg, cfg.d_model, ("mlp", "embed"), "down", False, det)(
      hidden
    )


class Block(nn.Module):
  """Pre-norm residual block; `(x, None)` output so it can be scanned."""

  config: TransformerConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, positions, segment_ids):
    cfg, det = self.config, self.deterministic
    norm = lambda name: layers.RMSNorm(
      cfg.norm_eps, cfg.compute_dtype, cfg.weight_dtype, name=name
    )
    h = norm("attn_norm")(x)
    x = x + Attention(cfg, det, name="attn")(h, positions, segment_ids)
    h = norm("mlp_norm")(x)
    x = x + Mlp(cfg, det, name="mlp")(h)
    x = nn.with_logical_constraint(x, ACTIVATION_AXES)  # [B, T, D]
    return x, None


class Transformer(nn.Module):
  """Token ids [B, T] -> float32 logits [B, T, V]."""

  config: TransformerConfig

  @nn.compact
  def __call__(
    self,
    tokens: jax.Array,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    *,
    deterministic: bool = True,
  ) -> jax.Array:
    """`deterministic=False` enables LoRA dropout (needs a 'dropout' rng)."""
    cfg = self.config
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), dtype=jnp.int32)

    embed = layers.Embed(
      cfg.vocab_size,
      cfg.d_model,
      cfg.compute_dtype,
      cfg.weight_dtype,
      name="embed",
    )
    x = embed(tokens)  # [B, T, D]
    x = nn.with_logical_constraint(x, ACTIVATION_AXES)

    block = Block
    policy = _REMAT_POLICIES[cfg.remat]
    if cfg.remat != "none":
      block = nn.remat(block, policy=policy, prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      stack = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast),
        length=cfg.n_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )(cfg, deterministic, name="layers")
      x, _ = stack(x, positions, segment_ids)
    else:
      for i in range(cfg.n_layers):
        x, _ = block(cfg, deterministic, name=f"layers_{i}")(
          x, positions, segment_ids
        )

    x = layers.RMSNorm(
      cfg.norm_eps, cfg.compute_dtype, cfg.weight_dtype, name="final_norm"
    )(x)
    if cfg.tie_embeddings:
      return embed.attend(x)  # [B, T, V]
    head = _linear(
      cfg,
      cfg.vocab_size,
      ("embed", "vocab"),
      "lm_head",
      deterministic=deterministic,
      out_dtype=jnp.float32,
    )
    return head(x)  # [B, T, V] float32


def param_count(params) -> int:
  """Number of scalars in a (possibly boxed or abstract) param tree."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def param_bytes(params) -> int:
  """Bytes held by a param tree, at each leaf's own dtype."""
  return int(
    sum(
      np.prod(x.shape) * jnp.dtype(x.dtype).itemsize
      for x in jax.tree.leaves(params)
    )
  )
