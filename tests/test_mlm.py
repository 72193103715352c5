"""MLM: masking statistics, loss vs numpy, bidirectionality, resume."""

import io
import json
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import sentencepiece as spm
from conftest import tiny_config

from jft import checkpoint, init, objectives, steps, train
from jft.data.tokenizer import Tokenizer
from jft.models import transformer
from jft.objectives import mlm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(suite_dir, **overrides):
  c = tiny_config(suite_dir, objective="mlm", **overrides)
  c.model.causal = False
  c.mlm = ml_collections.ConfigDict(
    dict(mask_rate=0.15, mask_token_rate=0.8, random_token_rate=0.1)
  )
  return c


@pytest.fixture(scope="module")
def tok(suite_dir):
  return Tokenizer.load(suite_dir / "tok.model")


def _packed_batch(rows=16, t=48, seed=0, vocab=300):
  """Packed rows of documents [bos ... eos], specials inside, padded ends."""
  rng = np.random.default_rng(seed)
  tokens = np.zeros((rows, t), np.int32)
  seg = np.zeros((rows, t), np.int32)
  weights = np.zeros((rows, t), np.float32)
  for r in range(rows):
    pos, s = 0, 1
    while True:
      n = int(rng.integers(3, 20))
      if pos + n > t - 2:  # leave >= 2 padding tokens per row
        break
      doc = rng.integers(5, vocab, n).astype(np.int32)
      doc[0], doc[-1] = 2, 3  # bos, eos
      doc[rng.integers(1, n)] = rng.choice([1, 4])  # unk / [MASK] in text
      tokens[r, pos : pos + n], seg[r, pos : pos + n] = doc, s
      weights[r, pos : pos + n] = 1.0  # even specials: selection skips them
      pos, s = pos + n, s + 1
  return {
    "inputs": tokens,
    "targets": tokens,
    "weights": weights,
    "segment_ids": seg,
    "positions": np.zeros_like(tokens),
  }


def test_registered_and_examples(suite_dir, tok):
  obj = objectives.get("mlm")(_config(suite_dir), tok)
  assert isinstance(obj, mlm.MLM) and obj.builtin_split == "pretrain"
  (ex,) = obj.make_examples([{"text": "copy: a b = a b"}])
  ids = tok.encode("copy: a b = a b")
  np.testing.assert_array_equal(ex["inputs"], [tok.bos_id, *ids, tok.eos_id])
  np.testing.assert_array_equal(ex["targets"], ex["inputs"])
  np.testing.assert_array_equal(ex["weights"], [0] + [1] * len(ids) + [0])
  assert tok.mask_id == 4 and set(obj.special_ids) == {0, 1, 2, 3, 4}
  assert not np.isin(obj.random_ids, obj.special_ids).any()
  assert len(obj.random_ids) == tok.vocab_size - 5


@pytest.mark.parametrize(
  "rates", [(0.15, 0.8, 0.1), (0.4, 0.5, 0.3)], ids=["bert", "custom"]
)
def test_masking_statistics(suite_dir, tok, rates):
  rate, p_mask, p_rand = rates
  c = _config(suite_dir)
  c.mlm.mask_rate, c.mlm.mask_token_rate, c.mlm.random_token_rate = rates
  obj = mlm.MLM(c, tok)
  batch = jax.tree.map(jnp.asarray, _packed_batch())
  draws = 300
  keys = jax.random.split(jax.random.PRNGKey(7), draws)
  inputs, sel = jax.jit(jax.vmap(lambda k: obj.corrupt(batch, k)))(keys)
  inputs, sel = np.asarray(inputs), np.asarray(sel)  # [N, B, T]
  tokens, seg = np.asarray(batch["targets"]), np.asarray(batch["segment_ids"])
  eligible = (seg > 0) & ~np.isin(tokens, [0, 1, 2, 3, 4])

  # Specials and padding are never chosen, nor changed.
  assert not sel[:, ~eligible].any()
  np.testing.assert_array_equal(
    inputs[:, ~eligible],
    np.broadcast_to(tokens[~eligible], inputs[:, ~eligible].shape),
  )
  # Per document: floor or ceil of rate * n, and rate * n on average.
  counts, expect = [], []
  for r, s in set(zip(*np.nonzero(seg), strict=True)):
    where = (seg[r] == s) & eligible[r]
    counts.append(sel[:, r, where].sum(-1))  # [N]
    expect.append(rate * where.sum())
  counts, expect = np.stack(counts, 1), np.asarray(expect)  # [N, D], [D]
  assert (counts >= np.floor(expect)).all() and (
    counts <= np.ceil(expect)
  ).all()
  frac = sel[:, eligible].mean()
  assert abs(frac - rate) < 0.01, frac
  # Every eligible position equally likely (a ranking bug would skew it).
  per_pos = sel[:, eligible].mean(0)  # [E]
  assert np.abs(per_pos - rate).max() < 5 * np.sqrt(rate * (1 - rate) / draws)
  # Replacement kinds among the chosen.
  chosen_in, chosen_tok = inputs[sel], np.broadcast_to(tokens, sel.shape)[sel]
  is_mask = chosen_in == 4
  is_rand = ~is_mask & (chosen_in != chosen_tok)
  n_random = len(obj.random_ids)
  assert abs(is_mask.mean() - p_mask) < 0.01, is_mask.mean()
  assert abs(is_rand.mean() - p_rand * (1 - 1 / n_random)) < 0.01
  assert not np.isin(chosen_in[~is_mask], [0, 1, 2, 3, 4]).any()
  assert chosen_in[~is_mask].max() < tok.vocab_size


