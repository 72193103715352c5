"""Reward model: Bradley-Terry by hand, the score's position, the margin
column, runs (full FT, LoRA, QLoRA) and export as a transformers sequence
classifier."""

import dataclasses
import json
import math
import os

import hf_models
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import tiny_config

from jft import checkpoint, init, sharding, train
from jft.data import pipeline
from jft.data.jsonl import DataError, Record
from jft.data.tokenizer import Tokenizer
from jft.interop import hf, peft
from jft.interop.hf import config as hf_config
from jft.models import transformer
from jft.objectives import reward
from jft.peft import lora
from jft.state import flat_paths, split_params


def _config(suite_dir, **overrides):
  c = tiny_config(suite_dir, objective="reward")
  c.model.head = "score"
  c.data.train_files = str(suite_dir / "pref_train.jsonl")
  c.data.eval_files = str(suite_dir / "pref_eval.jsonl")
  for k, v in overrides.items():
    node = c
    *head, last = k.split(".")
    for h in head:
      node = node[h]
    node[last] = v
  return c


@pytest.fixture(scope="module")
def obj(suite_dir):
  config = _config(suite_dir)
  return reward.RewardModel(config, Tokenizer.load(config.data.tokenizer))


def _rec(d, where="prefs.jsonl:4"):
  r = Record(d)
  r.where = where
  return r


def _batch(examples, pad_id=0, batch_size=None):
  return pipeline.make_eval_batches(
    examples,
    seq_len=8,
    batch_size=batch_size or len(examples),
    pad_id=pad_id,
    packing=False,
  )[0]


# ------------------------------------------------------------------ loss


def _lookup_apply(params, inputs, positions, segment_ids, **_):
  """A stand-in score model: the score at each position is 0.25 * id - 2,
  so a sequence's reward is fixed by its last token alone."""
  del params, positions, segment_ids
  return 0.25 * inputs.astype(jnp.float32) - 2.0  # [2B, T]


def test_loss_matches_bradley_terry_by_hand(suite_dir):
  # score(id) = 0.25 id - 2; pad (id 0) would score -2 if it were read.
  #   pair  chosen ends  r_c   rejected ends  r_r   margin  z = r_c-r_r-m
  #   A     12           1.0   6             -0.5   1.0      0.5
  #   B     8            0.0   10             0.5   0        -0.5
  #   C     4           -1.0   2             -1.5   0.5      0.0
  # -log sigmoid(z) = log(1 + e^-z): A 0.474077, B 0.974077, C 0.693147
  # center 0.1 (r_c + r_r)^2:        A 0.025,    B 0.025,    C 0.625
  # sum = 0.499077 + 0.999077 + 1.318147 = 2.816301 over 3 pairs
  config = _config(suite_dir, **{"reward.center_rewards_coefficient": 0.1})
  o = reward.RewardModel(config, Tokenizer.load(config.data.tokenizer))
  examples = [
    reward.pair_example([1, 20], [30, 12], [6], 1.0, pad_id=0),
    reward.pair_example([1, 21, 22], [8], [31, 32, 10], 0.0, pad_id=0),
    reward.pair_example([1], [4], [2], 0.5, pad_id=0),
  ]
  batch = _batch(examples, batch_size=4)  # + one all-padding row
  loss_sum, n, mets = o.loss(_lookup_apply, {}, batch, None, False)
  per_pair = [
    math.log1p(math.exp(-0.5)) + 0.025,
    math.log1p(math.exp(0.5)) + 0.025,
    math.log(2.0) + 0.625,
  ]
  assert float(n) == 3.0
  assert float(loss_sum) == pytest.approx(sum(per_pair), rel=1e-6)
  assert float(loss_sum) == pytest.approx(2.816301, abs=1e-6)
  mean = {k: float(s) / float(w) for k, (s, w) in mets.items()}
  assert mean["accuracy"] == pytest.approx(2 / 3)  # A and C
  assert mean["margin"] == pytest.approx((1.5 - 0.5 + 0.5) / 3)
  assert mean["mean_reward"] == pytest.approx((0.25 + 0.25 - 1.25) / 3)
  assert mean["chosen_reward"] == pytest.approx(0.0, abs=1e-7)
  assert mean["rejected_reward"] == pytest.approx(-0.5)
  # Without centering and margins, pair A alone: -log sigmoid(1.5).
  config.reward.center_rewards_coefficient = 0.0
  one = reward.pair_example([1, 20], [30, 12], [6], 0.0, pad_id=0)
  loss_sum, _, _ = o.loss(_lookup_apply, {}, _batch([one]), None, False)
  assert float(loss_sum) == pytest.approx(math.log1p(math.exp(-1.5)))


