"""Decoder-only transformer for the Llama, Mistral, Qwen2/3 and Gemma 1-3
families (one module; the families differ only in config fields).

Pre-norm residual blocks of grouped-query attention with RoPE and a gated
MLP; final RMSNorm; tied or untied LM head. What the families add:

  Llama 3.x   RoPE scaling (`rope_scaling`: linear, dynamic, llama3, yarn)
  Mistral     sliding-window attention (`sliding_window`)
  Qwen2       q/k/v biases (`qkv_bias`); Qwen3: q/k RMSNorm (`qk_norm`)
  Gemma       GeGLU (`mlp_act='gelu_tanh'`), `(1 + w)` RMSNorm
              (`norm_plus_one`), embeddings * sqrt(d_model) (`embed_scale`)
  Gemma 2     norms after attention and MLP too (`sandwich_norm`), score
              scale `query_pre_attn_scalar**-0.5`, tanh soft-capping of
              attention scores and final logits, alternating sliding layers
              (`layer_types`)
  Gemma 3     q/k norm, and a separate RoPE base for sliding layers
              (`rope_local_theta`); global layers keep `rope_scaling`

Given `targets`, the forward returns each target's log-prob instead of
logits (`head_loss.TokenScores`), through the LM head fused with the
log-softmax: CLM, SFT and MLM losses hold at most `config.logits_chunk`
float32 logits (and their gradient) at a time, never [B, T, V] log-probs.

Inputs may be packed: tokens attend only within their segment (segment id 0
= padding), and RoPE uses the `positions` input, which restarts per packed
document. With a KV cache (`init_cache`), the same forward appends the new
tokens' keys and values at `cache['index']` and attends over the cache, so
decoding runs one prefill and then one-token steps.

Param tree (scanned): `embed/embedding` [V, D], `layers/{attn_norm,mlp_norm}/
scale` [L, D], `layers/attn/{q,k,v,o}/kernel`, `layers/mlp/{gate,up,down}/
kernel`, `final_norm/scale`, `lm_head/kernel` [D, V] (untied only); with
`qk_norm` `layers/attn/{q,k}_norm/scale` [L, Dh]; with `sandwich_norm`
`layers/{post_attn,post_mlp}_norm/scale`. With `scan_layers=False` the stack
is `layers_0 ...` without the leading L axis.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jft.models import attend, gated, head_loss, layers, rope
from jft.models.config import (  # noqa: F401 (re-exported: the model's API)
  FAMILIES,
  REMAT_POLICIES,
  TransformerConfig,
  config_from_dict,
  config_to_dict,
)

# Logical axes of the residual stream [B, T, D]. Under `sharding.
# with_mesh_rules` (train.py) they pin it to the batch axes between blocks,
# so XLA never keeps a replicated copy; elsewhere they are no-ops.
ACTIVATION_AXES = ("batch", "length", "embed")


def _linear(cfg, features, axes, name, use_bias=False, det=True, **kw):
  return layers.Linear(
    features,
    axes,
    use_bias=use_bias,
    dtype=cfg.compute_dtype,
    param_dtype=cfg.weight_dtype,
    peft=cfg.peft,
    deterministic=det,
    name=name,
    **kw,
  )


def _norm(cfg, name, axis_name="embed"):
  return layers.RMSNorm(
    cfg.norm_eps,
    cfg.compute_dtype,
    cfg.weight_dtype,
    plus_one=cfg.norm_plus_one,
    axis_name=axis_name,
    name=name,
  )


def attention_mask(
  seg_q: jax.Array,
  seg_k: jax.Array | None = None,
  *,
  causal: bool = True,
  q_slots: jax.Array | None = None,
  window: int | None = None,
) -> jax.Array:
  """Boolean mask [B, 1, 1, T, S]: same segment, (if causal) key slot <=
  query slot, and (with a window) fewer than `window` slots apart.

  Slots are indices in the row (or the cache), not `positions`, so packed
  documents with restarted positions stay causal. Queries sit at slots
  `q_slots` [T] (default 0..T-1); keys at 0..S-1.
  """
  seg_k = seg_q if seg_k is None else seg_k
  t, s = seg_q.shape[1], seg_k.shape[1]
  q_slots = jnp.arange(t) if q_slots is None else q_slots
  k_slots = jnp.arange(s)
  mask = seg_q[:, :, None] == seg_k[:, None, :]  # [B, T, S]
  dist = q_slots[:, None] - k_slots[None, :]  # [T, S]
  if causal:
    mask = mask & (dist >= 0)[None]
  if window:
    mask = mask & (jnp.abs(dist) < window)[None]
  return mask[:, None, None]  # [B, 1, 1, T, S]


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE; softmax in float32.

  `cache` is this layer's `(k, v)` [B, S, KV, Dh] or None; with a cache the
  new keys/values are written at slot `index` and returned.
  """

  config: TransformerConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, cos, sin, mask, cache=None, index=None):
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
    if cfg.qk_norm:  # per head, before RoPE (Qwen3, Gemma 3)
      q = _norm(cfg, "q_norm", None)(q)
      k = _norm(cfg, "k_norm", None)(k)
    q = rope.apply(q, cos, sin)
    k = rope.apply(k, cos, sin)
    new_cache = None
    if cache is not None:
      k_all, v_all = cache  # [B, S, KV, Dh]
      start = (0, index, 0, 0)
      k = jax.lax.dynamic_update_slice(k_all, k.astype(k_all.dtype), start)
      v = jax.lax.dynamic_update_slice(v_all, v.astype(v_all.dtype), start)
      new_cache = (k, v)
      k, v = k.astype(cfg.compute_dtype), v.astype(cfg.compute_dtype)

    # GQA without materialising repeated kv: query head h uses kv head
    # h // (H // KV), as HF `repeat_kv`.
    q = q.reshape(b, t, kv, h // kv, dh)  # [B, T, KV, G, Dh]
    if cfg.query_pre_attn_scalar:  # Gemma 2/3
      scale = ("mul", cfg.query_pre_attn_scalar**-0.5)
    else:
      scale = ("div", np.sqrt(dh))
    out = attend.attend(
      q,
      k,
      v,
      mask,
      scale=scale,
      softcap=cfg.attn_softcap or None,
      vjp=cfg.attention_vjp,
    )  # [B, T, KV, G, Dh]
    out = out.reshape(b, t, h * dh)  # [B, T, H*Dh]
    o = _linear(cfg, cfg.d_model, ("heads", "embed"), "o", cfg.o_bias, det)
    return o(out), new_cache


class Mlp(nn.Module):
  """Gated MLP: down(act(gate(x)) * up(x)); SwiGLU or GeGLU (tanh GELU)."""

  config: TransformerConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x):
    cfg, det = self.config, self.deterministic
    gate = _linear(cfg, cfg.mlp_dim, ("embed", "mlp"), "gate", False, det)(x)
    up = _linear(cfg, cfg.mlp_dim, ("embed", "mlp"), "up", False, det)(x)
    hidden = gated.gated(gate, up, cfg.mlp_act, cfg.mlp_vjp)  # [B, T, F]
    down = _linear(cfg, cfg.d_model, ("mlp", "embed"), "down", False, det)
    return down(hidden)


