"""The train step's fast paths against the plain autodiff path.

1. `jft.models.matmul.dense` (every `Linear`: float, LoRA, 4-bit) has a
   custom VJP in canonical dot layouts; `matmul.autodiff_reference()` traces
   the plain `lax.dot_general` it replaces. Float32: loss and gradients
   agree to rtol 1e-5 (only the summation order may differ). Bfloat16: both
   paths are compared with the float32 model and the fast path's error may
   be at most BF16_MARGIN times the plain path's.
2. `jft.models.head_loss.chunked_token_logps` (the LM head fused with the
   log-softmax, `model.logits_chunk`) against `log_softmax` of full
   logits: per-token log-probs, argmax flags, weighted loss and gradients,
   for chunk sizes that do and do not divide the tokens, untied and tied
   heads, soft-capping, and through the whole model and objectives.
2b. `jft.models.attend` (`model.attention_vjp`) and 2c. `jft.models.gated`
   (`model.mlp_vjp`): the attention core's and the gated MLP activation's
   hand-written backward passes against autodiff, the same two ways.
"""

import contextlib
import dataclasses
import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jft import config as base_config
from jft import losses, validate
from jft.errors import ConfigError
from jft.models import attend, gated, head_loss, layers, matmul, transformer
from jft.models import config as model_config
from jft.objectives import base
from jft.peft import lora, quant
from jft.peft.options import PeftOptions

RTOL = 1e-5
# bf16: the fast path's error against the float32 model may be at most
# this times the plain path's (plus a floor far below one bf16 ulp).
BF16_MARGIN = 1.5
BF16_FLOOR = 1e-4


def _rel_err(ref, got) -> float:
  """max |ref - got| / max |ref| over all leaves (float64 math)."""
  num = max(
    float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b))))
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True)
  )
  den = max(float(np.max(np.abs(np.asarray(a)))) for a in jax.tree.leaves(ref))
  return num / max(den, 1e-30)


def _close(ref, got, rtol=RTOL):
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
    scale = float(np.max(np.abs(np.asarray(a)))) or 1.0
    np.testing.assert_allclose(
      np.asarray(b), np.asarray(a), rtol=rtol, atol=rtol * scale
    )


# ------------------------------------------------------------ 1. matmul


def _linear_loss_and_grads(module, params, x, reference):
  """Loss `sum(y * c)` and grads w.r.t. (params, x) of a Linear."""
  shape = (*x.shape[:-1], module.features)
  c = jax.random.normal(jax.random.PRNGKey(7), shape)

  def loss(p, x):
    y = module.apply({"params": p}, x)
    return jnp.sum(y.astype(jnp.float32) * c)

  with _path(reference):
    return jax.jit(_float_grad(loss, argnums=(0, 1)))(params, x)


def _float_grad(loss, argnums=0, has_aux=False):
  """value_and_grad w.r.t. the float leaves of the param tree (argument 0);
  4-bit codes are ints and stay constants. Grads come back as a flat dict
  keyed by param path."""

  def run(p, *args):
    flat = traverse_util.flatten_dict(p, sep="/")
    floats = {k: v for k, v in flat.items() if _is_float(v)}
    ints = {k: v for k, v in flat.items() if k not in floats}

    def f(floats, *args):
      tree = traverse_util.unflatten_dict({**floats, **ints}, sep="/")
      return loss(tree, *args)

    return jax.value_and_grad(f, argnums=argnums, has_aux=has_aux)(
      floats, *args
    )

  return run


def _is_float(v) -> bool:
  return jnp.isdtype(v.dtype, "real floating")


def _path(reference: bool):
  """The plain autodiff path (reference) or the fast one."""
  stack = contextlib.ExitStack()
  if reference:
    stack.enter_context(matmul.autodiff_reference())
    stack.enter_context(attend.autodiff_reference())
  return stack


PATH = "blk/proj"  # the Linear's module path for LoRA/quant matching


class _Host(nn.Module):
  """A Linear at module path PATH."""

  features: int
  dtype: str
  peft: PeftOptions

  @nn.compact
  def __call__(self, x):
    return _Blk(self.features, self.dtype, self.peft, name="blk")(x)


class _Blk(nn.Module):
  features: int
  dtype: str
  peft: PeftOptions

  @nn.compact
  def __call__(self, x):
    return layers.Linear(
      self.features,
      ("embed", "mlp"),
      dtype=jnp.dtype(self.dtype),
      peft=self.peft,
      name="proj",
    )(x)