def _tiny_score_model(obj, seed=0):
  cfg = init.model_config(obj.config, obj.tokenizer)
  assert cfg.head == "score"
  model = transformer.Transformer(cfg)
  params = jax.jit(model.init)(
    jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32)
  )
  params = jax.tree.map(lambda x: x * 3.0, params["params"])  # larger scores
  return train.make_apply_fn(model), params


def test_score_is_read_at_the_last_token(obj, suite_dir):
  """Each reward is the score at the sequence's eos: equal to the model
  run on that sequence alone; padding after it changes nothing, the eos
  token itself does."""
  tok = obj.tokenizer
  records = pipeline.read_jsonl_files(obj.config.data.eval_files)[:3]
  records.append(
    _rec({"prompt": "1 + 2 =", "chosen": " 3", "rejected": " 3 3"})
  )
  examples = obj.make_examples(records, split="eval")
  batch = pipeline.make_eval_batches(
    examples,
    seq_len=obj.config.seq_len,
    batch_size=4,
    pad_id=tok.pad_id,
    packing=False,
  )[0]
  apply_fn, params = _tiny_score_model(obj)
  rc, rr = jax.jit(obj.rewards, static_argnums=0)(apply_fn, params, batch)
  alone = jax.jit(lambda p, x: apply_fn(p, x, None, None)[0, -1])
  for i in (0, 3):
    ex = examples[i]
    for ids, w, got in (
      (ex["inputs"], ex["weights"], rc[i]),
      (ex["rej_inputs"], ex["rej_weights"], rr[i]),
    ):
      seq = ids[w > 0]
      assert seq[-1] == tok.eos_id
      want = alone(params, jnp.asarray(seq[None]))
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  loss_fn = jax.jit(lambda p, b: obj.loss(apply_fn, p, b, None, False)[0])
  loss = float(loss_fn(params, batch))

  def loss_with(key, row, col, token):
    b = {k: np.array(v) for k, v in batch.items()}
    b[key][row, col] = token
    return float(loss_fn(params, b))

  # row 3: chosen is one token shorter than rejected, padded inside the row
  last_c = int(np.sum(batch["weights"][3])) - 1
  last_r = int(np.sum(batch["rej_weights"][3])) - 1
  assert last_r > last_c
  other = tok.encode("7")[0]
  assert loss_with("inputs", 3, last_c + 1, other) == loss  # padding
  assert loss_with("rej_inputs", 3, last_r + 1, other) == loss
  assert loss_with("inputs", 3, last_c, other) != loss  # the eos
  assert loss_with("rej_inputs", 3, last_r, other) != loss


def test_objective_needs_the_score_head(suite_dir, obj):
  config = _config(suite_dir, **{"model.head": "lm"})
  with pytest.raises(ValueError, match=r"config\.model\.head='lm'"):
    reward.RewardModel(config, obj.tokenizer)
  # A model built with another head fails in the loss, naming the key.
  lm_cfg = dataclasses.replace(
    init.model_config(obj.config, obj.tokenizer), head="lm"
  )
  model = transformer.Transformer(lm_cfg)
  params = jax.jit(model.init)(
    jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)
  )
  records = pipeline.read_jsonl_files(obj.config.data.eval_files)[:2]
  batch = _batch(obj.make_examples(records), obj.tokenizer.pad_id)
  apply_fn = train.make_apply_fn(model)
  with pytest.raises(ValueError, match=r"config\.model\.head='score'"):
    jax.eval_shape(
      lambda p: obj.loss(apply_fn, p, batch, None, False), params["params"]
    )


