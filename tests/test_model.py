"""Transformer tests: param specs, masking, numpy references, presets."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jft.models import rope
from jft.models.transformer import (
  Attention,
  Transformer,
  TransformerConfig,
  attention_mask,
  config_from_dict,
  param_bytes,
  param_count,
)

B, T = 2, 16
L, D, H, KV, DH, F, V = 2, 64, 4, 2, 16, 128, 512  # the 'tiny' preset


@pytest.fixture(scope="module")
def cfg():
  return config_from_dict({"preset": "tiny"})


@pytest.fixture(scope="module")
def params(cfg):
  tokens = jnp.zeros((B, T), jnp.int32)
  variables = Transformer(cfg).init(jax.random.key(0), tokens)
  return nn.unbox(variables)["params"]


@functools.cache
def _jit_apply(cfg: TransformerConfig):
  """One jitted apply per config, shared across tests (compiles per shape)."""
  model = Transformer(cfg)
  return jax.jit(lambda p, *a: model.apply({"params": p}, *a))


@pytest.fixture(scope="module")
def apply_fn(cfg):
  return _jit_apply(cfg)


def _tokens(seed, shape=(B, T)):
  return jax.random.randint(jax.random.key(seed), shape, 0, V, jnp.int32)


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def _abstract(cfg):
  tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)
  return jax.eval_shape(Transformer(cfg).init, jax.random.key(0), tokens)


# --------------------------------------------------------------- param spec

_BLOCK = {
  "attn/q/kernel": ((D, H * DH), ("embed", "heads")),
  "attn/k/kernel": ((D, KV * DH), ("embed", "kv")),
  "attn/v/kernel": ((D, KV * DH), ("embed", "kv")),
  "attn/o/kernel": ((H * DH, D), ("heads", "embed")),
  "mlp/gate/kernel": ((D, F), ("embed", "mlp")),
  "mlp/up/kernel": ((D, F), ("embed", "mlp")),
  "mlp/down/kernel": ((F, D), ("mlp", "embed")),
  "attn_norm/scale": ((D,), ("embed",)),
  "mlp_norm/scale": ((D,), ("embed",)),
}
_TOP = {
  "embed/embedding": ((V, D), ("vocab", "embed")),
  "final_norm/scale": ((D,), ("embed",)),
  "lm_head/kernel": ((D, V), ("embed", "vocab")),
}


def _expected_spec(scan: bool):
  spec = dict(_TOP)
  for name, (shape, axes) in _BLOCK.items():
    if scan:
      spec[f"layers/{name}"] = ((L, *shape), ("layers", *axes))
    else:
      for i in range(L):
        spec[f"layers_{i}/{name}"] = (shape, axes)
  return spec


@pytest.mark.parametrize("scan", [True, False])
def test_param_spec(cfg, scan):
  cfg = dataclasses.replace(cfg, scan_layers=scan)
  abstract = _abstract(cfg)
  expected = _expected_spec(scan)
  shapes = _flat(nn.unbox(abstract)["params"])
  got = {k: (v.shape, v.dtype) for k, v in shapes.items()}
  assert got == {k: (s, jnp.float32) for k, (s, _) in expected.items()}
  axes = _flat(nn.get_partition_spec(abstract)["params"])
  assert {k: tuple(v) for k, v in axes.items()} == {
    k: a for k, (_, a) in expected.items()
  }


def test_qkv_bias_and_tied_spec(cfg):
  cfg = dataclasses.replace(cfg, qkv_bias=True, tie_embeddings=True)
  abstract = _abstract(cfg)
  shapes = {k: v.shape for k, v in _flat(nn.unbox(abstract)["params"]).items()}
  axes = _flat(nn.get_partition_spec(abstract)["params"])
  assert "lm_head/kernel" not in shapes
  assert shapes["layers/attn/q/bias"] == (L, H * DH)
  assert shapes["layers/attn/k/bias"] == (L, KV * DH)
  assert tuple(axes["layers/attn/v/bias"]) == ("layers", "kv")
  assert "layers/attn/o/bias" not in shapes


def test_bf16_params_and_float32_logits(cfg, params, apply_fn):
  bf16 = dataclasses.replace(cfg, dtype="bfloat16", param_dtype="bfloat16")
  abstract = nn.unbox(_abstract(bf16))["params"]
  dtypes = {v.dtype for v in jax.tree.leaves(abstract)}
  assert dtypes == {jnp.dtype(jnp.bfloat16)}
  n = param_count(abstract)
  assert param_bytes(abstract) == 2 * n
  assert param_bytes(params) == 4 * param_count(params) == 4 * n

  tokens = _tokens(1)
  logits32 = apply_fn(params, tokens)
  assert logits32.dtype == jnp.float32
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  logits16 = _jit_apply(bf16)(p16, tokens)
  assert logits16.dtype == jnp.float32
  assert logits16.shape == (B, T, V)
  # bf16 compute really happens (results differ) but tracks float32.
  assert not np.array_equal(logits16, logits32)
  np.testing.assert_allclose(logits16, logits32, atol=0.05)


# ----------------------------------------------------------------- masking


def test_causality(params, apply_fn):
  t = 7
  tokens = _tokens(2)
  changed = tokens.at[:, t].set((tokens[:, t] + 1) % V)
  a, b = apply_fn(params, tokens), apply_fn(params, changed)
  np.testing.assert_array_equal(a[:, :t], b[:, :t])
  assert np.abs(a[:, t:] - b[:, t:]).max(axis=-1).min() > 1e-4


def test_bidirectional_sees_future(cfg, params):
  apply = _jit_apply(dataclasses.replace(cfg, causal=False))
  tokens = _tokens(2)
  changed = tokens.at[:, 5].set((tokens[:, 5] + 1) % V)
  a, b = apply(params, tokens), apply(params, changed)
  assert np.abs(a[:, :5] - b[:, :5]).max(axis=-1).min() > 1e-4


@pytest.mark.parametrize("causal", [True, False])
def test_packing_matches_separate_documents(cfg, params, causal):
  """Row 0 packs three documents + padding; rows 1-3 hold each one alone."""
  apply = _jit_apply(dataclasses.replace(cfg, causal=causal))
  lengths = [5, 7, 3]  # + 1 padding token = T
  docs = [np.asarray(_tokens(10 + i, (n,))) for i, n in enumerate(lengths)]
  tokens = np.zeros((4, T), np.int32)
  segment_ids = np.zeros((4, T), np.int32)
  positions = np.zeros((4, T), np.int32)
  start = 0
  for i, (doc, n) in enumerate(zip(docs, lengths, strict=True)):
    packed = slice(start, start + n)
    tokens[0, packed], segment_ids[0, packed] = doc, i + 1
    positions[0, packed] = np.arange(n)
    # Alone: at the row start, rest is padding (id 0) with junk tokens.
    tokens[i + 1] = np.arange(T) + 7
    tokens[i + 1, :n], segment_ids[i + 1, :n] = doc, 1
    positions[i + 1, :n] = np.arange(n)
    start += n
  logits = apply(params, tokens, positions, segment_ids)  # [4, T, V]
  assert np.isfinite(np.asarray(logits)).all()  # padding rows too
  start = 0
  for i, n in enumerate(lengths):
    np.testing.assert_allclose(
      logits[0, start : start + n], logits[i + 1, :n], atol=1e-5, rtol=1e-5
    )
    start += n


def test_fully_padded_row_is_finite(params, apply_fn):
  segment_ids = jnp.zeros((B, T), jnp.int32)
  logits = apply_fn(params, _tokens(3), None, segment_ids)
  assert np.isfinite(np.asarray(logits)).all()


# --------------------------------------------------------- numpy reference


def _np_rope(x, positions, theta):
  """HF Llama RoPE on x [B, T, N, Dh], written out in numpy."""
  dh = x.shape[-1]
  inv_freq = 1.0 / theta ** (np.arange(0, dh, 2) / dh)
  freqs = positions[..., None] * inv_freq  # [B, T, Dh/2]
  emb = np.concatenate([freqs, freqs], -1)[:, :, None]  # [B, T, 1, Dh]
  rot = np.concatenate([-x[..., dh // 2 :], x[..., : dh // 2]], -1)
  return x * np.cos(emb) + rot * np.sin(emb)


def _np_attention(p, x, positions, cfg):
  """One GQA causal attention layer; `p` holds the module's params."""
  b, t, _ = x.shape
  h, kv, dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  proj = lambda n: x @ p[n]["kernel"] + p[n].get("bias", 0.0)
  q = proj("q").reshape(b, t, h, dh)
  k = proj("k").reshape(b, t, kv, dh)
  v = proj("v").reshape(b, t, kv, dh)
  q = _np_rope(q, positions, cfg.rope_theta)
  k = _np_rope(k, positions, cfg.rope_theta)
  k = np.repeat(k, h // kv, axis=2)  # HF repeat_kv: head i uses kv i // rep
  v = np.repeat(v, h // kv, axis=2)
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dh)
  s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
  s = np.exp(s - s.max(-1, keepdims=True))
  s = s / s.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bkhd->bqhd", s, v).reshape(b, t, h * dh)
  return out @ p["o"]["kernel"]


def _np_rmsnorm(x, scale, eps):
  return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + eps) * scale