def test_bad_rates_and_missing_mask_token(suite_dir, tok, tmp_path):
  c = _config(suite_dir)
  c.mlm.mask_token_rate = 0.95  # + 0.1 random > 1
  with pytest.raises(ValueError, match="sum to <= 1"):
    mlm.MLM(c, tok)
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(["add: 1 + 2 = 3", "copy: a b = a b"] * 20),
    model_writer=buf,
    vocab_size=40,
    hard_vocab_limit=False,
    pad_id=0,
    unk_id=1,
    bos_id=2,
    eos_id=3,
    minloglevel=2,
  )
  no_mask = Tokenizer(buf.getvalue(), name="no_mask.model")
  with pytest.raises(ValueError, match=r"no mask token '\[MASK\]'.*MLM"):
    mlm.MLM(_config(suite_dir), no_mask)


@pytest.fixture(scope="module")
def model(suite_dir, tok):
  """(jitted apply_fn, params) of the tiny bidirectional test model."""
  cfg = init.model_config(_config(suite_dir), tok)
  module = transformer.Transformer(cfg)
  params = jax.jit(module.init)(
    jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)
  )
  apply_fn = jax.jit(train.make_apply_fn(module), static_argnames="train")
  return apply_fn, params["params"]


def test_loss_matches_numpy_for_fixed_mask(suite_dir, tok, model):
  obj = mlm.MLM(_config(suite_dir), tok)
  apply_fn, params = model
  batch = _packed_batch(rows=4, t=32, seed=3)
  rng = np.random.default_rng(1)
  selected = (rng.random(batch["targets"].shape) < 0.3) & (batch["weights"] > 0)
  inputs = np.where(selected, 4, batch["targets"]).astype(np.int32)
  obj.corrupt = lambda b, r: (jnp.asarray(inputs), jnp.asarray(selected))
  loss_sum, weight, mets = obj.loss(
    apply_fn, params, batch, jax.random.PRNGKey(0), train=False
  )
  logits = np.asarray(
    apply_fn(params, inputs, batch["positions"], batch["segment_ids"]),
    np.float64,
  )  # [B, T, V]
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
  np.testing.assert_allclose(loss_sum, nll[selected].sum(), rtol=1e-5)
  assert float(weight) == selected.sum()
  correct = logits.argmax(-1) == batch["targets"]
  np.testing.assert_allclose(
    mets["masked_accuracy"][0], correct[selected].sum()
  )
  np.testing.assert_allclose(mets["masked_accuracy"][1], selected.sum())


def test_bidirectional_in_mlm_mode_only(suite_dir, tok, model):
  """A later token changes earlier logits under MLM, never under CLM."""
  tokens = jnp.asarray(np.random.default_rng(0).integers(5, 300, (2, 16)))
  changed = tokens.at[:, 9].set(tokens[:, 9] + 1)
  pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
  seg = jnp.ones((2, 16), jnp.int32)
  config = _config(suite_dir)  # as configs/pretrain_mlm.py: causal=False
  params = model[1]
  for causal in (False, True):
    config.model.causal = causal
    cfg = init.model_config(config, tok)
    apply = jax.jit(transformer.Transformer(cfg).apply)
    a, b = (apply({"params": params}, x, pos, seg) for x in (tokens, changed))
    earlier = np.abs(np.asarray(a[:, :9] - b[:, :9])).max(-1)  # [B, 9]
    if causal:
      assert earlier.max() == 0.0
    else:
      assert earlier.min() > 1e-5


def test_mask_is_pure_function_of_rng_and_step(suite_dir, tok):
  obj = mlm.MLM(_config(suite_dir), tok)
  batch = jax.tree.map(jnp.asarray, _packed_batch(rows=4))
  state_rng = jax.random.PRNGKey(0)

  corrupt = jax.jit(obj.corrupt)

  def at(step, rng=state_rng):
    return corrupt(batch, jax.random.fold_in(rng, step))

  for x, y in zip(at(5), at(5), strict=True):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(at(5)[1], at(6)[1])
  assert not np.array_equal(at(5)[1], at(5, jax.random.PRNGKey(1))[1])


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_resumed_run_reproduces_masks(suite_dir, tmp_path, capsys):
  """Resuming from step 2 of 4 retraces the uninterrupted run exactly.

  The uninterrupted run's workdir, less its final checkpoint, is resumed:
  two runs instead of three, as masks come from (state.rng, state.step).
  """
  config = _config(suite_dir, total_steps=4, checkpoint_every=2, eval_every=0)
  whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
  train.run(config, whole)
  shutil.copytree(whole, resumed)
  shutil.rmtree(os.path.join(checkpoint.checkpoint_dir(resumed), "4"))
  capsys.readouterr()
  train.run(config, resumed)
  assert "from checkpoint at step 2" in capsys.readouterr().out
  a, b = _rows(whole), _rows(resumed)
  keys = ("train/loss", "train/masked_accuracy", "train/grad_norm")
  for key in keys:
    va = {r["step"]: r[key] for r in a if key in r}
    vb = {r["step"]: r[key] for r in b if key in r}
    assert sorted(va) == sorted(vb) == [1, 2, 3, 4], key
    for s in va:
      np.testing.assert_allclose(va[s], vb[s], rtol=1e-6, err_msg=f"{key}@{s}")


def test_eval_step_is_deterministic_and_logs_masked_accuracy(
  suite_dir, tok, model
):
  obj = mlm.MLM(_config(suite_dir), tok)
  apply_fn, params = model
  batch = _packed_batch(rows=4, t=32, seed=5)
  eval_step = jax.jit(steps.make_eval_step(obj, apply_fn))
  a, b = (eval_step(params, None, batch) for _ in range(2))
  assert set(a) == {"loss", "masked_accuracy"}
  chex.assert_trees_all_equal(a, b)
  assert a["loss"][1] == a["masked_accuracy"][1] > 0