# ------------------------------------------------------------------ data


def test_margin_column(obj):
  rows = [
    _rec({"prompt": "1 + 2 =", "chosen": " 3", "rejected": " 4"}),
    _rec({"prompt": "1 + 2 =", "chosen": " 3", "rejected": " 9", "margin": 2}),
    _rec({"prompt": "p", "chosen": "a b", "rejected": "c", "margin": -0.5}),
  ]
  out = obj.make_examples(rows)
  for ex, want in zip(out, (0.0, 2.0, -0.5), strict=True):
    last = int(np.sum(ex["weights"])) - 1
    assert ex["inputs"][last] == obj.tokenizer.eos_id
    assert ex["margin"][last] == want
    assert np.count_nonzero(np.delete(ex["margin"], last)) == 0
    # unshifted: the sequence starts with bos and ends with eos
    assert ex["inputs"][0] == obj.tokenizer.bos_id
    assert ex["rej_inputs"][int(np.sum(ex["rej_weights"])) - 1] == (
      obj.tokenizer.eos_id
    )


@pytest.mark.parametrize("bad", ["1.5", True, [1], {"m": 1}, float("nan")])
def test_bad_margin_names_file_and_line(obj, bad):
  row = {"prompt": "p", "chosen": "a", "rejected": "b", "margin": bad}
  with pytest.raises(DataError) as e:
    obj.make_examples([_rec(row, "prefs.jsonl:9")])
  assert "prefs.jsonl:9" in str(e.value) and "'margin'" in str(e.value)


def test_bad_margin_in_a_file(obj, tmp_path):
  path = tmp_path / "pairs.jsonl"
  rows = [
    {"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1.0},
    {"prompt": "p", "chosen": "a", "rejected": "b", "margin": "high"},
  ]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  with pytest.raises(DataError, match=rf"{path}:2: field 'margin'"):
    obj.make_examples(pipeline.read_jsonl_files(str(path)))


def test_invalid_rows_and_long_pairs_are_counted(suite_dir, capsys):
  config = _config(suite_dir, **{"reward.on_invalid": "skip", "seq_len": 8})
  o = reward.RewardModel(config, Tokenizer.load(config.data.tokenizer))
  out = o.make_examples(
    [
      _rec({"prompt": "p", "chosen": "a", "rejected": "a"}),
      _rec({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "x"}),
      _rec({"prompt": "p", "chosen": "a", "rejected": "b"}),
      _rec({"prompt": "abcdefgh", "chosen": "a", "rejected": "b"}),
      _rec({"prompt": "p", "chosen": "a b c d e f g h", "rejected": "b"}),
    ]
  )
  assert len(out) == 2 and all(len(ex["inputs"]) <= 8 for ex in out)
  stats = o.data_stats
  assert stats["data/train_invalid"] == 2
  assert stats["data/train_truncated"] == 1
  assert stats["data/train_skipped"] == 1
  assert "invalid" in capsys.readouterr().out


# ------------------------------------------------------------------ runs


@pytest.fixture(scope="module")
def easy_pairs(suite_dir, tmp_path_factory):
  """Suite prompts; chosen = the true answer, rejected = clearly wrong."""
  d = tmp_path_factory.mktemp("easy")
  paths = {}
  for split, n in (("train", 96), ("eval", 32)):
    rows = pipeline.read_jsonl_files(str(suite_dir / f"sft_{split}.jsonl"))
    out = [
      {"prompt": r["prompt"], "chosen": r["completion"], "rejected": " ? ? ?"}
      for r in rows[:n]
    ]
    paths[split] = d / f"{split}.jsonl"
    paths[split].write_text("".join(json.dumps(r) + "\n" for r in out))
  return paths


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _score_kernel(workdir):
  mesh = sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1))
  flat = flat_paths(checkpoint.load_params(workdir, mesh))
  return np.asarray(flat["score/kernel"])