def _setup(dtype, peft, features=24, k=32):
  host = _Host(features, dtype, peft)
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, k), jnp.float32)
  params = nn.unbox(host.init(jax.random.PRNGKey(1), x)["params"])
  # Random (not zero) LoRA B and real 4-bit codes, so every grad is nonzero.
  p = params["blk"]["proj"]
  rng = np.random.default_rng(3)
  if "lora_b" in p:
    p["lora_b"] = jnp.asarray(rng.normal(0, 0.2, p["lora_b"].shape))
  if "kernel_packed" in p:
    w = rng.normal(0, 0.05, (k, features)).astype(np.float32)
    q = quant.quantize(
      w,
      kind=peft.quant_kind,
      block_size=peft.quant_block_size,
      double_quant=peft.quant_double,
    )
    for name, v in q.items():
      p[f"kernel_{name}"] = v
  return host, params, x


LORA = PeftOptions(lora_rank=4, lora_alpha=8.0, lora_targets=PATH)


def _quant(kind, double=False):
  return dataclasses.replace(
    LORA,
    quant_kind=kind,
    quant_table=((f"{PATH}/kernel", "quantize"),),
    quant_block_size=16,
    quant_double=double,
  )


PEFTS = {
  "float": PeftOptions(),
  "lora": LORA,
  "int4": _quant("int4"),
  "nf4": _quant("nf4", double=True),
}


@pytest.mark.parametrize("peft", list(PEFTS))
def test_linear_float32_matches_autodiff(peft):
  host, params, x = _setup("float32", PEFTS[peft])
  (l0, g0) = _linear_loss_and_grads(host, params, x, reference=True)
  (l1, g1) = _linear_loss_and_grads(host, params, x, reference=False)
  np.testing.assert_allclose(float(l1), float(l0), rtol=RTOL)
  _close(g0, g1)
  for k, g in g1[0].items():  # trainable leaves get real gradients
    if k.endswith(("/kernel", "lora_a", "lora_b")):
      assert np.any(np.asarray(g)), k


@pytest.mark.parametrize("peft", list(PEFTS))
def test_linear_bfloat16_no_less_accurate_than_autodiff(peft):
  host32, params, x = _setup("float32", PEFTS[peft])
  host16, _, _ = _setup("bfloat16", PEFTS[peft])
  _, ref = _linear_loss_and_grads(host32, params, x, reference=True)
  _, plain = _linear_loss_and_grads(host16, params, x, reference=True)
  _, fast = _linear_loss_and_grads(host16, params, x, reference=False)
  for r, p, f in zip(ref, plain, fast, strict=True):  # params, then x
    e_plain, e_fast = _rel_err(r, p), _rel_err(r, f)
    assert e_fast <= BF16_MARGIN * e_plain + BF16_FLOOR, (e_fast, e_plain)


def _dots(fn, *args) -> int:
  """dot_general count of the traced (unoptimised) jaxpr of fn(*args)."""
  jaxpr = jax.make_jaxpr(fn)(*args)
  return str(jaxpr).count("dot_general")


def test_frozen_kernel_backward_computes_no_weight_grad():
  x = jnp.ones((4, 8))
  w = jnp.ones((8, 6))

  def grad_x(w_grad):  # d/dx only, as for a frozen kernel
    f = lambda x, w: jnp.sum(matmul.dense(x, w, w_grad=w_grad) ** 2)
    return jax.grad(f)

  assert _dots(grad_x(True), x, w) == 3  # y, dx and dw (dw unused)
  assert _dots(grad_x(False), x, w) == 2  # y and dx only
  # A float kernel frozen by the freeze table: XLA drops the unused dw.
  hlo = jax.jit(grad_x(True)).lower(x, w).compile().as_text()
  assert hlo.count(" dot(") == 2
  g = jax.grad(lambda w: jnp.sum(matmul.dense(x, w, w_grad=False)))(w)
  assert not np.any(np.asarray(g))


def test_transposed_kernel_matches_autodiff():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 7, 16)), jnp.float32)
  e = jnp.asarray(rng.normal(size=(40, 16)), jnp.float32)  # [V, D]
  c = jnp.asarray(rng.normal(size=(2, 7, 40)), jnp.float32)

  def loss(x, e):
    return jnp.sum(matmul.dense(x, e, jnp.float32, transpose_w=True) * c)

  want = jax.grad(lambda x, e: jnp.sum(x @ e.T * c), argnums=(0, 1))(x, e)
  got = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, e)
  _close(want, got)