def _np_params(tree, seed):
  """float64 numpy copy, every leaf perturbed (non-trivial biases/scales)."""
  leaves, treedef = jax.tree.flatten(tree)
  rng = np.random.default_rng(seed)
  leaves = [
    np.asarray(x, np.float64) + 0.05 * rng.standard_normal(x.shape)
    for x in leaves
  ]
  return jax.tree.unflatten(treedef, leaves)


def test_attention_matches_numpy(cfg):
  cfg = dataclasses.replace(cfg, qkv_bias=True)
  x = jax.random.normal(jax.random.key(4), (B, T, D), jnp.float32)
  positions = jnp.arange(T)[None] + jnp.asarray([[3], [100]])  # offset RoPE
  segment_ids = jnp.ones((B, T), jnp.int32)
  attn = Attention(cfg)
  cos, sin = rope.cos_sin(positions, cfg.head_dim, cfg.rope_theta)
  mask = attention_mask(segment_ids)
  p = nn.unbox(attn.init(jax.random.key(5), x, cos, sin, mask))
  p = _np_params(p["params"], seed=6)
  got, _ = attn.apply(
    {"params": jax.tree.map(jnp.float32, p)}, x, cos, sin, mask
  )
  want = _np_attention(p, np.asarray(x, np.float64), np.asarray(positions), cfg)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def test_model_matches_numpy(cfg, params, apply_fn):
  p = _np_params(params, seed=7)
  tokens = _tokens(8)
  got = apply_fn(jax.tree.map(jnp.float32, p), tokens)
  positions = np.broadcast_to(np.arange(T), (B, T))
  x = p["embed"]["embedding"][np.asarray(tokens)]  # [B, T, D]
  for i in range(L):
    lp = jax.tree.map(lambda a, i=i: a[i], p["layers"])
    h = _np_rmsnorm(x, lp["attn_norm"]["scale"], cfg.norm_eps)
    x = x + _np_attention(lp["attn"], h, positions, cfg)
    h = _np_rmsnorm(x, lp["mlp_norm"]["scale"], cfg.norm_eps)
    m = lp["mlp"]
    gate, up = h @ m["gate"]["kernel"], h @ m["up"]["kernel"]
    x = x + (gate / (1 + np.exp(-gate)) * up) @ m["down"]["kernel"]
  x = _np_rmsnorm(x, p["final_norm"]["scale"], cfg.norm_eps)
  want = x @ p["lm_head"]["kernel"]
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_rotate_half_convention():
  x = jnp.arange(8.0).reshape(1, 1, 1, 8)
  np.testing.assert_array_equal(
    rope.rotate_half(x)[0, 0, 0], [-4, -5, -6, -7, 0, 1, 2, 3]
  )


