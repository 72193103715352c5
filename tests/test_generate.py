"""KV-cache decoding: equal to the no-cache loop, sampling filters by hand,
stop strings, and the same tokens when the parameters are sharded."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jft import generate, sharding, train
from jft.models import transformer
from jft.state import flat_paths

V = 64
CFG = transformer.TransformerConfig(
  vocab_size=V,
  d_model=32,
  n_layers=2,
  n_heads=4,
  n_kv_heads=2,
  mlp_dim=64,
)
# Sliding window and Gemma-style extras: the cache must honour the window.
SLIDING = dataclasses.replace(
  CFG,
  sliding_window=3,
  layer_types=("sliding", "full"),
  attn_softcap=5.0,
  qk_norm=True,
)


@functools.cache
def _params(cfg):
  model = transformer.Transformer(cfg)
  p = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))
  # Wider than the 0.02 init, so the argmax depends on every detail.
  return jax.tree.map(lambda x: x * 4, jax.tree.map(jnp.asarray, p))["params"]


def _apply(cfg):
  return train.make_apply_fn(transformer.Transformer(cfg))


PROMPTS = [[5, 9, 11, 3, 7], [4], [8, 8, 1, 2, 30, 31, 12, 13, 6], [17, 18]]


@pytest.mark.parametrize("cfg", [CFG, SLIDING], ids=["plain", "sliding"])
def test_cached_prefill_and_steps_equal_the_full_forward(cfg):
  params, apply_fn = _params(cfg), _apply(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 10), 0, V)
  full = apply_fn(params, tokens, None, None)  # [2, 10, V]
  cache = transformer.init_cache(cfg, 2, 16)
  pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
  seg = jnp.ones((2, 10), jnp.int32)
  got, cache = apply_fn(
    params, tokens[:, :6], pos[:, :6], seg[:, :6], cache=cache
  )
  steps = [got]
  for t in range(6, 10):
    out, cache = apply_fn(
      params, tokens[:, t : t + 1], pos[:, t : t + 1], seg[:, :1], cache=cache
    )
    steps.append(out)
  np.testing.assert_allclose(
    jnp.concatenate(steps, axis=1), full, atol=1e-4, rtol=1e-4
  )
  assert int(cache["index"]) == 10
  assert np.asarray(cache["segment_ids"]).tolist() == [[1] * 10 + [0] * 6] * 2


@pytest.mark.parametrize("cfg", [CFG, SLIDING], ids=["plain", "sliding"])
def test_greedy_with_cache_equals_no_cache(cfg):
  params, apply_fn = _params(cfg), _apply(cfg)
  free = generate.Generator(
    apply_fn, cfg, max_new=12, eos_ids=[], pad_id=0, vocab_size=V
  ).generate(params, PROMPTS)
  eos = free[0][4]  # a token row 0 emits: it must stop there
  gen = generate.Generator(
    apply_fn, cfg, max_new=12, eos_ids=[eos], pad_id=0, vocab_size=V
  )
  got = gen.generate(params, PROMPTS)
  ref = generate.make_nocache_decoder(
    apply_fn, max_new=12, eos_id=eos, pad_id=0, vocab_size=V
  )
  buf = np.zeros((len(PROMPTS), 32), np.int32)
  for i, p in enumerate(PROMPTS):
    buf[i, : len(p)] = p
  lengths = np.array([len(p) for p in PROMPTS], np.int32)
  want = np.asarray(ref(params, buf, lengths)).tolist()
  assert got == want
  # Rows stop at eos and pad after it.
  assert got[0][: got[0].index(eos) + 1] == free[0][: free[0].index(eos) + 1]
  for row in got:
    if eos in row:
      assert set(row[row.index(eos) + 1 :]) <= {0}


def test_sharded_params_and_rows_decode_the_same():
  params, apply_fn = _params(CFG), _apply(CFG)
  mesh = sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1))
  model = transformer.Transformer(CFG)
  boxed = jax.eval_shape(
    lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
  )["params"]
  rules = (("embed", "fsdp"), ("mlp", None), ("heads", None), ("kv", None))
  rules += (("vocab", None), ("layers", None))
  shard = flat_paths(sharding.param_shardings(boxed, mesh, rules))
  placed = traverse_util.unflatten_dict(
    {k: jax.device_put(v, shard[k]) for k, v in flat_paths(params).items()},
    sep="/",
  )
  assert len(placed["embed"]["embedding"].sharding.device_set) == 8
  kw = dict(max_new=8, eos_ids=[7], pad_id=0, vocab_size=V)
  plain = generate.Generator(apply_fn, CFG, **kw).generate(params, PROMPTS)
  on_mesh = generate.Generator(apply_fn, CFG, mesh=mesh, **kw)
  assert on_mesh.generate(placed, PROMPTS) == plain
  tokens, _, _ = generate.left_pad(PROMPTS * 2, 16, 0)
  assert len(generate._place(tokens, mesh).sharding.device_set) == 8


def test_filter_logits_top_k_and_top_p_by_hand():
  logits = jnp.log(jnp.array([[0.1, 0.4, 0.2, 0.3]]))
  keep = lambda s: np.asarray(generate.filter_logits(logits, s)[0]) > -1e29
  assert keep(generate.Sampling(1.0, top_k=2)).tolist() == [0, 1, 0, 1]
  # top-p 0.6: 0.4 alone is < 0.6, 0.4 + 0.3 reaches it.
  assert keep(generate.Sampling(1.0, top_p=0.6)).tolist() == [0, 1, 0, 1]
  assert keep(generate.Sampling(1.0, top_p=0.4)).tolist() == [0, 1, 0, 0]
  assert keep(generate.Sampling(1.0, top_p=0.75)).tolist() == [0, 1, 1, 1]
  both = generate.Sampling(1.0, top_k=3, top_p=0.95)  # k first, then p
  assert keep(both).tolist() == [0, 1, 1, 1]
  t = generate.filter_logits(logits, generate.Sampling(0.5))
  np.testing.assert_allclose(t, logits / 0.5, rtol=1e-6)
  for bad in (dict(temperature=-1), dict(top_k=-1), dict(top_p=0.0)):
    with pytest.raises(ValueError):
      generate.Sampling(**bad)


def test_sampling_follows_the_filtered_softmax():
  logits = jnp.array([[1.0, 0.0, -1.0, 0.5]])
  assert int(generate.sample(logits, None)[0]) == 0  # greedy
  n = 20000
  many = jnp.broadcast_to(logits, (n, 4))
  for s in (
    generate.Sampling(1.0),
    generate.Sampling(0.5),
    generate.Sampling(1.0, top_k=2),
  ):
    draws = np.asarray(generate.sample(many, jax.random.PRNGKey(1), s))
    freq = np.bincount(draws, minlength=4) / n
    z = np.exp(np.array([1.0, 0.0, -1.0, 0.5]) / s.temperature)
    if s.top_k:
      z[np.argsort(-z)[s.top_k :]] = 0
    np.testing.assert_allclose(freq, z / z.sum(), atol=0.015)


def test_truncate_at_eos_and_stop_strings():
  text = {1: "a", 2: "b", 3: ".", 4: "c"}
  decode = lambda ids: "".join(text[i] for i in ids)
  assert generate.truncate([1, 2, 9, 4], [9]) == [1, 2]
  assert generate.truncate([1, 2, 3, 4, 9], [9], decode, ["b."]) == [1, 2, 3]
  assert generate.truncate([1, 2, 4], [9], decode, ["zz"]) == [1, 2, 4]


def test_left_pad_positions_count_real_tokens():
  tokens, seg, pos = generate.left_pad([[5, 6, 7], [8]], 4, pad_id=0)
  assert tokens.tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]]
  assert seg.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
  assert pos.tolist() == [[0, 0, 1, 2], [0, 0, 0, 0]]
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    generate.left_pad([[1], []], 4, 0)
