"""The model's configuration: shape, family traits, numerics, PEFT options.

`TransformerConfig` is frozen and hashable (a static jit argument);
`config_from_dict` builds one from a preset plus fields, `config_to_dict`
writes one for `config.json`. What each field does is in
`jft/models/transformer.py`'s docstring.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jft.models import rope
from jft.models.presets import PRESETS
from jft.peft import options as peft_options

_DTYPES = ("float32", "bfloat16", "float16")
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3")
MLP_ACTS = ("silu", "gelu_tanh")
LAYER_TYPES = ("full", "sliding")
HEADS = ("lm", "score", "lm+value")

# The fused LM head's chunk: at most this many float32 logits (tokens x
# vocab) at once, 256 MiB; ref-5M's whole batch (2048 x 4096) is one chunk.
LOGITS_CHUNK = 2**26

REMAT_POLICIES = {
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
  `logits_chunk` > 0: losses that need only the targets' log-probs (CLM,
  SFT, MLM) run the LM head fused with the log-softmax
  (`jft.models.head_loss`), holding at most this many float32 logits
  (tokens x vocab, over the global batch) at once; 0: full [B, T, V]
  logits, as `__call__` without targets returns them. Same numbers either
  way (to float rounding). `attention_vjp`: the attention core's
  hand-written backward (`jft.models.attend`), 0.84x (bf16) to 0.89x
  (float32) the ref-5M step on CPU; gradients equal autodiff's to float
  rounding, but rounding is enough to move a small model that sits on an
  edge (README, "Speed"), so it is opt-in and the default stays
  bit-identical to earlier runs.
  `mlp_vjp`: the same for the gated MLP's activation (`jft.models.gated`),
  0.91x the bf16 step (0.91-1.00x in float32). `scan_unroll`: layers per
  iteration of the scanned stack's loop (`nn.scan`'s `unroll`); 0 (the
  default) = every layer when `remat='none'` (no loop: XLA sees constant layer
  indices, and the stacked residuals are written and read without dynamic
  slices; the ref-5M step 0.82-0.87x, the same numbers up to float rounding,
  the same param tree; float32 LoRA on the 50M base: 1.04-1.08x and more
  scratch; compile time grows with depth), and 1 with remat or 4-bit kernels:
  a rolled loop, whose recomputed forward XLA cannot merge back, and whose
  memory plan holds one layer's expanded 4-bit kernels (unrolled, XLA expanded
  them early: 2.3x the QLoRA test model's scratch). `family`
  names the Hugging Face architecture the model exports as. `layer_types`
  gives each layer 'full' or 'sliding' attention; empty means every layer
  slides when `sliding_window` is set (Mistral), else none does.
  """

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  mlp_dim: int
  head_dim: int | None = None
  family: str = "llama"
  rope_theta: float = 10000.0
  rope_scaling: rope.RopeScaling = rope.DEFAULT
  rope_local_theta: float | None = None
  max_position_embeddings: int | None = None
  norm_eps: float = 1e-5
  norm_plus_one: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  qk_norm: bool = False
  mlp_act: str = "silu"
  sandwich_norm: bool = False
  embed_scale: bool = False
  query_pre_attn_scalar: float | None = None
  attn_softcap: float | None = None
  final_softcap: float | None = None
  sliding_window: int | None = None
  layer_types: tuple = ()
  tie_embeddings: bool = False
  causal: bool = True
  head: str = "lm"  # lm | score (reward model) | lm+value (PPO policy)
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = True
  scan_unroll: int = 0
  remat: str = "none"
  logits_chunk: int = LOGITS_CHUNK
  attention_vjp: bool = False
  mlp_vjp: bool = False
  peft: peft_options.PeftOptions = peft_options.NONE

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
    if not isinstance(self.logits_chunk, int) or self.logits_chunk < 0:
      raise ValueError(
        f"logits_chunk must be an int >= 0, got {self.logits_chunk!r}"
      )
    if not isinstance(self.scan_unroll, int) or self.scan_unroll < 0:
      raise ValueError(
        f"scan_unroll must be an int >= 0 (0: all layers without remat), "
        f"got {self.scan_unroll!r}"
      )
    if self.remat not in REMAT_POLICIES:
      raise ValueError(
        f"remat must be one of {tuple(REMAT_POLICIES)}, got {self.remat!r}"
      )
    if self.family not in FAMILIES:
      raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
    if self.head not in HEADS:
      raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
    if self.mlp_act not in MLP_ACTS:
      raise ValueError(
        f"mlp_act must be one of {MLP_ACTS}, got {self.mlp_act!r}"
      )
    types = _as_layer_types(self.layer_types)
    object.__setattr__(self, "layer_types", types)
    if types and len(types) != self.n_layers:
      raise ValueError(
        f"layer_types has {len(types)} entries for {self.n_layers} layers"
      )
    if "sliding" in types and not self.sliding_window:
      raise ValueError("layer_types has 'sliding' layers but no sliding_window")
    if self.sliding_window is not None and self.sliding_window <= 0:
      raise ValueError(
        f"sliding_window must be positive: {self.sliding_window}"
      )
    scaling = _as_rope_scaling(self.rope_scaling)
    object.__setattr__(self, "rope_scaling", scaling)
    if scaling.kind == "dynamic" and not self.max_position_embeddings:
      raise ValueError("dynamic RoPE scaling needs max_position_embeddings")
    object.__setattr__(self, "peft", peft_options.from_dict(self.peft))

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

  @property
  def unroll(self) -> int:
    """Layers per loop iteration of the scanned stack (`scan_unroll`)."""
    if self.scan_unroll:
      return min(self.scan_unroll, self.n_layers)
    rolled = self.remat != "none" or self.peft.quant_kind
    return 1 if rolled else self.n_layers

  @property
  def sliding_layers(self) -> tuple[bool, ...]:
    """Per layer: does it attend through the sliding window?"""
    if self.layer_types:
      return tuple(t == "sliding" for t in self.layer_types)
    return (self.sliding_window is not None,) * self.n_layers


