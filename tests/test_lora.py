"""LoRA and QLoRA: specs, identity at init, merge/unmerge, freezing, 4-bit."""

import dataclasses
import json
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import traverse_util
from safetensors.numpy import load_file

from jft import checkpoint, init, sharding, train
from jft.data.tokenizer import Tokenizer
from jft.models import transformer
from jft.peft import lora, quant
from jft.peft.options import PeftOptions

BASE = transformer.TransformerConfig(
  vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64
)
LORA = dataclasses.replace(
  BASE,
  peft=PeftOptions(
    lora_rank=4, lora_alpha=8.0, lora_targets=lora.ALIASES["all-linear"]
  ),
)
TABLE = (
  (r"layers(_\d+)?/(attn|mlp)/\w+/kernel", "quantize"),
  (r"lm_head/kernel", "quantize"),
  (".*", "float"),
)
TOKENS = jax.random.randint(jax.random.PRNGKey(9), (2, 12), 0, 64)


def _init(cfg, seed=0):
  model = transformer.Transformer(cfg)  # jitted: eager init is ~3x slower
  params = jax.jit(model.init)(jax.random.PRNGKey(seed), TOKENS)["params"]
  return model, nn.unbox(params)


def _with_quant(kind, block_size):
  """LORA with 4-bit kernels where TABLE says so."""
  peft = dataclasses.replace(
    LORA.peft, quant_kind=kind, quant_table=TABLE, quant_block_size=block_size
  )
  return dataclasses.replace(LORA, peft=peft)


def _flat(t):
  return traverse_util.flatten_dict(t, sep="/")


@pytest.fixture(scope="module")
def base():
  return _init(BASE)


def _with_random_b(params, seed=1):
  flat = _flat(params)
  rng = np.random.default_rng(seed)
  for k in flat:
    if k.endswith("lora_b"):
      flat[k] = jnp.asarray(rng.normal(0, 0.2, flat[k].shape), jnp.float32)
  return traverse_util.unflatten_dict(flat, sep="/")


def test_lora_param_spec():
  model = transformer.Transformer(LORA)
  boxed = jax.eval_shape(
    lambda r: model.init(r, TOKENS)["params"], jax.random.PRNGKey(0)
  )
  flat = _flat(nn.unbox(boxed))
  specs = _flat(nn.get_partition_spec(boxed))
  assert flat["layers/attn/q/lora_a"].shape == (2, 32, 4)
  assert flat["layers/attn/q/lora_b"].shape == (2, 4, 32)
  assert flat["layers/mlp/down/lora_a"].shape == (2, 64, 4)
  assert flat["layers/attn/k/lora_b"].shape == (2, 4, 16)
  assert flat["layers/attn/q/lora_a"].dtype == jnp.float32
  assert tuple(specs["layers/attn/q/lora_a"]) == ("layers", "embed", None)
  assert tuple(specs["layers/mlp/down/lora_b"]) == ("layers", None, "embed")
  assert "lm_head/lora_a" not in flat  # all-linear excludes the LM head
  assert sum(k.endswith("lora_a") for k in flat) == 7


def test_adapters_start_as_identity_and_merge_matches(base):
  model_b, pb = base
  model_l, pl = _init(LORA)
  # same base weights, fresh adapters: B = 0 so outputs are the base's
  full = lora.adapters(pl) | {}
  params = jax.tree.map(lambda x: x, pb)
  params = traverse_util.unflatten_dict(_flat(pb) | _flat(full), sep="/")
  np.testing.assert_allclose(
    model_l.apply({"params": params}, TOKENS),
    model_b.apply({"params": pb}, TOKENS),
    atol=1e-6,
  )
  trained = _with_random_b(params)
  out_lora = model_l.apply({"params": trained}, TOKENS)
  assert not np.allclose(
    out_lora, model_b.apply({"params": pb}, TOKENS), atol=1e-3
  )
  merged = lora.merge(trained, LORA)
  assert not any("lora" in k for k in _flat(merged))
  np.testing.assert_allclose(
    model_b.apply({"params": merged}, TOKENS), out_lora, atol=2e-5
  )
  back = lora.unmerge(merged, lora.adapters(trained), LORA)
  for k, v in _flat(trained).items():
    np.testing.assert_allclose(_flat(back)[k], v, atol=1e-6, err_msg=k)
  # zero_adapters gives the base function back (DPO's reference)
  np.testing.assert_allclose(
    model_l.apply({"params": lora.zero_adapters(trained)}, TOKENS),
    model_b.apply({"params": pb}, TOKENS),
    atol=1e-6,
  )


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_scale_by_hand(rslora):
  from jft.models.layers import Linear, PeftOptions

  opts = PeftOptions(
    lora_rank=4, lora_alpha=8.0, lora_rslora=rslora, lora_targets=""
  )  # a root module has path ""
  layer = Linear(3, ("embed", "mlp"), peft=opts, name="lin")
  x = jnp.arange(10, dtype=jnp.float32).reshape(2, 5) / 10
  p = nn.unbox(layer.init(jax.random.PRNGKey(0), x)["params"])
  p["lora_b"] = jnp.ones((4, 3)) * 0.5
  y = layer.apply({"params": p}, x)
  scale = 8.0 / (2.0 if rslora else 4.0)
  expect = np.asarray(x) @ np.asarray(p["kernel"]) + scale * (
    np.asarray(x) @ np.asarray(p["lora_a"]) @ np.asarray(p["lora_b"])
  )
  np.testing.assert_allclose(y, expect, rtol=1e-5)