@pytest.mark.parametrize(
  "dtype,m", [("bfloat16", 6), ("float16", 10), ("bfloat16", 7), ("float32", 6)]
)
def test_canonical_transpose_moves_the_same_bits(dtype, m):
  # 2-byte dtypes with M even go through uint32 pairs: every bit pattern
  # (NaN payloads, -0, subnormals) must land where a.T puts it.
  bits = np.random.default_rng(m).integers(0, 2**16, (m, 5), np.uint16)
  if dtype == "float32":
    bits = bits.astype(np.uint32) * 65599
  a = jax.lax.bitcast_convert_type(jnp.asarray(bits), jnp.dtype(dtype))
  got = jax.jit(matmul.canonical_transpose)(a)
  assert got.shape == (5, m) and got.dtype == a.dtype
  back = jax.lax.bitcast_convert_type(got, jnp.asarray(bits).dtype)
  np.testing.assert_array_equal(np.asarray(back), bits.T)


def test_dense_refuses_mixed_dtypes():
  with pytest.raises(TypeError, match="cast first"):
    matmul.dense(jnp.ones((2, 3)), jnp.ones((3, 4), jnp.bfloat16))


# ---------------------------------------------------- 2. chunked LM head

B, T, D, V = 3, 37, 16, 50  # 111 tokens: 7, 24 and 64 do not divide them


def _head_inputs(seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(B, T, D)), dtype)
  w = jnp.asarray(rng.normal(size=(D, V)) * 0.5, dtype)
  t = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
  wt = jnp.asarray(rng.random((B, T)) * (rng.random((B, T)) > 0.3))  # masks
  return x, w, t, wt.astype(jnp.float32)


def _plain_head(x, w, t, wt, softcap=None, transposed=False):
  with matmul.autodiff_reference():
    z = matmul.dense(x, w, jnp.float32, transpose_w=transposed)
  if softcap:
    z = jnp.tanh(z / softcap) * softcap
  s = head_loss.plain_token_logps(z, t)
  return -jnp.sum(s.logp * wt), s


def _fused_head(x, w, t, wt, chunk, softcap=None, transposed=False, **kw):
  s = head_loss.chunked_token_logps(
    x, w, t, chunk=chunk, softcap=softcap, transposed=transposed, **kw
  )
  return -jnp.sum(s.logp * wt), s


def _vg(fn):
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))


@pytest.mark.parametrize("chunk", [1, 7, 24, 64, 10_000])
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("tied", [False, True])
def test_chunked_head_matches_log_softmax(chunk, softcap, tied):
  x, w, t, wt = _head_inputs()
  w = w.T if tied else w  # a tied head's table is [V, D]
  kw = dict(softcap=softcap, transposed=tied)
  (l0, s0), g0 = _vg(lambda x, w: _plain_head(x, w, t, wt, **kw))(x, w)
  (l1, s1), g1 = _vg(lambda x, w: _fused_head(x, w, t, wt, chunk, **kw))(x, w)
  np.testing.assert_allclose(float(l1), float(l0), rtol=RTOL)
  _close(s0.logp, s1.logp)
  np.testing.assert_array_equal(np.asarray(s1.correct), np.asarray(s0.correct))
  _close(g0, g1)
  assert s1.logp.shape == (B, T) and s1.logp.dtype == jnp.float32


def test_chunked_head_frozen_kernel_gives_only_dx():
  x, w, t, wt = _head_inputs()
  (_, _), g0 = _vg(lambda x, w: _plain_head(x, w, t, wt))(x, w)
  (_, _), g1 = _vg(lambda x, w: _fused_head(x, w, t, wt, 32, w_grad=False))(
    x, w
  )
  _close(g0[0], g1[0])
  assert not np.any(np.asarray(g1[1]))


def test_chunked_head_bfloat16_no_less_accurate():
  x, w, t, wt = _head_inputs(seed=1)
  _, ref = _vg(lambda x, w: _plain_head(x, w, t, wt))(x, w)
  x16, w16 = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  (l_plain, _), plain = _vg(lambda x, w: _plain_head(x, w, t, wt))(x16, w16)
  for grad_dtype in (None, jnp.bfloat16):
    (l_fast, _), fast = _vg(
      lambda x, w, gd=grad_dtype: _fused_head(x, w, t, wt, 32, grad_dtype=gd)
    )(x16, w16)
    np.testing.assert_allclose(float(l_fast), float(l_plain), rtol=1e-5)
    for r, p, f in zip(ref, plain, fast, strict=True):
      e_plain, e_fast = _rel_err(r, p), _rel_err(r, f)
      assert e_fast <= BF16_MARGIN * e_plain, (grad_dtype, e_fast, e_plain)