def _as_layer_types(value) -> tuple[str, ...]:
  """'sliding,full' / HF 'sliding_attention' lists -> ('sliding', 'full')."""
  if not value:
    return ()
  if isinstance(value, str):
    value = [v.strip() for v in value.split(",") if v.strip()]
  out = []
  for v in value:
    v = {"sliding_attention": "sliding", "full_attention": "full"}.get(v, v)
    if v not in LAYER_TYPES:
      raise ValueError(f"layer_types: unknown {v!r}; expected {LAYER_TYPES}")
    out.append(v)
  return tuple(out)


def _as_rope_scaling(value) -> rope.RopeScaling:
  """RopeScaling from itself, a dict (ours or HF's) or a JSON string."""
  if isinstance(value, rope.RopeScaling):
    return value
  if isinstance(value, str):
    value = json.loads(value) if value.strip() else None
  if value and "kind" in value:
    return rope.RopeScaling(**value)
  return rope.from_hf(value, where="model.rope_scaling")


_FIELDS = {f.name for f in dataclasses.fields(TransformerConfig)}


def config_from_dict(d: Mapping[str, Any]) -> TransformerConfig:
  """Builds a config from `{'preset': name or '', **fields}`.

  A field set to None takes the preset's value (or the dataclass default);
  unknown keys raise, naming the key, so a typo never passes silently.
  """
  d = _from_legacy(dict(d))
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


def _from_legacy(d: dict) -> dict:
  """config.json of runs made before the options were nested (flat
  `lora_*` / `quant_*` fields) -> `peft`, so those runs still load."""
  flat = [f.name for f in dataclasses.fields(peft_options.PeftOptions)]
  old = {k: d.pop(k) for k in flat if k in d}
  if old and "peft" not in d:
    d["peft"] = old
  return d


def config_to_dict(cfg: TransformerConfig) -> dict[str, Any]:
  """JSON-ready fields (nested options as dicts); `config_from_dict` reads
  them back to an equal config."""
  out = dataclasses.asdict(cfg)
  out["layer_types"] = list(cfg.layer_types)
  out["peft"]["quant_table"] = [list(r) for r in cfg.peft.quant_table]
  return out