def test_target_regex_that_matches_nothing_lists_layers(suite_dir, tmp_path):
  config = tiny_config(suite_dir, objective="sft")
  config.lora.rank = 4
  config.lora.targets = r"layers/attn/qq"
  with pytest.raises(ValueError, match=r"matches no Linear.*layers/attn/q"):
    train.run(config, str(tmp_path / "w"))


def test_quant_table_errors(base):
  _, pb = base
  with pytest.raises(ValueError, match=r"unmatched.*final_norm/scale"):
    lora.check_quant_table(TABLE[:2], pb)
  with pytest.raises(ValueError, match=r"final_norm/scale.*only Linear"):
    lora.check_quant_table(
      ((r"final_norm/scale", "quantize"), (".*", "float")), pb
    )
  assert len(lora.check_quant_table(TABLE, pb)) == 8


@pytest.mark.parametrize("kind", ["int4", "nf4"])
def test_qlora_spec_bytes_and_merge(base, kind):
  model_b, pb = base
  qcfg = _with_quant(kind, block_size=16)
  model_q, pq = _init(qcfg)
  flat = _flat(pq)
  assert flat["layers/attn/q/kernel_packed"].dtype == jnp.uint8
  assert flat["layers/attn/q/kernel_packed"].shape == (2, 16, 32)
  assert flat["layers/attn/q/kernel_scale"].shape == (2, 2, 32)
  assert flat["lm_head/kernel_packed"].shape == (16, 64)
  assert "embed/embedding" in flat and "layers/attn/q/kernel" not in flat
  # real weights: quantize the float base, keep the fresh adapters
  kernels = set(lora.check_quant_table(TABLE, pb))
  qbase = quant.quantize_params(
    pb, kernels, kind=kind, block_size=16, double_quant=False
  )
  params = traverse_util.unflatten_dict(
    _flat(qbase) | _flat(lora.adapters(pq)), sep="/"
  )
  out_q = model_q.apply({"params": params}, TOKENS)
  out_f = model_b.apply({"params": pb}, TOKENS)
  rel = np.linalg.norm(out_q - out_f) / np.linalg.norm(out_f)
  assert rel < 0.15, rel
  kernel_bytes = sum(
    v.nbytes for k, v in _flat(pb).items() if k.endswith("/kernel")
  )
  q_bytes = sum(v.nbytes for k, v in _flat(qbase).items() if "/kernel_" in k)
  # 4 bits + one float32 scale per 16 values = (0.5 + 4/16) / 4 of f32
  assert q_bytes == kernel_bytes * (0.5 + 4 / 16) / 4
  # merging a QLoRA tree gives the float model computing the same function
  trained = _with_random_b(params)
  merged = lora.merge(trained, qcfg)
  np.testing.assert_allclose(
    model_b.apply({"params": merged}, TOKENS),
    model_q.apply({"params": trained}, TOKENS),
    atol=5e-5,
  )


def _restore_raw(workdir):
  import orbax.checkpoint as ocp

  step = checkpoint.Checkpointer(workdir).latest_step()
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  return ocp.PyTreeCheckpointer().restore(path)