# ------------------------------------------------ 2b. attention core


def _attn_inputs(dtype, kv=2, g=3, t=9, dh=8, seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(2, t, kv, g, dh)), dtype)
  k = jnp.asarray(rng.normal(size=(2, t, kv, dh)), dtype)
  v = jnp.asarray(rng.normal(size=(2, t, kv, dh)), dtype)
  # Row 0: two packed documents and padding; row 1: one document.
  seg = jnp.asarray([[1, 1, 1, 1, 2, 2, 2, 0, 0], [3] * 9])[:, :t]
  mask = transformer.attention_mask(seg)
  mask = mask.at[1, 0, 0, 4].set(False)  # a fully masked query row
  c = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  return (q, k, v), mask, c


def _attn_vg(mask, c, scale, softcap, reference):
  def loss(q, k, v):
    o = attend.attend(q, k, v, mask, scale=scale, softcap=softcap)
    return jnp.sum(o.astype(jnp.float32) * c)

  ctx = attend.autodiff_reference() if reference else contextlib.nullcontext()
  with ctx:
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


ATTN_CASES = {
  "llama-gqa": (("div", np.sqrt(8.0)), None, 2, 3),
  "mha": (("div", np.sqrt(8.0)), None, 4, 1),
  "gemma2-softcap": (("mul", 0.25), 2.0, 2, 3),  # a cap that really bends
}


@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_attention_core_matches_autodiff(case):
  """Float32: output and q/k/v gradients of the canonical-layout custom
  VJP (softmax backward by do . o) equal autodiff of the einsum path."""
  scale, cap, kv, g = ATTN_CASES[case]
  args, mask, c = _attn_inputs(jnp.float32, kv=kv, g=g)
  l0, g0 = _attn_vg(mask, c, scale, cap, reference=True)(*args)
  l1, g1 = _attn_vg(mask, c, scale, cap, reference=False)(*args)
  np.testing.assert_allclose(float(l1), float(l0), rtol=RTOL)
  _close(g0, g1)


def test_attention_core_bfloat16_no_less_accurate():
  scale, cap, kv, g = ATTN_CASES["llama-gqa"]
  args, mask, c = _attn_inputs(jnp.float32, kv=kv, g=g, seed=2)
  _, ref = _attn_vg(mask, c, scale, cap, reference=True)(*args)
  args16 = [a.astype(jnp.bfloat16) for a in args]
  (l_plain, plain) = _attn_vg(mask, c, scale, cap, reference=True)(*args16)
  (l_fast, fast) = _attn_vg(mask, c, scale, cap, reference=False)(*args16)
  np.testing.assert_allclose(float(l_fast), float(l_plain), rtol=1e-2)
  for r, p, f in zip(ref, plain, fast, strict=True):
    e_plain, e_fast = _rel_err(r, p), _rel_err(r, f)
    assert e_fast <= BF16_MARGIN * e_plain + BF16_FLOOR, (e_fast, e_plain)


# ------------------------------------------ 2c. gated MLP activation


def _gated_vg(kind, c, vjp):
  def loss(gate, up):
    h = gated.gated(gate, up, kind, vjp=vjp)
    return jnp.sum(h.astype(jnp.float32) * c), h

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def _gated_inputs(seed=0):
  rng = np.random.default_rng(seed)
  gate, up, c = (
    jnp.asarray(rng.normal(0, 2, (3, 5, 16)), jnp.float32) for _ in range(3)
  )
  return gate, up, c


@pytest.mark.parametrize("kind", ["silu", "gelu_tanh"])
def test_gated_activation_matches_autodiff(kind):
  """Float32: the value is the plain expression's, bit for bit; the
  gradients equal autodiff's to rounding."""
  gate, up, c = _gated_inputs()
  (l0, h0), g0 = _gated_vg(kind, c, vjp=False)(gate, up)
  (l1, h1), g1 = _gated_vg(kind, c, vjp=True)(gate, up)
  np.testing.assert_array_equal(np.asarray(h1), np.asarray(h0))
  assert float(l1) == float(l0)
  _close(g0, g1)
  # By hand for SwiGLU: d_up = c * silu(gate), d_gate = c * up * silu'(gate).
  if kind == "silu":
    g, u, cc = (np.asarray(x, np.float64) for x in (gate, up, c))
    sig = 1 / (1 + np.exp(-g))
    _close((cc * u * sig * (1 + g * (1 - sig)), cc * g * sig), g1)