@pytest.mark.parametrize("technique", ["full", "lora", "qlora"])
def test_reward_runs_learn_easy_pairs(
  suite_dir, easy_pairs, tmp_path, technique
):
  config = tiny_config(
    suite_dir,
    config_file="configs/reward.py",
    total_steps=16,
    eval_every=16,
    checkpoint_every=16,
    log_every=1,
  )
  assert config.objective == "reward" and config.model.head == "score"
  config.model.preset = "tiny"
  config.data.train_files = str(easy_pairs["train"])
  config.data.eval_files = str(easy_pairs["eval"])
  config.optimizer.lr = 3e-3
  config.optimizer.warmup_steps = 2
  if technique != "full":
    config.lora.rank = 4
    config.lora.alpha = 8.0
  if technique == "qlora":
    config.quant.kind = "nf4"
    config.quant.block_size = 16  # divides d_model 32 and mlp_dim 64
  workdir = str(tmp_path / technique)
  train.run(config, workdir)
  rows = _rows(workdir)
  losses = [r["train/loss"] for r in rows if "train/loss" in r]
  assert len(losses) == 16 and all(np.isfinite(losses))
  assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.1
  first, last = rows[0], rows[-1]
  for split in ("train", "eval"):
    for name in reward.RewardModel.summary_rows:
      assert name[1].replace("eval/", f"{split}/") in last
    for name in ("accuracy", "margin", "chosen_reward", "rejected_reward"):
      assert f"{split}/{name}" in last
  assert last["eval/loss"] < first["eval/loss"]
  assert last["eval/margin"] > first["eval/margin"]
  assert last["eval/accuracy"] >= 0.9
  assert first["data/train_pairs"] == 96
  if technique != "full":
    # The score head trains next to the adapters (lora.ADAPTER_FREEZE).
    model_cfg = init.model_config(config, Tokenizer.load(config.data.tokenizer))
    mesh = sharding.make_mesh(config.mesh)
    params = init.init_params(
      config, model_cfg, mesh, sharding.rules_from_config(config.mesh)
    )
    trainable, _ = split_params(params, lora.ADAPTER_FREEZE)
    names = flat_paths(trainable)
    assert "score/kernel" in names
    assert all("lora_" in p or p == "score/kernel" for p in names)
    assert first["params/trainable"] == transformer.param_count(trainable)
    start = np.asarray(flat_paths(params)["score/kernel"])
    assert np.abs(_score_kernel(workdir) - start).max() > 1e-3
    # configs/reward.py exports the merged sequence classifier, no adapters
    merged = hf.load_hf_config(os.path.join(workdir, "merged"))
    assert merged["architectures"] == ["LlamaForSequenceClassification"]
    assert not os.path.exists(os.path.join(workdir, "adapters"))


def test_peft_adapters_of_a_reward_model_are_refused(obj):
  config = obj.config.copy_and_resolve_references()
  config.lora.rank = 4
  cfg = init.model_config(config, obj.tokenizer)
  model = transformer.Transformer(cfg)
  params = jax.jit(model.init)(
    jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)
  )
  with pytest.raises(ValueError, match="save_merged=True"):
    peft.save_adapter("/nonexistent", params["params"], cfg)


# ---------------------------------------------------------------- export