class Block(nn.Module):
  """Pre-norm residual block; `(x, new_kv)` output so it can be scanned.

  `shared` holds what every layer uses (RoPE tables, masks, the cache
  index); `layer` what differs per layer (its sliding flag and KV cache).
  """

  config: TransformerConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, shared, layer):
    cfg, det = self.config, self.deterministic
    sliding = layer["sliding"]  # [] bool

    def pick(name):  # the sliding layers' variant, where there is one
      if f"{name}_local" not in shared:
        return shared[name]
      return jnp.where(sliding, shared[f"{name}_local"], shared[name])

    kv = (layer["k"], layer["v"]) if "k" in layer else None
    h = _norm(cfg, "attn_norm")(x)
    a, new_kv = Attention(cfg, det, name="attn")(
      h, pick("cos"), pick("sin"), pick("mask"), kv, shared.get("index")
    )
    if cfg.sandwich_norm:
      a = _norm(cfg, "post_attn_norm")(a)
    x = x + a
    h = _norm(cfg, "mlp_norm")(x)
    m = Mlp(cfg, det, name="mlp")(h)
    if cfg.sandwich_norm:
      m = _norm(cfg, "post_mlp_norm")(m)
    x = x + m
    x = nn.with_logical_constraint(x, ACTIVATION_AXES)  # [B, T, D]
    return x, new_kv