@pytest.mark.parametrize("kind", ["silu", "gelu_tanh"])
def test_gated_activation_bfloat16_no_less_accurate(kind):
  gate, up, c = _gated_inputs(seed=3)
  _, ref = _gated_vg(kind, c, vjp=False)(gate, up)
  g16, u16 = gate.astype(jnp.bfloat16), up.astype(jnp.bfloat16)
  (_, h0), plain = _gated_vg(kind, c, vjp=False)(g16, u16)
  (_, h1), fast = _gated_vg(kind, c, vjp=True)(g16, u16)
  np.testing.assert_array_equal(
    np.asarray(h1, np.float32), np.asarray(h0, np.float32)
  )
  for r, p, f in zip(ref, plain, fast, strict=True):
    e_plain, e_fast = _rel_err(r, p), _rel_err(r, f)
    assert e_fast <= BF16_MARGIN * e_plain + BF16_FLOOR, (e_fast, e_plain)


# -------------------------------------------- 3. through model/objective

TOKENS = jax.random.randint(jax.random.PRNGKey(9), (2, 12), 0, 64)
TARGETS = jax.random.randint(jax.random.PRNGKey(8), (2, 12), 0, 64)
WEIGHTS = (jnp.arange(12) >= 3).astype(jnp.float32)[None].repeat(2, 0)
SMALL = transformer.TransformerConfig(
  vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64
)
GEMMA2 = dataclasses.replace(
  SMALL,
  family="gemma2",
  mlp_act="gelu_tanh",
  norm_plus_one=True,
  embed_scale=True,
  tie_embeddings=True,
  sandwich_norm=True,
  final_softcap=2.0,  # small, so that the cap really bends these logits
  attn_softcap=50.0,
  query_pre_attn_scalar=8.0,
)
QLORA_HEAD = dataclasses.replace(
  SMALL,
  peft=dataclasses.replace(
    _quant("nf4"),
    lora_targets=lora.ALIASES["all-linear"],
    quant_table=(
      (r"layers/(attn|mlp)/\w+/kernel", "quantize"),
      (r"lm_head/kernel", "quantize"),
      (".*", "float"),
    ),
  ),
)
LORA_HEAD = dataclasses.replace(
  SMALL,
  peft=PeftOptions(lora_rank=4, lora_targets=r"lm_head|layers/attn/q"),
)
# Every hand-written backward the model config can switch on.
VJPS = {"attention_vjp": True, "mlp_vjp": True}
MODELS = {
  "llama": SMALL,
  "gemma2-tied-softcap": GEMMA2,
  "qlora-4bit-head": QLORA_HEAD,
  "lora-on-head": LORA_HEAD,
}


def _model_params(cfg):
  model = transformer.Transformer(cfg)
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), TOKENS))
  params = params["params"]
  if cfg.peft.quant_kind:  # real 4-bit codes from a float model's kernels
    fcfg = lora.base_config(cfg)
    fparams = nn.unbox(
      jax.jit(transformer.Transformer(fcfg).init)(jax.random.PRNGKey(0), TOKENS)
    )["params"]
    qpaths = lora.check_quant_table(cfg.peft.quant_table, fparams)
    qparams = quant.quantize_params(
      fparams,
      qpaths,
      kind=cfg.peft.quant_kind,
      block_size=cfg.peft.quant_block_size,
      double_quant=cfg.peft.quant_double,
    )
    params = _merge_adapters(qparams, params)  # adapters from init
  if cfg.peft.lora_rank:  # nonzero B so adapter grads flow everywhere
    flat = traverse_util.flatten_dict(params, sep="/")
    rng = np.random.default_rng(1)
    for k in flat:
      if k.endswith("lora_b"):
        flat[k] = jnp.asarray(rng.normal(0, 0.2, flat[k].shape), jnp.float32)
    params = traverse_util.unflatten_dict(flat, sep="/")
  return model, params