@pytest.mark.parametrize(
  "kind, scan", [("", True), ("nf4", True), ("", False)], ids=str
)
def test_adapter_run_trains_only_adapters(suite_dir, tmp_path, kind, scan):
  """Also with `model.scan_layers=False` (per-layer `layers_i` leaves; its
  init differs from the scanned one, so no loss is compared with it: see
  test_unscanned_lora_is_the_scanned_model_restacked)."""
  config = tiny_config(
    suite_dir, objective="sft", total_steps=3, eval_every=0, checkpoint_every=3
  )
  config.model.scan_layers = scan
  config.lora.rank = 4
  config.lora.save_merged = kind == ""
  if kind:
    config.quant.kind = kind
    config.quant.block_size = 16
    config.quant.double_quant = True
  workdir = str(tmp_path / "w")
  train.run(config, workdir)
  raw = _restore_raw(workdir)
  trainable, frozen = _flat(raw["trainable"]), _flat(raw["frozen"])
  assert trainable and all("lora_" in k for k in trainable)
  assert not any("lora_" in k for k in frozen)
  # Optimizer state exists for adapters only: mu/nu leaves mirror trainable.
  opt_sizes = sum(np.size(x) for x in jax.tree.leaves(raw["opt_state"]))
  n_train = sum(np.size(x) for x in trainable.values())
  n_frozen = sum(np.size(x) for x in frozen.values())
  assert 2 * n_train <= opt_sizes < 2 * n_train + 16 < n_frozen
  # Frozen weights are bit-identical to the same config's untrained init.
  tok = Tokenizer.load(config.data.tokenizer)
  model_cfg = init.model_config(config, tok)
  mesh = sharding.make_mesh(config.mesh)
  start = _flat(
    jax.device_get(
      init.init_params(
        config, model_cfg, mesh, sharding.rules_from_config(config.mesh)
      )
    )
  )
  for k, v in frozen.items():
    np.testing.assert_array_equal(v, start[k], err_msg=k)
  # B moved off zero: the adapters did train.
  assert any(
    np.abs(v).max() > 0 for k, v in trainable.items() if k.endswith("lora_b")
  )
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    first = json.loads(f.readline())
  assert first["params/frozen_bytes"] == sum(v.nbytes for v in frozen.values())
  assert any(k.startswith("layers_1/") for k in frozen) == (not scan)
  # PEFT-format adapters: names and [r, in] / [out, r] layouts.
  ad = load_file(os.path.join(workdir, "adapters", "adapter_model.safetensors"))
  a = ad["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
  b = ad["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
  assert a.shape == (4, 32) and b.shape == (32, 4)
  # every adapted Linear of every layer, A and B: 2 layers x 7 x 2
  assert len(ad) == 28 and {k.split(".")[4] for k in ad} == {"0", "1"}
  assert any(np.abs(v).max() > 0 for k, v in ad.items() if "lora_B" in k)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    losses = [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]
  assert len(losses) == 3 and np.isfinite(losses).all()
  with open(os.path.join(workdir, "adapters", "adapter_config.json")) as f:
    assert json.load(f)["r"] == 4
  if not kind:
    assert os.path.exists(os.path.join(workdir, "merged", "config.json"))


def test_quant_block_that_does_not_divide_names_the_kernel():
  cfg = _with_quant("nf4", block_size=64)  # d_model is 32
  with pytest.raises(ValueError, match=r"layers/attn/q/kernel.*block_size"):
    _init(cfg)


def _unstack(params, n_layers):
  """Scanned `layers/...` [L, ...] leaves as per-layer `layers_i/...`."""
  out = {k: v for k, v in params.items() if k != "layers"}
  for i in range(n_layers):
    out[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], params["layers"])
  return out


def test_unscanned_lora_is_the_scanned_model_restacked():
  """LoRA with scan_layers=False: per-layer leaves of the same shapes; with
  the scanned params unstacked, the same logits and the same adapter
  gradients (so the same step-1 loss and update; the two layouts only
  initialise differently)."""
  unscanned = dataclasses.replace(LORA, scan_layers=False)
  model_s, ps = _init(LORA)
  model_u = transformer.Transformer(unscanned)
  pu = jax.eval_shape(model_u.init, jax.random.PRNGKey(0), TOKENS)["params"]
  ps = _with_random_b(ps)
  moved = _unstack(ps, LORA.n_layers)
  shapes = lambda t: {k: v.shape for k, v in _flat(t).items()}
  assert shapes(moved) == shapes(nn.unbox(pu))
  assert "layers_1/attn/q/lora_b" in _flat(nn.unbox(pu))

  def loss(model):
    def f(p):
      logits = model.apply({"params": p}, TOKENS)  # [B, T, V]
      return jax.nn.log_softmax(logits)[..., 0].mean()

    return jax.jit(jax.value_and_grad(f))

  (ls, gs), (lu, gu) = loss(model_s)(ps), loss(model_u)(moved)
  np.testing.assert_allclose(lu, ls, rtol=1e-6)
  chex.assert_trees_all_close(gu, _unstack(gs, LORA.n_layers), atol=1e-6)
  assert np.abs(_flat(gu)["layers_1/attn/q/lora_b"]).max() > 1e-4


class LoraDropoutTest(chex.TestCase):
  """Dropout on the LoRA branch's input, in training only (PEFT's)."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_dropout_masks_the_lora_input_only(self):
    from jft.models.layers import Linear

    n, rate = 8, 0.25
    opts = PeftOptions(
      lora_rank=n, lora_alpha=float(n), lora_dropout=rate, lora_targets=""
    )  # scale 1; a root module has path ""
    make = lambda peft, det: Linear(
      n, ("embed", "mlp"), peft=peft, deterministic=det
    )
    x = jax.random.normal(jax.random.PRNGKey(0), (64, n))
    p = nn.unbox(make(opts, True).init(jax.random.PRNGKey(1), x)["params"])
    # A = I, B = 1.5 I: the LoRA branch is 1.5 * dropout(x), read off exactly
    p["lora_a"], p["lora_b"] = jnp.eye(n), 1.5 * jnp.eye(n)

    def fwd(peft, det):
      layer = make(peft, det)
      return self.variant(
        lambda p, k: layer.apply({"params": p}, x, rngs={"dropout": k})
      )

    training, evaluate = fwd(opts, False), fwd(opts, True)
    plain = fwd(dataclasses.replace(opts, lora_dropout=0.0), True)
    k1, k2 = jax.random.PRNGKey(2), jax.random.PRNGKey(3)
    base = np.asarray(x @ p["kernel"])
    # Not training: no dropout at all, whatever the key.
    np.testing.assert_allclose(evaluate(p, k1), plain(p, k1), rtol=1e-6)
    np.testing.assert_allclose(evaluate(p, k1), base + 1.5 * x, rtol=1e-5)
    # Training: dropout(x) = x / (1 - rate) kept, else 0; base path intact.
    drops = []
    for k in (k1, k2):
      xd = (np.asarray(training(p, k)) - base) / 1.5
      kept = np.isclose(xd, x / (1 - rate), rtol=1e-4, atol=1e-5)
      dropped = np.abs(xd) < 1e-5
      assert (kept | dropped).all()
      drops.append(dropped)
      assert abs(dropped.mean() - rate) < 4 * np.sqrt(
        rate * (1 - rate) / x.size
      )
    assert not np.array_equal(*drops)  # a different key, a different mask
    # B = 0: training output is exactly the base layer's (x not dropped).
    p0 = dict(p, lora_b=jnp.zeros_like(p["lora_b"]))
    np.testing.assert_allclose(training(p0, k1), base, rtol=1e-6)

  def test_model_train_flag_and_rng_reach_the_adapters(self):
    """Through `train.make_apply_fn`: train=True with different rngs gives
    different logits; train=False is the no-dropout model."""
    cfg = dataclasses.replace(
      LORA, peft=dataclasses.replace(LORA.peft, lora_dropout=0.3)
    )
    no_drop = jax.jit(train.make_apply_fn(transformer.Transformer(LORA)))
    apply_fn = train.make_apply_fn(transformer.Transformer(cfg))
    params = _with_random_b(_init(cfg)[1])
    fwd = jax.jit(
      lambda p, k, t: apply_fn(p, TOKENS, None, None, rng=k, train=t),
      static_argnums=2,
    )
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    want = no_drop(params, TOKENS, None, None)
    np.testing.assert_allclose(fwd(params, k1, False), want, atol=1e-6)
    a, b = fwd(params, k1, True), fwd(params, k2, True)
    assert np.abs(a - b).max() > 1e-3 and np.abs(a - want).max() > 1e-3
    np.testing.assert_array_equal(a, fwd(params, k1, True))
    # with B = 0 dropout has nothing to act on: the base model's logits
    zero = lora.zero_adapters(params)
    np.testing.assert_allclose(
      fwd(zero, k1, True), no_drop(zero, TOKENS, None, None), atol=1e-6
    )