# ------------------------------------------------------- scan / remat / api


def test_scan_matches_unrolled(cfg, params, apply_fn):
  unrolled_cfg = dataclasses.replace(cfg, scan_layers=False)
  unrolled = {k: v for k, v in params.items() if k != "layers"}
  for i in range(L):
    layer_i = jax.tree.map(lambda a, i=i: a[i], params["layers"])
    unrolled[f"layers_{i}"] = layer_i
  tokens = _tokens(9)
  want = apply_fn(params, tokens)
  got = Transformer(unrolled_cfg).apply({"params": unrolled}, tokens)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  # Restacking the unrolled tree gives back the scanned one.
  restacked = jax.tree.map(
    lambda *a: jnp.stack(a), *[unrolled[f"layers_{i}"] for i in range(L)]
  )
  same = jax.tree.map(np.array_equal, restacked, params["layers"])
  assert all(jax.tree.leaves(same))


def test_remat_same_logits_and_grads(cfg, params):
  tokens = _tokens(11, (1, 8))

  @functools.partial(jax.jit, static_argnums=1)
  @functools.partial(jax.value_and_grad)
  def loss(p, c):
    return Transformer(c).apply({"params": p}, tokens).sum()

  base = loss(params, cfg)
  remat = loss(params, dataclasses.replace(cfg, remat="dots_no_batch"))
  np.testing.assert_allclose(remat[0], base[0], rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4),
    remat[1],
    base[1],
  )


