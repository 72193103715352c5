"""Sharding: meshes, rule validation, same losses on every mesh, cross-mesh
restore. Runs on the 8 fake CPU devices of conftest.py.

Loss tolerance: rtol 1e-5. Meshes change only where float32 sums are split
and reduced (measured differences are ~3e-7 relative); a wrong sharding
(duplicated or dropped rows, a mis-split kernel) changes losses at 1e-2.
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jft import checkpoint, init, optim, sharding, train
from jft import config as base
from jft.config import DEFAULT_RULES
from jft.data.tokenizer import Tokenizer
from jft.models import transformer
from jft.state import TrainState, flat_paths, split_params

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)]
ONE = (1, 1, 1)  # the 1-device reference (config.mesh.num_devices = 1)
RTOL = 1e-5
STEPS = 3

# What the default rules ask for, written out by hand: (path, spec).
CLM_SPECS = {
  "trainable/embed/embedding": ("tensor", "fsdp"),
  "trainable/layers/attn/q/kernel": (None, "fsdp", "tensor"),
  "trainable/layers/attn/k/kernel": (None, "fsdp", "tensor"),
  "trainable/layers/attn/o/kernel": (None, "tensor", "fsdp"),
  "trainable/layers/mlp/down/kernel": (None, "tensor", "fsdp"),
  "trainable/layers/attn_norm/scale": (None, "fsdp"),
  "trainable/final_norm/scale": ("fsdp",),
  "trainable/lm_head/kernel": ("fsdp", "tensor"),
  "step": (),
}
LORA_SPECS = {
  "trainable/layers/attn/q/lora_a": (None, "fsdp", None),
  "trainable/layers/attn/q/lora_b": (None, None, "tensor"),
  "trainable/layers/mlp/down/lora_a": (None, "tensor", None),
  "trainable/layers/mlp/down/lora_b": (None, None, "fsdp"),
  "frozen/layers/attn/q/kernel": (None, "fsdp", "tensor"),
  "frozen/embed/embedding": ("tensor", "fsdp"),
}
QLORA_SPECS = {
  "trainable/layers/attn/v/lora_b": (None, None, "tensor"),
  "frozen/layers/attn/q/kernel_packed": (None, "fsdp", "tensor"),
  # scales: few rows along K (K / block_size), so only the out axis shards
  "frozen/layers/attn/q/kernel_scale": (None, None, "tensor"),
  "frozen/layers/mlp/down/kernel_packed": (None, "tensor", "fsdp"),
  "frozen/layers/mlp/down/kernel_scale": (None, None, "fsdp"),
  "frozen/lm_head/kernel_packed": ("fsdp", "tensor"),
  "frozen/embed/embedding": ("tensor", "fsdp"),
}
DPO_SPECS = {  # full fine-tuning: the frozen reference shards like params
  "trainable/layers/attn/q/kernel": (None, "fsdp", "tensor"),
  "ref/layers/attn/q/kernel": (None, "fsdp", "tensor"),
  "ref/lm_head/kernel": ("fsdp", "tensor"),
}
SPECS = {
  "clm": CLM_SPECS,
  "lora": LORA_SPECS,
  "qlora": QLORA_SPECS,
  "dpo": DPO_SPECS,
}
# Every objective / technique on every mesh, as the issue asks.
RUNS = [(v, m) for v in ("clm", "lora", "qlora", "dpo") for m in MESHES]


def _config(suite_dir, variant, mesh):
  """tiny_config: d_model 32, 2 heads x 16 (kv 1 x 16), mlp 64, vocab 384:
  every sharded dim divides by 8."""
  c = tiny_config(
    suite_dir,
    {"clm": "clm", "dpo": "dpo"}.get(variant, "sft"),
    total_steps=STEPS,
    eval_every=0,
    checkpoint_every=STEPS,
  )
  if variant == "dpo":  # no warmup: step 1 already moves off log 2
    c.optimizer.warmup_steps = 0
  if variant in ("lora", "qlora"):
    c.lora.rank = 4
    c.lora.save_adapters = False
  if variant == "qlora":
    c.quant.kind = "nf4"
    c.quant.block_size = 16
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
  c.mesh.num_devices = 1 if mesh == ONE else 0
  return c


@pytest.fixture(scope="module")
def run(suite_dir, tmp_path_factory):
  """run(variant, mesh) -> workdir of a finished train.run, made once."""
  done = {}

  def get(variant, mesh):
    if (variant, mesh) not in done:
      name = f"{variant}-{'x'.join(map(str, mesh))}"
      workdir = str(tmp_path_factory.mktemp(name))
      train.run(_config(suite_dir, variant, mesh), workdir)
      done[variant, mesh] = workdir
    return done[variant, mesh]

  return get


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _train_metric(workdir, key):
  return [r[key] for r in _rows(workdir) if key in r]


def _strip(spec):
  spec = list(spec)
  while spec and spec[-1] is None:
    spec.pop()
  return tuple(spec)


def _saved_specs(workdir) -> dict[str, tuple]:
  """PartitionSpec of every array in the latest checkpoint, by path."""
  ckpt = checkpoint.Checkpointer(workdir)
  try:
    meta = ckpt.manager.item_metadata(ckpt.latest_step())["state"]
  finally:
    ckpt.close()
  meta = meta.tree if hasattr(meta, "tree") else meta
  leaves = jax.tree_util.tree_leaves_with_path(
    meta, is_leaf=lambda x: hasattr(x, "shape")
  )
  out = {}
  for path, leaf in leaves:
    key = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    out[key] = _strip(leaf.sharding.partition_spec)
  return out


# ----------------------------------------------------------- same losses


@pytest.mark.parametrize(("variant", "mesh"), RUNS)
def test_losses_match_one_device(run, variant, mesh):
  ref = run(variant, ONE)
  got = run(variant, mesh)
  ref_loss = _train_metric(ref, "train/loss")
  assert len(ref_loss) == STEPS
  assert len(set(ref_loss)) == STEPS  # it trains: losses move
  np.testing.assert_allclose(
    _train_metric(got, "train/loss"), ref_loss, rtol=RTOL
  )
  np.testing.assert_allclose(
    _train_metric(got, "train/grad_norm"),
    _train_metric(ref, "train/grad_norm"),
    rtol=1e-4,  # a norm of ~1e-1 magnitudes summed over shards
  )


@pytest.mark.parametrize(("variant", "mesh"), RUNS)
def test_saved_param_shardings_follow_the_rules(run, variant, mesh):
  saved = _saved_specs(run(variant, mesh))
  for path, spec in SPECS[variant].items():
    assert saved[path] == _strip(spec), path
  assert saved["rng"] == ()


def test_optimizer_state_shards_like_its_params(run):
  """Adam moments are sharded as their parameters, not replicated."""
  saved = _saved_specs(run("clm", (2, 2, 2)))
  mu = {
    k.split("/mu/", 1)[1]: v
    for k, v in saved.items()
    if "/mu/" in k and k.startswith("opt_state/")
  }
  assert mu, sorted(saved)
  for path, spec in CLM_SPECS.items():
    if path.startswith("trainable/"):
      assert mu[path[len("trainable/") :]] == _strip(spec), path
  counts = [v for k, v in saved.items() if k.endswith("/count")]
  assert counts and all(v == () for v in counts)


# --------------------------------------------------- cross-mesh restore


def _abstract_state(config, mesh):
  """The TrainState train.run builds, as ShapeDtypeStructs placed on mesh."""
  tok = Tokenizer.load(config.data.tokenizer)
  model = transformer.Transformer(init.model_config(config, tok))
  boxed = jax.eval_shape(
    lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))["params"],
    jax.random.PRNGKey(0),
  )
  rules = sharding.rules_from_config(config.mesh)
  shardings = sharding.param_shardings(boxed, mesh, rules)
  params = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    nn.unbox(boxed),
    shardings,
  )
  trainable, frozen = split_params(
    params, train.freeze_table(config, model.config)
  )
  opt, _ = optim.make_optimizer(config.optimizer, config.total_steps, trainable)
  opt_abs = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    jax.eval_shape(opt.init, trainable),
    sharding.opt_state_shardings(opt, trainable, mesh),
  )
  rep = sharding.replicated(mesh)
  return TrainState(
    step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
    trainable=trainable,
    frozen=frozen,
    opt_state=opt_abs,
    rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep),
  )


def test_checkpoint_restores_on_other_meshes(suite_dir, run):
  """Saved on (2,2,2); restored sharded on (1,8,1) and on one device."""
  workdir = run("clm", (2, 2, 2))
  config = _config(suite_dir, "clm", (1, 8, 1))
  mesh = sharding.make_mesh(config.mesh)
  abstract = _abstract_state(config, mesh)
  ckpt = checkpoint.Checkpointer(workdir)
  try:
    state = ckpt.restore(ckpt.latest_step(), abstract)
  finally:
    ckpt.close()
  assert int(state.step) == STEPS
  q = state.trainable["layers"]["attn"]["q"]["kernel"]
  assert q.sharding == NamedSharding(mesh, P(None, "fsdp", "tensor"))
  assert len(q.addressable_shards) == 8
  assert q.addressable_shards[0].data.shape == (2, 4, 32)  # 32 / fsdp 8

  one = sharding.make_mesh(_config(suite_dir, "clm", ONE).mesh)
  assert one.devices.size == 1
  on_laptop = checkpoint.load_params(workdir, one)
  restored = flat_paths(jax.device_get(state.params))
  assert sorted(restored) == sorted(flat_paths(on_laptop))
  for path, value in flat_paths(on_laptop).items():
    np.testing.assert_array_equal(restored[path], value, err_msg=path)
  # And the weights trained on (2,2,2) are the 1-device run's weights.
  ref = flat_paths(checkpoint.load_params(run("clm", ONE), one))
  for path, value in ref.items():
    np.testing.assert_allclose(restored[path], value, atol=1e-5, err_msg=path)


# ---------------------------------------------------- rules and meshes


def _boxed(**kw):
  cfg = transformer.TransformerConfig(
    **(
      dict(
        vocab_size=64,
        d_model=32,
        n_layers=2,
        n_heads=2,
        n_kv_heads=1,
        mlp_dim=64,
      )
      | kw
    )
  )
  model = transformer.Transformer(cfg)
  return jax.eval_shape(
    lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))["params"],
    jax.random.PRNGKey(0),
  )


def _mesh(data, fsdp, tensor):
  cfg = dict(data=data, fsdp=fsdp, tensor=tensor)
  return sharding.make_mesh(cfg)


def test_rule_that_matches_no_parameter_is_named():
  rules = DEFAULT_RULES + (("mlpp", "tensor"),)
  with pytest.raises(ValueError, match=r"\('mlpp', 'tensor'\).*matches no"):
    sharding.validate_rules(_boxed(), _mesh(1, 8, 1), rules)


def test_parameter_axis_without_rule_is_named():
  rules = tuple(r for r in DEFAULT_RULES if r[0] != "kv")
  with pytest.raises(
    ValueError, match=r"layers/attn/k/kernel has logical axis 'kv' with no"
  ):
    sharding.validate_rules(_boxed(), _mesh(1, 8, 1), rules)


def test_indivisible_dimension_names_param_dim_and_mesh_axes():
  # One kv head of 6: k's out dim is 6, which tensor=4 cannot split.
  with pytest.raises(ValueError) as e:
    sharding.validate_rules(_boxed(head_dim=6), _mesh(1, 2, 4), DEFAULT_RULES)
  msg = str(e.value)
  assert "layers/attn/k/kernel (2, 32, 6) dimension 2 (size 6" in msg
  assert "logical 'kv'" in msg and "{'tensor': 4} (product 4)" in msg
  # A rule to two mesh axes multiplies their sizes.
  rules = (("embed", ("fsdp", "tensor")),) + DEFAULT_RULES[2:]
  with pytest.raises(ValueError, match=r"\{'fsdp': 2, 'tensor': 4\} \(prod"):
    sharding.validate_rules(
      _boxed(d_model=36, n_heads=2), _mesh(1, 2, 4), rules
    )


def test_unknown_mesh_axis_in_rule_is_named():
  rules = (("mlp", "tensr"),) + DEFAULT_RULES
  with pytest.raises(ValueError, match=r"\('mlp', 'tensr'\).*'tensr'"):
    sharding.validate_rules(_boxed(), _mesh(1, 8, 1), rules)


def test_activation_and_replicated_rules_are_allowed():
  rules = DEFAULT_RULES + (("length", None),)
  sharding.validate_rules(_boxed(), _mesh(2, 2, 2), rules)
  # scan_layers=False: no 'layers' axis, and ('layers', None) is harmless.
  sharding.validate_rules(_boxed(scan_layers=False), _mesh(2, 2, 2), rules)
  with pytest.raises(ValueError, match=r"\('layers', 'data'\)"):
    sharding.validate_rules(
      _boxed(scan_layers=False),
      _mesh(2, 2, 2),
      DEFAULT_RULES[:-1] + (("layers", "data"),),
    )


def test_bad_rule_fails_the_run_before_training(suite_dir, tmp_path):
  config = _config(suite_dir, "clm", (1, 8, 1))
  config.mesh.rules = DEFAULT_RULES + (("hedas", "tensor"),)
  with pytest.raises(ValueError, match="hedas"):
    train.run(config, str(tmp_path / "w"))


def test_make_mesh_sizes_and_device_subsets():
  mesh = sharding.make_mesh(dict(data=2, fsdp=-1, tensor=2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  one = sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1, num_devices=1))
  assert one.devices.size == 1 and one.devices.flat[0] == jax.devices()[0]
  with pytest.raises(ValueError, match="need 16 devices, 8 are present"):
    sharding.make_mesh(dict(data=2, fsdp=8, tensor=1))
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    sharding.make_mesh(dict(data=-1, fsdp=-1, tensor=1))
  with pytest.raises(ValueError, match="num_devices=9"):
    sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1, num_devices=9))


def test_global_batch_rows_land_on_batch_axes():
  mesh = _mesh(2, 2, 2)
  local = {"inputs": np.arange(8 * 3, dtype=np.int32).reshape(8, 3)}
  arr = sharding.global_batch(local, mesh)["inputs"]
  assert arr.sharding.spec == P(("data", "fsdp"), None)
  for shard in arr.addressable_shards:  # each row block on its devices
    np.testing.assert_array_equal(shard.data, local["inputs"][shard.index])
    assert shard.data.shape == (2, 3)


def test_activation_constraint_applies_only_under_mesh_rules():
  mesh = _mesh(2, 2, 2)
  rules = DEFAULT_RULES + (("length", None),)

  def f(x):  # [B, T, D]
    return nn.with_logical_constraint(x * 2, ("batch", "length", "embed"))

  x = jnp.ones((8, 4, 16))
  plain = jax.jit(f).lower(x).as_text()
  assert "sharding_constraint" not in plain  # no mesh: a no-op
  text = jax.jit(sharding.with_mesh_rules(f, mesh, rules)).lower(x).as_text()
  # 'embed' -> fsdp is already taken by 'batch', so only rows are split.
  assert "sharding_constraint %" in text
  assert '[{"data", "fsdp"}, {}, {}]' in text
  np.testing.assert_array_equal(
    jax.jit(sharding.with_mesh_rules(f, mesh, rules))(x), 2 * x
  )


def test_model_pins_residual_stream_under_mesh_rules():
  """The transformer constrains [B, T, D] between blocks to the batch axes."""
  mesh = _mesh(2, 2, 2)
  rules = DEFAULT_RULES + (("length", None),)
  boxed = _boxed()
  model = transformer.Transformer(
    transformer.TransformerConfig(
      vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, mlp_dim=64
    )
  )
  params = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), nn.unbox(boxed))

  def fwd(p, tokens):
    return model.apply({"params": p}, tokens)

  tokens = jnp.zeros((8, 4), jnp.int32)
  assert (
    "sharding_constraint" not in jax.jit(fwd).lower(params, tokens).as_text()
  )
  text = (
    jax.jit(sharding.with_mesh_rules(fwd, mesh, rules))
    .lower(params, tokens)
    .as_text()
  )
  pinned = [
    ln
    for ln in text.splitlines()
    if "sharding_constraint" in ln and '[{"data", "fsdp"}, {}, {}]' in ln
  ]
  assert len(pinned) >= 2, text[:2000]  # after the embedding and each block


def test_opt_state_shardings_follow_params():
  mesh = _mesh(2, 2, 2)
  params = {
    "w": jax.device_put(
      jnp.ones((16, 32)), NamedSharding(mesh, P("fsdp", "tensor"))
    ),
    "n": {
      "scale": jax.device_put(jnp.ones(16), NamedSharding(mesh, P("fsdp")))
    },
  }
  for name in ("adamw", "sgd", "adafactor"):
    oc = base.base_config().optimizer
    oc.name = name
    opt, _ = optim.make_optimizer(oc, 10, params)
    shard = sharding.opt_state_shardings(opt, params, mesh)
    state = jax.jit(opt.init, out_shardings=shard)(params)
    flat = {
      jax.tree_util.keystr(k): v
      for k, v in jax.tree_util.tree_leaves_with_path(state)
    }
    w = [v for k, v in flat.items() if k.endswith("['w']") and v.ndim == 2]
    assert w, (name, list(flat))
    for v in w:
      assert v.sharding.spec == P("fsdp", "tensor"), name
    for k, v in flat.items():
      if v.ndim == 0 or v.shape not in ((16, 32), (16,)):
        assert v.sharding.spec == P(), (name, k)
