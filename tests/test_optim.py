"""Optimizer from config: LR schedules and the weight-decay mask by hand."""

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from jft import config as config_lib
from jft import optim
from jft.errors import ConfigError
from jft.models import transformer
from jft.state import flat_paths

LR, END = 1e-3, 1e-4  # lr and lr * min_lr_ratio (0.1)


def _cfg(**kw):
  cfg = config_lib.base_config().optimizer
  cfg.lr, cfg.min_lr_ratio = LR, 0.1
  for k, v in kw.items():
    cfg[k] = v
  return cfg


def _cosine(s, warmup, total):
  """Linear warmup 0 -> LR over `warmup` steps, then half a cosine from LR
  to END over the remaining steps; END after that."""
  if s < warmup:
    return LR * s / warmup
  t = min(s - warmup, total - warmup) / (total - warmup)
  return END + (LR - END) * 0.5 * (1 + math.cos(math.pi * t))


def _linear(s, warmup, total):
  if s < warmup:
    return LR * s / warmup
  t = min(s - warmup, total - warmup) / (total - warmup)
  return LR + (END - LR) * t


STEPS = np.array([0, 1, 2, 3, 4, 5, 9, 13, 14, 20])


class ScheduleTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    ("cosine", "cosine", 4, _cosine),
    ("linear", "linear", 4, _linear),
    ("cosine_no_warmup", "cosine", 0, _cosine),
  )
  def test_warmup_then_decay_by_hand(self, name, warmup, fn):
    sched = optim.make_schedule(_cfg(schedule=name, warmup_steps=warmup), 14)
    got = np.asarray([self.variant(sched)(jnp.asarray(s)) for s in STEPS])
    want = np.asarray([fn(s, warmup, 14) for s in STEPS])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
    # Spot values: mid-warmup, peak, mid-decay, floor.
    if warmup == 4 and name == "cosine":
      np.testing.assert_allclose(
        got[[2, 4, 6, 8, 9]], [5e-4, LR, 5.5e-4, END, END], rtol=1e-5
      )

  @chex.variants(with_jit=True, without_jit=True)
  def test_constant_and_clamped_warmup(self):
    sched = self.variant(
      optim.make_schedule(_cfg(schedule="constant", warmup_steps=4), 14)
    )
    got = [float(sched(jnp.asarray(s))) for s in (0, 2, 4, 10, 100)]
    np.testing.assert_allclose(got, [0, LR / 2, LR, LR, LR], rtol=1e-6)
    # warmup >= total_steps: warmup shrinks to total - 1, so the last step
    # trains at the peak rate instead of never reaching it.
    sched = self.variant(
      optim.make_schedule(_cfg(schedule="constant", warmup_steps=50), 5)
    )
    got = [float(sched(jnp.asarray(s))) for s in range(5)]
    np.testing.assert_allclose(
      got, [0, LR / 4, LR / 2, 3 * LR / 4, LR], rtol=1e-6
    )

  def test_unknown_schedule(self):
    with pytest.raises(ConfigError, match="schedule.*'cosine'"):
      optim.make_schedule(_cfg(schedule="step"), 10)


def _tiny_params():
  """Real parameter paths of a small model with biases and norms."""
  cfg = transformer.TransformerConfig(
    vocab_size=64,
    d_model=16,
    n_layers=2,
    n_heads=2,
    n_kv_heads=1,
    mlp_dim=32,
    qkv_bias=True,
  )
  shapes = jax.eval_shape(
    lambda r: transformer.Transformer(cfg).init(
      r, jnp.zeros((1, 4), jnp.int32)
    ),
    jax.random.PRNGKey(0),
  )
  return jax.tree.map(
    lambda s: jnp.full(s.shape, 0.5, s.dtype), nn.unbox(shapes)["params"]
  )


def test_no_decay_mask_on_model_paths():
  params = _tiny_params()
  mask = flat_paths(optim.decay_mask(params, _cfg().no_decay))
  assert set(mask) == set(flat_paths(params))
  no_decay = {p for p, decay in mask.items() if not decay}
  assert no_decay == {
    "layers/attn_norm/scale",
    "layers/mlp_norm/scale",
    "final_norm/scale",
    "layers/attn/q/bias",
    "layers/attn/k/bias",
    "layers/attn/v/bias",
  }, no_decay
  assert mask["layers/attn/q/kernel"] and mask["embed/embedding"]


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_zero_grad_decays_only_masked_leaves(name):
  """With zero gradients the update is weight decay alone: -lr * wd * p on
  kernels/embeddings, exactly 0 on norms and biases."""
  params = _tiny_params()
  cfg = _cfg(
    name=name,
    schedule="constant",
    warmup_steps=0,
    weight_decay=0.1,
    grad_clip_norm=1.0,
    b1=0.0,
  )
  opt, _ = optim.make_optimizer(cfg, 10, params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(opt.update)(zeros, opt.init(params), params)
  decay = flat_paths(optim.decay_mask(params, cfg.no_decay))
  for path, u in flat_paths(updates).items():
    want = -LR * 0.1 * 0.5 if decay[path] else 0.0
    np.testing.assert_allclose(u, want, rtol=1e-6, atol=0, err_msg=path)