EXPORT_CASES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"]
EXPORT_CASES += ["gemma3"]


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_export_as_sequence_classifier(case, tmp_path):
  """A reward model with a random score head, exported, loaded by
  AutoModelForSequenceClassification: its logits [B, 1] on right-padded
  rows (pad 0, eos 2) equal jft's score at each row's last token."""
  src = hf_models.save(hf_models.make_model(case), str(tmp_path / "src"))
  fields = hf.config_from_hf(hf.load_hf_config(src))
  cfg = transformer.config_from_dict({**fields, "head": "score"})
  base = hf.load_params(src, dataclasses.replace(cfg, head="lm"))
  params = init.fit_head(base, cfg, jax.random.PRNGKey(0))
  assert "lm_head" not in params
  rng = np.random.default_rng(4)
  params["score"]["kernel"] = rng.standard_normal((cfg.d_model, 1)).astype(
    np.float32
  )
  out = str(tmp_path / "rm")
  hf.export_model(out, params, cfg, source=src, dtype="float32")
  written = hf.load_hf_config(out)
  assert written["architectures"] == [
    hf_config.SEQ_CLS_ARCHITECTURES[cfg.family]
  ]
  assert written["num_labels"] == 1
  assert written["id2label"] == {"0": "LABEL_0"}
  assert written["label2id"] == {"LABEL_0": 0}
  assert written["tie_word_embeddings"] is False
  assert (written["pad_token_id"], written["eos_token_id"]) == (0, 2)
  assert not os.path.exists(os.path.join(out, hf_config.GENERATION_CONFIG_FILE))

  theirs, info = (
    transformers.AutoModelForSequenceClassification.from_pretrained(
      out, attn_implementation="eager", output_loading_info=True
    )
  )
  assert type(theirs).__name__ == written["architectures"][0]
  assert not info["missing_keys"] and not info["unexpected_keys"]
  lengths = [24, 17, 9]
  tokens = np.zeros((3, 24), np.int64)  # pad 0 after each row's eos
  for i, n in enumerate(lengths):
    tokens[i, : n - 1] = rng.integers(3, hf_models.VOCAB, n - 1)
    tokens[i, n - 1] = 2  # eos
  mask = (tokens != 0).astype(np.int64)
  with torch.no_grad():
    logits = theirs.eval()(
      input_ids=torch.as_tensor(tokens),
      attention_mask=torch.as_tensor(mask),
    ).logits.numpy()
  assert logits.shape == (3, 1)
  positions = np.broadcast_to(np.arange(24), tokens.shape)
  scores = transformer.Transformer(cfg).apply(
    {"params": params},
    jnp.asarray(tokens, jnp.int32),
    jnp.asarray(positions, jnp.int32),
    jnp.asarray(mask, jnp.int32),
  )  # [3, 24]
  ours = reward.at(scores, reward.last_index(jnp.asarray(mask)))
  np.testing.assert_allclose(logits[:, 0], np.asarray(ours), atol=1e-4, rtol=0)
  assert np.abs(np.asarray(ours)).max() > 0.1  # a real test, not zeros

  # Read back by jft: head 'score', the params bit for bit.
  cfg2 = transformer.config_from_dict(hf.config_from_hf(written))
  assert cfg2 == dataclasses.replace(cfg, tie_embeddings=False)
  jax.tree.map(np.testing.assert_array_equal, hf.load_params(out, cfg2), params)


def test_score_export_needs_a_pad_id(tmp_path, capsys):
  src = hf_models.save(
    hf_models.make_model("llama", pad_token_id=None), str(tmp_path / "src")
  )
  fields = hf.config_from_hf(hf.load_hf_config(src))
  cfg = transformer.config_from_dict({**fields, "head": "score"})
  params = init.fit_head(
    hf.load_params(src, dataclasses.replace(cfg, head="lm")),
    cfg,
    jax.random.PRNGKey(0),
  )
  with pytest.raises(ValueError, match="pad_token_id"):
    hf.export_model(str(tmp_path / "a"), params, cfg, source=src)

  class PadIsEos:  # an HF tokenizer without a pad token: jft pads with eos
    bos_id, eos_id, pad_id, eos_ids = 1, 2, 2, (2,)

    def save(self, directory):
      pass

  hf.export_model(str(tmp_path / "b"), params, cfg, tokenizer=PadIsEos())
  assert "pad_token_id 2 is an eos id" in capsys.readouterr().out


def test_classifier_with_more_labels_is_refused():
  c = hf_models.hf_config("llama").to_dict()
  c.update(
    architectures=["LlamaForSequenceClassification"],
    id2label={"0": "a", "1": "b"},
  )
  with pytest.raises(ValueError, match="2 labels"):
    hf.config_from_hf(c, "DIR/config.json")
  c["id2label"] = {"0": "LABEL_0"}
  assert hf.config_from_hf(c)["head"] == "score"
  assert "head" not in hf.config_from_hf(hf_models.hf_config("llama").to_dict())