def test_scan_unroll_default_has_no_loop_and_the_same_numbers(cfg, params):
  # The default (all layers a "loop" iteration, without remat) runs the
  # scanned stack without a while loop; same param tree, same numbers as
  # the rolled loop, with and without remat.
  tokens = _tokens(12, (2, 8))

  def loss_fn(c):
    return jax.jit(
      jax.value_and_grad(
        lambda p: Transformer(c).apply({"params": p}, tokens).sum()
      )
    )

  for remat in ("none", "dots_no_batch"):
    base = dataclasses.replace(cfg, remat=remat)
    rolled = dataclasses.replace(base, scan_unroll=1)
    full = dataclasses.replace(base, scan_unroll=L)
    assert rolled.unroll == 1 and full.unroll == L
    assert base.unroll == (L if remat == "none" else 1)
    hlo = lambda c: loss_fn(c).lower(params).as_text()
    assert " while(" in hlo(rolled) or "stablehlo.while" in hlo(rolled)
    assert "while" not in hlo(full)
    want = loss_fn(rolled)(params)
    got = loss_fn(full)(params)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7, rtol=1e-5),
      got[1],
      want[1],
    )
  assert dataclasses.replace(cfg, scan_unroll=99).unroll == L
  # 4-bit kernels keep the rolled loop: its memory plan re-expands them
  # layer by layer (test_fastpath's 4-bit scratch test).
  qlora = {"quant_kind": "nf4", "quant_table": ((".*", "quantize"),)}
  assert dataclasses.replace(cfg, peft=qlora).unroll == 1
  with pytest.raises(ValueError, match="scan_unroll must be an int >= 0"):
    dataclasses.replace(cfg, scan_unroll=-1)


@pytest.mark.parametrize(
  "preset, expected",
  [
    ("smollm2-135m", 134.5e6),
    ("qwen2.5-0.5b", 494e6),
    ("llama-3.2-1b", 1.236e9),
    ("llama-3.2-3b", 3.213e9),
    ("llama-3.1-8b", 8.030e9),
    ("mistral-7b", 7.248e9),
    ("qwen3-0.6b", 0.596e9),
    ("gemma-2b", 2.506e9),
    ("gemma-2-2b", 2.614e9),
    ("gemma-3-1b", 0.9999e9),
  ],
)
def test_preset_param_counts(preset, expected):
  n = param_count(_abstract(config_from_dict({"preset": preset})))
  assert abs(n - expected) / expected < 0.01, n


def test_config_from_dict():
  c = config_from_dict(
    {"preset": "qwen2.5-0.5b", "n_layers": None, "dtype": "bfloat16"}
  )
  assert (c.n_layers, c.d_model, c.head_dim) == (24, 896, 64)
  assert c.qkv_bias and c.tie_embeddings and c.norm_eps == 1e-6
  assert c.rope_theta == 1e6 and c.dtype == "bfloat16"
  assert hash(c) == hash(dataclasses.replace(c))
  c = config_from_dict({"preset": "tiny", "n_layers": 3})
  assert c.n_layers == 3 and c.head_dim == D // H
  with pytest.raises(ValueError, match="n_layerz"):
    config_from_dict({"preset": "tiny", "n_layerz": 3})
  with pytest.raises(ValueError, match="no-such"):
    config_from_dict({"preset": "no-such"})
  with pytest.raises(ValueError, match="vocab_size"):
    config_from_dict({"preset": "", "d_model": 8})


@pytest.mark.parametrize(
  "override, field",
  [
    ({"n_kv_heads": 3}, "n_kv_heads"),
    ({"remat": "some"}, "remat"),
    ({"dtype": "float8"}, "dtype"),
    ({"param_dtype": "int8"}, "param_dtype"),
  ],
)
def test_config_validation_names_field(override, field):
  base = dict(
    vocab_size=V, d_model=D, n_layers=L, n_heads=H, n_kv_heads=KV, mlp_dim=F
  )
  with pytest.raises(ValueError, match=field):
    TransformerConfig(**{**base, **override})