def _merge_adapters(qparams, init_params):
  fq = traverse_util.flatten_dict(qparams, sep="/")
  fi = traverse_util.flatten_dict(init_params, sep="/")
  for k, v in fi.items():
    if k.rsplit("/", 1)[-1] in lora.LORA_LEAVES:
      fq[k] = v
  return traverse_util.unflatten_dict(fq, sep="/")


def _model_loss_grads(cfg, params, reference):
  model = transformer.Transformer(cfg)

  def loss(p):
    s = model.apply({"params": p}, TOKENS, targets=TARGETS)
    ce, w, correct = base.scores_cross_entropy(s, WEIGHTS)
    return ce / w, (s.logp, correct)

  with _path(reference):
    return jax.jit(_float_grad(loss, has_aux=True))(params)


@pytest.mark.parametrize("name", list(MODELS))
def test_model_fast_paths_match_plain(name):
  """Fused head (640 logits = 10 tokens: 2 x 12 tokens in 3 chunks of 2 x 5,
  the last padded) + custom-VJP matmuls + the attention core's and the
  gated MLP's VJPs (`VJPS`) against full logits + autodiff, float32."""
  cfg = MODELS[name]
  _, params = _model_params(cfg)
  plain = dataclasses.replace(cfg, logits_chunk=0)
  fast = dataclasses.replace(cfg, logits_chunk=640, **VJPS)
  (l0, (lp0, c0)), g0 = _model_loss_grads(plain, params, reference=True)
  (l1, (lp1, c1)), g1 = _model_loss_grads(fast, params, reference=False)
  np.testing.assert_allclose(float(l1), float(l0), rtol=RTOL)
  _close(lp0, lp1)
  assert float(c0) == float(c1)
  _close(g0, g1, rtol=2e-5)


def _dpo_loss_grads(cfg, params, reference):
  """DPO's sigmoid loss of row 0 (chosen) against row 1 (rejected), the
  rows' log-prob sums taken as `jft.objectives.dpo` takes them; the
  reference log-probs are constants. Its per-token cotangent differs by
  row, unlike the mean cross-entropy above."""
  model = transformer.Transformer(cfg)

  def loss(p):
    s = model.apply({"params": p}, TOKENS, targets=TARGETS)
    lp, _ = losses.row_logps(s.logp, WEIGHTS)
    per_pair, _, _ = losses.preference_loss(
      lp[:1],
      lp[1:],
      jnp.array([-3.0]),
      jnp.array([-4.0]),
      jnp.sum(WEIGHTS[:1], -1),
      jnp.sum(WEIGHTS[1:], -1),
      loss_type="sigmoid",
      beta=0.5,
    )
    return jnp.sum(per_pair), lp

  with _path(reference):
    return jax.jit(_float_grad(loss, has_aux=True))(params)


@pytest.mark.parametrize("name", ["llama", "gemma2-tied-softcap"])
def test_preference_loss_fast_path_matches_plain(name):
  """DPO and KTO sum each row's target log-probs from the fused head."""
  cfg = MODELS[name]
  _, params = _model_params(cfg)
  plain = dataclasses.replace(cfg, logits_chunk=0)
  fast = dataclasses.replace(cfg, logits_chunk=640, **VJPS)
  (l0, lp0), g0 = _dpo_loss_grads(plain, params, reference=True)
  (l1, lp1), g1 = _dpo_loss_grads(fast, params, reference=False)
  np.testing.assert_allclose(float(l1), float(l0), rtol=RTOL)
  _close(lp0, lp1)
  _close(g0, g1, rtol=2e-5)


def test_plain_scores_equal_token_cross_entropy():
  cfg = dataclasses.replace(SMALL, logits_chunk=0)
  model, params = _model_params(cfg)
  logits = model.apply({"params": params}, TOKENS)
  want = base.token_cross_entropy(logits, TARGETS, WEIGHTS)
  s = model.apply({"params": params}, TOKENS, targets=TARGETS)
  got = base.scores_cross_entropy(s, WEIGHTS)
  for a, b in zip(want, got, strict=True):
    assert float(a) == float(b)


