"""MLM: masking statistics, loss vs numpy, bidirectionality, resume."""

import io
import json
import os
import shutil
import types

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


# pad, unk, bos, eos, [MASK] as in the test tokenizer; vocab as _packed_batch
SPECIALS, MASK_ID, VOCAB = (0, 1, 2, 3, 4), 4, 300


def _stub_mlm(rates=(0.15, 0.8, 0.1)):
  """An MLM objective over a stand-in tokenizer (no fixture: chex.TestCase)."""
  tok = types.SimpleNamespace(
    pad_id=0, unk_id=1, bos_id=2, eos_id=3, mask_id=4, vocab_size=VOCAB
  )
  rate, p_mask, p_rand = rates
  c = ml_collections.ConfigDict(
    dict(
      mlm=dict(
        mask_rate=rate, mask_token_rate=p_mask, random_token_rate=p_rand
      ),
      model=dict(causal=False),
    )
  )
  return mlm.MLM(c, tok)


class CorruptTest(chex.TestCase):
  """`MLM.corrupt` (what the loss applies) against hand-derived rates."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_one_key_masks_at_the_rates_and_only_eligible_tokens(self):
    obj = _stub_mlm()
    batch = jax.tree.map(jnp.asarray, _packed_batch(rows=128, t=128, seed=11))
    tokens = np.asarray(batch["targets"])
    eligible = (np.asarray(batch["segment_ids"]) > 0) & ~np.isin(
      tokens, SPECIALS
    )
    corrupt = self.variant(obj.corrupt)
    inputs, sel = corrupt(batch, jax.random.fold_in(jax.random.PRNGKey(0), 5))
    chex.assert_shape([inputs, sel], tokens.shape)
    assert sel.dtype == jnp.bool_ and inputs.dtype == tokens.dtype
    inputs, sel = np.asarray(inputs), np.asarray(sel)
    # Specials and padding never chosen; nothing unchosen is changed.
    assert not sel[~eligible].any()
    np.testing.assert_array_equal(inputs[~sel], tokens[~sel])
    # One draw over ~12k eligible tokens: binomial tolerance (4 sigma).
    n = eligible.sum()
    assert n > 10_000, n
    frac = sel[eligible].mean()
    assert abs(frac - 0.15) < 4 * np.sqrt(0.15 * 0.85 / n), frac
    # Among the ~1.8k chosen: 80% [MASK], 10% random, 10% unchanged.
    m = sel.sum()
    chosen_in, chosen_tok = inputs[sel], tokens[sel]
    is_mask = chosen_in == MASK_ID
    is_rand = ~is_mask & (chosen_in != chosen_tok)
    kept = chosen_in == chosen_tok
    n_random = VOCAB - len(SPECIALS)  # a random draw may hit the token itself
    for got, p in (
      (is_mask.mean(), 0.8),
      (is_rand.mean(), 0.1 * (1 - 1 / n_random)),
      (kept.mean(), 0.1 + 0.1 / n_random),
    ):
      assert abs(got - p) < 4 * np.sqrt(p * (1 - p) / m), (got, p)
    # Random replacements are ordinary tokens of the vocabulary.
    rand = chosen_in[is_rand]
    assert not np.isin(rand, SPECIALS).any() and rand.max() < VOCAB

  @chex.variants(with_jit=True, without_jit=True)
  def test_masks_are_a_function_of_the_key_only(self):
    obj = _stub_mlm()
    batch = jax.tree.map(jnp.asarray, _packed_batch(rows=32, t=64, seed=2))
    corrupt = self.variant(obj.corrupt)
    key = jax.random.PRNGKey(0)

    def at(step, rng=key):  # as the train step derives it
      return jax.device_get(corrupt(batch, jax.random.fold_in(rng, step)))

    base = at(5)
    chex.assert_trees_all_equal(at(5), base)  # same key: same masks
    n_sel = base[1].sum()
    for other in (at(6), at(5, jax.random.PRNGKey(1))):
      assert other[1].sum() > 0 and not np.array_equal(other[1], base[1])
      # Independent draws: P(chosen by both | chosen once) ~ mask_rate, not
      # ~1 (a key that ignores the step) nor ~0.
      both = (other[1] & base[1]).sum() / n_sel
      assert 0.02 < both < 0.4, both


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _record_train_masks(monkeypatch):
  """Patches `MLM.corrupt` to report each traced call's (inputs, selected)
  to the host: one entry per train step, in order (steps run in sequence)."""
  seen, corrupt = [], mlm.MLM.corrupt

  def spy(self, batch, rng):
    inputs, selected = corrupt(self, batch, rng)
    jax.debug.callback(
      lambda i, s: seen.append((np.asarray(i), np.asarray(s))),
      inputs,
      selected,
    )
    return inputs, selected

  monkeypatch.setattr(mlm.MLM, "corrupt", spy)
  return seen


def test_resumed_run_reproduces_masks(suite_dir, tmp_path, capsys, monkeypatch):
  """Resuming from step 2 of 4 retraces the uninterrupted run exactly: the
  same masked rows at each step, and one metrics row per step.

  The uninterrupted run's workdir, less its final checkpoint, is resumed:
  two runs instead of three, as masks come from (state.rng, state.step).
  """
  config = _config(suite_dir, total_steps=4, checkpoint_every=2, eval_every=0)
  whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
  masks = _record_train_masks(monkeypatch)
  train.run(config, whole)
  jax.effects_barrier()
  whole_masks = list(masks)
  masks.clear()
  shutil.copytree(whole, resumed)
  shutil.rmtree(os.path.join(checkpoint.checkpoint_dir(resumed), "4"))
  capsys.readouterr()
  train.run(config, resumed)
  jax.effects_barrier()
  assert "from checkpoint at step 2" in capsys.readouterr().out
  # Per step (3 and 4 after the resume): the same corrupted rows and masks.
  assert len(whole_masks) == 4 and len(masks) == 2
  for step, (got, want) in enumerate(
    zip(masks, whole_masks[2:], strict=True), start=3
  ):
    chex.assert_shape(got[1], (config.batch_size, config.seq_len))
    assert got[1].sum() > 0, step
    np.testing.assert_array_equal(got[1], want[1], err_msg=f"mask @{step}")
    np.testing.assert_array_equal(got[0], want[0], err_msg=f"inputs @{step}")
  # Exactly one metrics row per step (the resume truncates, then appends),
  # and per step the same metrics, which depend on the masks.
  a, b = _rows(whole), _rows(resumed)
  keys = ("train/loss", "train/masked_accuracy", "train/grad_norm")
  for rows in (a, b):
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
  for key in keys:
    va = [r[key] for r in a if key in r]
    vb = [r[key] for r in b if key in r]
    assert len(va) == len(vb) == 4, key
    np.testing.assert_allclose(va, vb, rtol=1e-6, err_msg=key)
  # And the final weights agree.
  mesh = train.sharding.make_mesh(config.mesh)
  chex.assert_trees_all_close(
    checkpoint.load_params(resumed, mesh),
    checkpoint.load_params(whole, mesh),
    rtol=1e-6,
    atol=1e-7,
  )


def test_eval_step_masks_are_fixed_and_differ_between_rows(
  suite_dir, tok, model
):
  """Eval masks with a fixed key: the same masks at every call (and with or
  without jit), different masks for identical rows, and the loss is the CE
  of exactly the masked positions (hand-computed in numpy)."""
  obj = mlm.MLM(_config(suite_dir), tok)
  apply_fn, params = model
  one = _packed_batch(rows=1, t=64, seed=5)
  batch = {k: np.repeat(v, 4, axis=0) for k, v in one.items()}  # same rows
  seen, corrupt = [], obj.corrupt

  def spy(b, rng):  # called eagerly below: the values are concrete
    out = corrupt(b, rng)
    seen.append(jax.device_get(out))
    return out

  obj.corrupt = spy
  eval_step = steps.make_eval_step(obj, apply_fn)  # not jitted: spy sees all
  a, b = (eval_step(params, None, batch) for _ in range(2))
  assert set(a) == {"loss", "masked_accuracy"}
  (in_a, sel_a), (in_b, sel_b) = seen
  np.testing.assert_array_equal(sel_a, sel_b)  # fixed across calls
  np.testing.assert_array_equal(in_a, in_b)
  chex.assert_trees_all_equal(a, b)
  # Identical rows, different masks: the key is not reused per row.
  assert len({r.tobytes() for r in sel_a}) == 4
  assert sel_a.any(-1).all() and not sel_a[batch["weights"] == 0].any()
  # Loss sums and weights over the selected positions only.
  logits = np.asarray(
    apply_fn(params, in_a, batch["positions"], batch["segment_ids"]),
    np.float64,
  )  # [B, T, V]
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
  np.testing.assert_allclose(a["loss"][0], nll[sel_a].sum(), rtol=1e-5)
  assert float(a["loss"][1]) == float(a["masked_accuracy"][1]) == sel_a.sum()
  correct = (logits.argmax(-1) == batch["targets"])[sel_a].sum()
  np.testing.assert_allclose(a["masked_accuracy"][0], correct)
  # The jitted step (as the trainer runs it) gives the same numbers.
  obj.corrupt = corrupt
  c = jax.jit(steps.make_eval_step(obj, apply_fn))(params, None, batch)
  chex.assert_trees_all_close(c, a, rtol=1e-5)