def init_cache(
  cfg: TransformerConfig, batch: int, length: int, dtype=None
) -> dict[str, jax.Array]:
  """An empty KV cache for `batch` rows of up to `length` tokens.

  `k`/`v` [L, B, S, KV, Dh] in the compute dtype (or `dtype`); `segment_ids`
  [B, S] marks filled slots (0 = empty or padding); `index` is the next
  free slot.
  """
  dtype = cfg.compute_dtype if dtype is None else dtype
  shape = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.head_dim)
  return {
    "k": jnp.zeros(shape, dtype),
    "v": jnp.zeros(shape, dtype),
    "segment_ids": jnp.zeros((batch, length), jnp.int32),
    "index": jnp.zeros((), jnp.int32),
  }


class Transformer(nn.Module):
  """Token ids [B, T] -> float32 logits [B, T, V] (and the updated cache).

  `config.head='score'` returns a scalar per position [B, T] instead (a
  reward model, read at the last token); 'lm+value' returns (logits,
  values [B, T]) (a PPO policy with its value head on the same trunk).
  """

  config: TransformerConfig

  def _shared(self, positions, segment_ids, cache):
    """RoPE tables and masks for every layer (both variants if needed)."""
    cfg = self.config
    sliding = cfg.sliding_layers
    shared = {}
    cos, sin = rope.cos_sin(
      positions,
      cfg.head_dim,
      cfg.rope_theta,
      cfg.rope_scaling,
      cfg.max_position_embeddings,
    )
    if any(sliding) and cfg.rope_local_theta:  # Gemma 3: local RoPE base
      local = rope.cos_sin(positions, cfg.head_dim, cfg.rope_local_theta)
      if all(sliding):
        cos, sin = local
      else:
        shared["cos_local"], shared["sin_local"] = local
    shared["cos"], shared["sin"] = cos, sin
    if cache is None:
      seg_k, q_slots = segment_ids, None
    else:
      index = cache["index"]
      seg_k = jax.lax.dynamic_update_slice(
        cache["segment_ids"], segment_ids.astype(jnp.int32), (0, index)
      )
      q_slots = index + jnp.arange(segment_ids.shape[1])
      shared["index"] = index

    def mask(window):
      return attention_mask(
        segment_ids, seg_k, causal=cfg.causal, q_slots=q_slots, window=window
      )

    if all(sliding):
      shared["mask"] = mask(cfg.sliding_window)
    else:
      shared["mask"] = mask(None)
      if any(sliding):
        shared["mask_local"] = mask(cfg.sliding_window)
    return shared, seg_k

  @nn.compact
  def __call__(
    self,
    tokens: jax.Array,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    *,
    deterministic: bool = True,
    cache: Mapping[str, jax.Array] | None = None,
    targets: jax.Array | None = None,
  ):
    """`deterministic=False` enables LoRA dropout (needs a 'dropout' rng).

    With `cache` (see `init_cache`) returns `(logits, new_cache)`. With
    `targets` [B, T] the LM output is `head_loss.TokenScores` (each
    target's float32 log-prob and whether it is the argmax) instead of
    logits: through the fused chunked head when `config.logits_chunk` > 0
    (at most that many logits at once), else from the plain logits.
    """
    cfg = self.config
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), dtype=jnp.int32)
    shared, seg_k = self._shared(positions, segment_ids, cache)

    embed = layers.Embed(
      cfg.vocab_size,
      cfg.d_model,
      cfg.compute_dtype,
      cfg.weight_dtype,
      name="embed",
    )
    x = embed(tokens)  # [B, T, D]
    if cfg.embed_scale:  # Gemma: the normaliser in the activation dtype
      x = x * jnp.asarray(math.sqrt(cfg.d_model), x.dtype)
    x = nn.with_logical_constraint(x, ACTIVATION_AXES)

    per_layer = {"sliding": jnp.asarray(cfg.sliding_layers)}  # [L]
    if cache is not None:
      per_layer["k"], per_layer["v"] = cache["k"], cache["v"]
    block = Block
    unrolled = not cfg.scan_layers or cfg.unroll == cfg.n_layers
    if cfg.remat != "none":
      block = nn.remat(  # no loop around it: barriers keep XLA from CSE
        block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=unrolled
      )
    if cfg.scan_layers:
      stack = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, 0),
        length=cfg.n_layers,
        unroll=cfg.unroll,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )(cfg, deterministic, name="layers")
      x, new_kv = stack(x, shared, per_layer)
    else:
      outs = []
      for i in range(cfg.n_layers):
        layer_i = jax.tree.map(lambda a, i=i: a[i], per_layer)
        x, kv_i = block(cfg, deterministic, name=f"layers_{i}")(
          x, shared, layer_i
        )
        outs.append(kv_i)
      new_kv = None
      if cache is not None:
        new_kv = jax.tree.map(lambda *a: jnp.stack(a), *outs)

    x = _norm(cfg, "final_norm")(x)
    if cfg.head == "score":
      if targets is not None:
        raise ValueError("targets: the 'score' head has no LM logits")
      out = _scalar_head(cfg, "score", x)  # [B, T]
    else:
      if targets is None:
        out = self._lm_head(embed, x, deterministic)  # [B, T, V]
      else:
        out = self._target_scores(embed, x, targets, deterministic)
      if cfg.head == "lm+value":
        out = (out, _scalar_head(cfg, "value_head", x))  # + [B, T]
    if cache is None:
      return out
    new_cache = {
      "k": new_kv[0],
      "v": new_kv[1],
      "segment_ids": seg_k,
      "index": cache["index"] + t,
    }
    return out, new_cache

  def _head(self, deterministic):
    return _linear(
      self.config,
      self.config.vocab_size,
      ("embed", "vocab"),
      "lm_head",
      det=deterministic,
      out_dtype=jnp.float32,
    )

  def _target_scores(self, embed, x, targets, deterministic):
    """TokenScores of `targets` [B, T]: fused and chunked, or plain."""
    cfg = self.config
    lora_head = cfg.peft.lora_on("lm_head")
    if not cfg.logits_chunk or (lora_head and not cfg.tie_embeddings):
      logits = self._lm_head(embed, x, deterministic)  # [B, T, V]
      return head_loss.plain_token_logps(logits, targets)
    fused = functools.partial(
      head_loss.chunked_token_logps,
      targets=targets,
      chunk=max(1, cfg.logits_chunk // cfg.vocab_size),  # tokens
      softcap=cfg.final_softcap,
      # The logits' gradient meets the kernel in the compute dtype (f32
      # accumulation), as under torch.autocast: bf16 runs keep the head's
      # backward dots on the CPU's bf16 units (tests/test_fastpath.py
      # bounds the error against the float32 model).
      grad_dtype=cfg.compute_dtype,
    )
    if cfg.tie_embeddings:
      x = x.astype(cfg.compute_dtype)
      return fused(x, embed.table(), transposed=True)
    return self._head(deterministic)(
      x, head_fn=lambda x, w, w_grad: fused(x, w, w_grad=w_grad)
    )

  def _lm_head(self, embed, x, deterministic):
    """float32 logits [B, T, V] (tied or not, soft-capped where set)."""
    cfg = self.config
    if cfg.tie_embeddings:
      logits = embed.attend(x)  # [B, T, V]
    else:
      logits = self._head(deterministic)(x)  # [B, T, V] float32
    if cfg.final_softcap:
      cap = cfg.final_softcap
      logits = jnp.tanh(logits / cap) * cap
    return logits


def _scalar_head(cfg, name: str, x) -> jax.Array:
  """One float32 number per position [B, T]: a reward model's score or a
  PPO value (a [D, 1] kernel, no bias, as HF's `score` layer)."""
  y = layers.Linear(
    1,
    ("embed", None),
    dtype=cfg.compute_dtype,
    param_dtype=cfg.weight_dtype,
    out_dtype=jnp.float32,
    name=name,
  )(x)
  return y[..., 0]  # [B, T]


def logits_of(out) -> jax.Array:
  """The LM logits of a forward's output, whatever its head."""
  return out[0] if isinstance(out, tuple) else out


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