def test_score_head_refuses_targets():
  cfg = dataclasses.replace(SMALL, head="score")
  model = transformer.Transformer(cfg)
  with pytest.raises(ValueError, match="score"):
    model.init(jax.random.PRNGKey(0), TOKENS, targets=TARGETS)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_with_fast_paths(remat):
  cfg = dataclasses.replace(SMALL, logits_chunk=640, **VJPS)
  _, params = _model_params(cfg)
  (l0, _), g0 = _model_loss_grads(cfg, params, reference=False)
  cfg_r = dataclasses.replace(cfg, remat=remat)
  (l1, _), g1 = _model_loss_grads(cfg_r, params, reference=False)
  np.testing.assert_allclose(float(l1), float(l0), rtol=RTOL)
  _close(g0, g1)


def test_vjps_are_opt_in_and_the_default_is_the_autodiff_path():
  """Off by default: the model traces the einsum attention exactly as
  before (same jaxpr as under `autodiff_reference`); each switch on traces
  its VJP."""
  assert base_config.base_config().model.attention_vjp is None
  assert SMALL.attention_vjp is False
  model = transformer.Transformer(SMALL)
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), TOKENS))

  def jaxpr(cfg, reference=False):
    m = transformer.Transformer(cfg)
    ctx = attend.autodiff_reference() if reference else contextlib.nullcontext()
    with ctx:
      return str(jax.make_jaxpr(lambda p: m.apply(p, TOKENS))(params))

  assert jaxpr(SMALL) == jaxpr(SMALL, reference=True)
  # The matmuls are custom VJPs either way; more when a switch is on.
  assert base_config.base_config().model.mlp_vjp is None
  assert SMALL.mlp_vjp is False
  n_off = jaxpr(SMALL).count("custom_vjp_call")
  for key in VJPS:
    on = dataclasses.replace(SMALL, **{key: True})
    assert jaxpr(on).count("custom_vjp_call") > n_off, key


def test_logits_chunk_config_key():
  c = base_config.base_config()
  assert transformer.config_from_dict(c.model.to_dict()).logits_chunk == (
    model_config.LOGITS_CHUNK
  )
  c.model.logits_chunk = 0  # the plain path, from the command line
  assert transformer.config_from_dict(c.model.to_dict()).logits_chunk == 0
  c.model.logits_chunk = -1
  with pytest.raises(ConfigError, match="model.logits_chunk"):
    validate.validate(c)
  with pytest.raises(ValueError, match="logits_chunk"):
    dataclasses.replace(SMALL, logits_chunk=-1)


def test_fastpath_bench_runs_tiny():
  path = os.path.join(os.path.dirname(__file__), "..", "bench", "fastpath.py")
  spec = importlib.util.spec_from_file_location("bench_fastpath", path)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  rows = bench.run(
    "bfloat16",
    "tiny",
    2,
    16,
    rounds=1,
    chunks=[8],
    only=("plain", "all+chunk=8"),
  )
  assert [r["variant"] for r in rows] == ["plain", "all+chunk=8"]
  for r in rows:  # same model, same data: the fast paths change no number
    assert abs(r["loss"] - rows[0]["loss"]) < 1e-3 * abs(rows[0]["loss"])
    assert r["step_ms"] > 0 and r["grad_err_vs_f32"] < 0.1


def _scratch_bytes(cfg, params, reference):
  model = transformer.Transformer(cfg)

  def loss(p):
    s = model.apply({"params": p}, TOKENS, targets=TARGETS)
    ce, w, _ = base.scores_cross_entropy(s, WEIGHTS)
    return ce / w

  with _path(reference):
    compiled = jax.jit(_float_grad(loss)).lower(params).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_4bit_kernels_are_expanded_again_in_the_backward():
  """`matmul.dense_frozen` keeps a 4-bit kernel's codes, not its float
  expansion, from the forward to the backward, so a QLoRA step's planned
  scratch (XLA's memory plan, not a timing) is smaller than autodiff's by
  about the float bytes of the quantized kernels; the gradients are equal
  (`test_model_fast_paths_match_plain`, 'qlora-4bit-head')."""
  cfg = dataclasses.replace(QLORA_HEAD, d_model=128, mlp_dim=512, n_layers=4)
  _, params = _model_params(cfg)
  flat = traverse_util.flatten_dict(params, sep="/")
  expanded = sum(  # float32 bytes of every 4-bit kernel (two codes a byte)
    v.size * 2 * 4 for k, v in flat.items() if k.endswith("kernel_packed")
  )
  assert expanded > 2**20
  fast = _scratch_bytes(cfg, params, reference=False)
  plain = _scratch_bytes(cfg, params, reference=True)
  assert fast <= plain - expanded // 2, (fast, plain, expanded)
