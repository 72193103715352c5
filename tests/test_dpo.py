"""DPO family: losses vs numpy by hand, data boundaries, references, runs."""

import json
import math
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import tiny_config
from flax import traverse_util

from jft import checkpoint, evaluators, init, optim, sharding, steps, train
from jft.data import pipeline
from jft.data.jsonl import DataError, Record
from jft.data.tokenizer import Tokenizer
from jft.models import transformer
from jft.objectives import dpo
from jft.peft.lora import LORA_LEAVES
from jft.state import TrainState, split_params

PC = np.array([-3.0, -10.0, -2.5, -7.0])
PR = np.array([-4.0, -9.0, -2.5, -12.0])
RC = np.array([-3.5, -9.5, -3.0, -6.0])
RR = np.array([-3.6, -9.2, -2.0, -11.0])
NC = np.array([2.0, 5.0, 1.0, 4.0])
NR = np.array([3.0, 4.0, 1.0, 6.0])


def logsig(x):
  return -np.log1p(np.exp(-x))


def numpy_reference(loss_type, beta, ls=0.0, gamma=0.5, rpo=0.0, lam=50.0):
  """Each loss written out from its paper / TRL's formula, in numpy."""
  pc, pr, rc, rr = PC, PR, RC, RR
  if loss_type in ("ipo", "simpo", "orpo"):
    pc, pr = PC / NC, PR / NR
  if loss_type == "ipo":
    rc, rr = RC / NC, RR / NR
  h = (pc - rc) - (pr - rr)
  if loss_type == "sigmoid":
    loss = -(1 - ls) * logsig(beta * h) - ls * logsig(-beta * h)
  elif loss_type == "robust":
    loss = (-(1 - ls) * logsig(beta * h) + ls * logsig(-beta * h)) / (
      1 - 2 * ls
    )
  elif loss_type == "ipo":
    loss = (h - 1 / (2 * beta)) ** 2
  elif loss_type == "hinge":
    loss = np.maximum(0, 1 - beta * h)
  elif loss_type == "dpop":
    z = h - lam * np.maximum(0, rc - pc)
    loss = -(1 - ls) * logsig(beta * z) - ls * logsig(-beta * z)
  elif loss_type == "simpo":
    z = beta * (pc - pr) - gamma
    loss = -(1 - ls) * logsig(z) - ls * logsig(-z)
  elif loss_type == "orpo":
    odds = lambda p: p - np.log1p(-np.exp(p))  # log(p / (1 - p)), log space
    loss = -pc - beta * logsig(odds(pc) - odds(pr))
  loss = loss + rpo * (-PC / NC)
  if loss_type in ("simpo", "orpo"):
    return loss, beta * pc, beta * pr
  return loss, beta * (pc - rc), beta * (pr - rr)


@pytest.mark.parametrize(
  "loss_type, kw",
  [
    ("sigmoid", {}),
    ("sigmoid", {"label_smoothing": 0.2}),
    ("robust", {"label_smoothing": 0.2}),
    ("ipo", {}),
    ("hinge", {}),
    ("dpop", {"dpop_lambda": 5.0}),
    ("simpo", {"simpo_gamma": 0.7}),
    ("orpo", {}),
    ("sigmoid", {"rpo_alpha": 0.5}),
  ],
)
@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_losses_match_numpy(loss_type, kw, beta):
  got = dpo.preference_loss(
    *map(jnp.asarray, (PC, PR, RC, RR, NC, NR)),
    loss_type=loss_type,
    beta=beta,
    **kw,
  )
  expect = numpy_reference(
    loss_type,
    beta,
    ls=kw.get("label_smoothing", 0.0),
    gamma=kw.get("simpo_gamma", 0.5),
    rpo=kw.get("rpo_alpha", 0.0),
    lam=kw.get("dpop_lambda", 50.0),
  )
  for g, e in zip(got, expect, strict=True):
    np.testing.assert_allclose(np.asarray(g), e, rtol=1e-5, atol=1e-6)


def test_beta_is_applied_exactly_once():
  # one pair, margin h = (0 - -1) - (-1 - -1) = 1.0; beta = 0.5:
  # loss = -log sigmoid(0.5) = 0.474077..., reward = 0.5 * 1.0
  loss, cr, rr = dpo.preference_loss(
    jnp.array([0.0]),
    jnp.array([-1.0]),
    jnp.array([-1.0]),
    jnp.array([-1.0]),
    jnp.array([1.0]),
    jnp.array([1.0]),
    loss_type="sigmoid",
    beta=0.5,
  )
  assert float(loss[0]) == pytest.approx(math.log1p(math.exp(-0.5)), 1e-6)
  assert float(cr[0]) == pytest.approx(0.5) and float(rr[0]) == 0.0
  # IPO target margin is 1 / (2 beta): zero loss exactly there
  loss, _, _ = dpo.preference_loss(
    jnp.array([1.0]),
    jnp.array([0.0]),
    jnp.array([0.0]),
    jnp.array([0.0]),
    jnp.array([1.0]),
    jnp.array([1.0]),
    loss_type="ipo",
    beta=0.5,
  )
  assert float(loss[0]) == pytest.approx(0.0, abs=1e-7)


@pytest.fixture(scope="module")
def obj(suite_dir):
  config = tiny_config(suite_dir, objective="dpo")
  tok = Tokenizer.load(config.data.tokenizer)
  return dpo.DPO(config, tok)


def _rec(d, where="prefs.jsonl:4"):
  r = Record(d)
  r.where = where
  return r


def test_prompt_boundary_is_the_same_for_chosen_and_rejected(obj):
  tok = obj.tokenizer
  (ex,) = obj.make_examples(
    [_rec({"prompt": "add: 12 + 3 =", "chosen": " 15", "rejected": " 16 1"})]
  )
  p = [tok.bos_id] + tok.encode("add: 12 + 3 =")
  n_p = len(p) - 1  # targets that are prompt tokens
  for pre in ("", "rej_"):
    np.testing.assert_array_equal(ex[pre + "inputs"][: len(p)], p)
    w = ex[pre + "weights"]
    assert not w[:n_p].any() and w[n_p] == 1.0
  ids_c = ex["targets"][ex["weights"] > 0]
  ids_r = ex["rej_targets"][ex["rej_weights"] > 0]
  assert tok.decode(ids_c) == " 15" and ids_c[-1] == tok.eos_id
  assert tok.decode(ids_r) == " 16 1" and ids_r[-1] == tok.eos_id
  # the conversational forms give the same completions
  msgs = {
    "prompt": [{"role": "user", "content": "add: 12 + 3 ="}],
    "chosen": [{"role": "assistant", "content": " 15"}],
    "rejected": [{"role": "assistant", "content": " 16 1"}],
  }
  implicit = {
    "chosen": msgs["prompt"] + msgs["chosen"],
    "rejected": msgs["prompt"] + msgs["rejected"],
  }
  a = dpo.split_pair(_rec(msgs), obj.template)
  b = dpo.split_pair(_rec(implicit), obj.template)
  assert a == b and a[1:] == (" 15", " 16 1")
  assert a[0].endswith(obj.template["assistant"][0])


@pytest.mark.parametrize(
  "row, what",
  [
    ({"prompt": "p", "chosen": "", "rejected": "b"}, "'chosen'"),
    ({"prompt": "p", "chosen": "a"}, "'rejected'"),
    ({"prompt": "p", "chosen": "a", "rejected": "a"}, "identical"),
    ({"chosen": "a", "rejected": "b"}, "'prompt'"),
  ],
)
def test_bad_pairs_name_file_and_line(obj, row, what):
  with pytest.raises(DataError) as e:
    obj.make_examples([_rec(row, "prefs.jsonl:9")])
  assert "prefs.jsonl:9" in str(e.value) and what in str(e.value)


def test_invalid_pairs_can_be_counted_skips(suite_dir, capsys):
  config = tiny_config(suite_dir, objective="dpo")
  config.dpo.on_invalid = "skip"
  o = dpo.DPO(config, Tokenizer.load(config.data.tokenizer))
  out = o.make_examples(
    [
      _rec({"prompt": "p", "chosen": "a", "rejected": "a"}),
      _rec({"prompt": "p", "chosen": "a", "rejected": "b"}),
    ]
  )
  assert len(out) == 1 and o.data_stats["data/train_invalid"] == 1
  assert "invalid" in capsys.readouterr().out


def _policy_and_reference(config, tok):
  """(apply_fn, policy params, other params as the reference) of the
  config's model, from two seeds."""
  model = transformer.Transformer(init.model_config(config, tok))
  make = lambda s: model.init(
    jax.random.PRNGKey(s), jnp.zeros((1, 8), jnp.int32)
  )["params"]
  return train.make_apply_fn(model), make(0), make(1)


def test_objective_loss_matches_hand_computation(obj):
  """Policy and reference log-probs summed by hand from the model logits."""
  config, tok = obj.config, obj.tokenizer

  records = pipeline.read_jsonl_files(config.data.eval_files)[:6]
  batch = pipeline.make_eval_batches(
    obj.make_examples(records),
    seq_len=config.seq_len,
    batch_size=6,
    pad_id=tok.pad_id,
    packing=False,
  )[0]
  apply_fn, policy, ref = _policy_and_reference(config, tok)
  loss_sum, n, mets = obj.loss(apply_fn, policy, batch, None, False, ref=ref)

  fwd = jax.jit(
    lambda p, x: apply_fn(p, x, batch["positions"], batch["segment_ids"])
  )

  def seq_logp(p, pre):
    logits = np.asarray(fwd(p, batch[pre + "inputs"]), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    tok_lp = np.take_along_axis(logp, batch[pre + "targets"][..., None], -1)[
      ..., 0
    ]
    return (tok_lp * batch[pre + "weights"]).sum(-1)

  pc, pr = seq_logp(policy, ""), seq_logp(policy, "rej_")
  rc, rr = seq_logp(ref, ""), seq_logp(ref, "rej_")
  beta = config.dpo.beta
  h = (pc - rc) - (pr - rr)
  assert int(n) == 6
  np.testing.assert_allclose(
    float(loss_sum), -logsig(beta * h).sum(), rtol=1e-4
  )
  np.testing.assert_allclose(
    float(mets["rewards/margins"][0]), (beta * h).sum(), rtol=1e-4, atol=1e-5
  )
  np.testing.assert_allclose(
    float(mets["logps/chosen"][0]), pc.sum(), rtol=1e-4
  )


def _per_pair(obj, apply_fn, params, batches):
  """(pc, pr, nc, nr) of every pair in `batches`, ordered by value."""
  fn = jax.jit(lambda p, b: obj._policy_logps(apply_fn, p, b, None, False))
  out = []
  for batch in batches:
    pc, pr, nc, nr = (np.asarray(x).reshape(-1) for x in fn(params, batch))
    keep = nc > 0
    out += list(zip(pc[keep], pr[keep], nc[keep], nr[keep], strict=True))
  out = np.array(out)
  return out[np.lexsort((out[:, 1].round(3), out[:, 0].round(3)))]


def test_packed_pairs_give_the_padded_per_pair_losses(obj):
  """dpo.pack_pairs: several pairs share a row (chosen and rejected each
  their own segment), yet every pair's log-probs and the loss are the
  padded layout's: no attention crosses sequences."""
  config, tok = obj.config, obj.tokenizer
  packed_cfg = config.copy_and_resolve_references()
  packed_cfg.dpo.pack_pairs = True
  packed = dpo.DPO(packed_cfg, tok)
  records = pipeline.read_jsonl_files(config.data.eval_files)[:12]
  padded_batches = pipeline.make_eval_batches(
    obj.make_examples(records),
    seq_len=config.seq_len,
    batch_size=12,
    pad_id=tok.pad_id,
    packing=False,
  )
  packed_batches = pipeline.make_eval_batches(
    packed.make_examples(records),
    seq_len=2 * config.seq_len,
    batch_size=2,
    pad_id=tok.pad_id,
    packing=True,
  )
  assert max(b["segment_ids"].max() for b in packed_batches) >= 2
  apply_fn, policy, ref = _policy_and_reference(config, tok)
  want = _per_pair(obj, apply_fn, policy, padded_batches)
  got = _per_pair(packed, apply_fn, policy, packed_batches)
  assert want.shape == got.shape == (12, 4)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)

  loss = lambda o, b: o.loss(apply_fn, policy, b, None, False, ref=ref)
  want_sum, want_n, _ = loss(obj, padded_batches[0])
  got = [loss(packed, b)[:2] for b in packed_batches]
  assert sum(int(n) for _, n in got) == int(want_n) == 12
  np.testing.assert_allclose(
    sum(float(s) for s, _ in got), float(want_sum), rtol=1e-5
  )


def test_pair_sums_by_hand():
  """Slot k of a row holds segment k + 1; side picks the column."""
  values = jnp.arange(1.0, 9.0).reshape(1, 8)
  seg = jnp.array([[1, 1, 1, 2, 2, 2, 0, 0]])
  side = jnp.array([[0, 0, 1, 0, 1, 1, 0, 0]])
  got = np.asarray(dpo.pair_sums(values, seg, side))[0]
  np.testing.assert_array_equal(got, [[3, 3], [4, 11], [0, 0], [0, 0]])
  np.testing.assert_array_equal(
    dpo.pair_segments(seg, side), [[1, 1, 2, 3, 4, 4, 0, 0]]
  )


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [r["train/loss"] for r in rows if "train/loss" in r], rows


def test_full_ft_reference_copy_equals_precomputed(suite_dir, tmp_path, capsys):
  """Both references are the initial policy: identical training. A rerun
  reads the precomputed log-probs from the cache (jft.data.refcache) and
  trains exactly as the run that computed them."""
  runs = {}
  for pre in (False, True, "again", "packed"):
    config = tiny_config(
      suite_dir,
      config_file="configs/dpo.py",
      total_steps=2,
      eval_every=2,
      checkpoint_every=2,
    )
    config.dpo.precompute_ref = bool(pre)
    config.dpo.pack_pairs = pre == "packed"
    config.stage_cache = str(tmp_path / "cache")
    config.dpo.rpo_alpha = 0.0  # so the first loss is exactly log 2
    config.sft.max_eval_generations = 8
    config.sft.max_new_tokens = 4
    capsys.readouterr()
    train.run(config, str(tmp_path / f"p{pre}"))
    runs[pre] = _losses(str(tmp_path / f"p{pre}"))
    said = capsys.readouterr().out
    if pre is True:
      assert said.count("reference log-probs (") == 2  # train, eval
      assert "cached in" in said
    elif pre == "again":
      assert said.count("reference log-probs (") == 2
      assert "cached in" not in said and "ref_logps" in said
  np.testing.assert_allclose(runs[False][0], runs[True][0], rtol=1e-5)
  assert runs["again"][0] == runs[True][0]
  assert len(os.listdir(tmp_path / "cache" / "ref_logps")) == 4  # + packed
  # Packed pairs, precomputed reference: the same start (policy ==
  # reference); steps then differ (a row holds more than one pair).
  assert runs["packed"][0][0] == pytest.approx(math.log(2), abs=1e-4)
  assert abs(runs["packed"][1][0]["eval/rewards/margins"]) < 1e-5
  assert runs["packed"][1][0]["eval/logps/chosen"] == pytest.approx(
    runs[True][1][0]["eval/logps/chosen"], rel=1e-5
  )
  assert runs[False][0][0] == pytest.approx(math.log(2), abs=1e-4)
  # policy == reference at step 0: exactly for the copy; the precomputed
  # log-probs come from other batch shapes, so equal up to float noise
  assert runs[False][1][0]["eval/rewards/accuracies"] == 0.0
  rows = runs[True][1]
  assert abs(rows[0]["eval/rewards/margins"]) < 1e-5
  names = {
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
  }
  for split in ("train", "eval"):
    assert {f"{split}/{n}" for n in names} <= set(rows[-1])
  assert os.path.exists(tmp_path / "pTrue" / "summary.md")


@pytest.mark.parametrize("quant", ["", "nf4"])
def test_lora_and_qlora_dpo_runs(suite_dir, tmp_path, quant):
  """configs/dpo.py with LoRA / QLoRA by config keys (shrunk): starts at the
  reference (loss log 2), then the adapters alone train and the loss falls,
  with no copy of the base as the reference."""
  config = tiny_config(
    suite_dir,
    config_file="configs/dpo.py",
    total_steps=3,
    eval_every=0,
    checkpoint_every=3,
  )
  config.lora.rank = 4
  config.dpo.rpo_alpha = 0.0  # so the first loss is exactly log 2
  # Two real updates before the last loss (the config's 5e-5 moves the
  # loss by ~1e-5 in two steps; 1e-3 by ~3e-4).
  config.optimizer.warmup_steps = 0
  config.optimizer.lr = 1e-3
  if quant:
    config.quant.kind = quant
    config.quant.block_size = 16
  workdir = str(tmp_path / "w")
  train.run(config, workdir)
  losses, rows = _losses(workdir)
  assert len(losses) == 3 and all(np.isfinite(losses))
  # adapters start at B = 0: the policy is the reference, loss = log 2
  assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
  assert rows[1]["train/rewards/margins"] == pytest.approx(0.0, abs=1e-6)
  # then DPO moves the policy away from its reference, the right way
  assert max(losses[1:]) < math.log(2) - 5e-5, losses
  assert rows[-1]["train/rewards/margins"] > 0
  # the reference is the base with adapters off: no copy in the state
  assert rows[0]["params/reference_bytes"] == 0
  # only adapters moved: the (4-bit) base is bit-identical to its init
  raw = ocp.PyTreeCheckpointer().restore(
    os.path.join(checkpoint.checkpoint_dir(workdir), "3", "state")
  )
  flat = lambda t: traverse_util.flatten_dict(t, sep="/")
  trainable, frozen = flat(raw["trainable"]), flat(raw["frozen"])
  assert trainable and all(
    k.rsplit("/", 1)[-1] in LORA_LEAVES for k in trainable
  )
  model_cfg = init.model_config(config, Tokenizer.load(config.data.tokenizer))
  start = flat(
    jax.device_get(
      init.init_params(
        config,
        model_cfg,
        sharding.make_mesh(config.mesh),
        sharding.rules_from_config(config.mesh),
      )
    )
  )
  assert set(start) == set(trainable) | set(frozen)
  for k, v in frozen.items():
    np.testing.assert_array_equal(v, start[k], err_msg=k)
  for k, v in trainable.items():  # every adapter (A and B) moved
    assert not np.array_equal(v, start[k]), k


def test_reference_copy_stays_fixed_while_the_policy_trains(obj):
  """Full fine-tuning: `state.ref` (a frozen copy of the starting policy)
  is bit-identical after several train steps while every trainable leaf
  moved; with a moving reference the loss would stay at log 2."""
  config, tok = obj.config, obj.tokenizer
  assert obj.reference == "copy"
  records = pipeline.read_jsonl_files(config.data.train_files)[:8]
  batch = pipeline.make_eval_batches(
    obj.make_examples(records),
    seq_len=config.seq_len,
    batch_size=8,
    pad_id=tok.pad_id,
    packing=False,
  )[0]
  model = transformer.Transformer(init.model_config(config, tok))
  params = jax.jit(model.init)(
    jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)
  )["params"]
  params = jax.tree.map(np.asarray, nn.unbox(params))
  trainable, frozen = split_params(params, ((".*", "trainable"),))
  opt_cfg = config.optimizer.copy_and_resolve_references()
  opt_cfg.schedule, opt_cfg.warmup_steps, opt_cfg.lr = "constant", 0, 1e-3
  opt, sched = optim.make_optimizer(opt_cfg, 10, trainable)
  ref = obj.reference_params(params, trainable)
  chex.assert_trees_all_equal(ref, params)  # a copy of the start
  state = TrainState(
    step=jnp.zeros((), jnp.int32),
    trainable=trainable,
    frozen=frozen,
    opt_state=opt.init(trainable),
    rng=jax.random.PRNGKey(1),
    ref=ref,
  )
  step = jax.jit(
    steps.make_train_step(
      obj, train.make_apply_fn(model), opt, sched, grad_accum_steps=1
    )
  )
  losses, margins = [], []
  for _ in range(4):
    state, m = step(state, batch)
    losses.append(float(m["train/loss"]))
    margins.append(float(m["train/rewards/margins"]))
  chex.assert_trees_all_equal(state.ref, params)
  changed = jax.tree.map(
    lambda a, b: not np.array_equal(a, b), state.trainable, trainable
  )
  assert all(jax.tree.leaves(changed)), changed
  assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
  assert margins[0] == pytest.approx(0.0, abs=1e-6)
  # the same pairs each step: the loss falls and the margin grows
  assert losses[-1] < losses[1] < math.log(2) - 1e-3, losses
  assert margins[-1] > margins[1] > 0, margins


def test_first_divergence_mask_weights_the_error_token_only():
  prompt, chosen, rejected = [2, 50, 51], [60, 61, 62, 3], [60, 70, 62, 3]
  ex = dpo.pair_example(prompt, chosen, rejected, mask="first_divergence")
  n = len(prompt) - 1  # targets before the completion
  # chosen: from the first differing token (61) to eos
  np.testing.assert_array_equal(ex["weights"][n:], [0, 1, 1, 1])
  # rejected: only that token (70, the error)
  np.testing.assert_array_equal(ex["rej_weights"][n:], [0, 1, 0, 0])
  assert ex["rej_targets"][n + 1] == 70 and ex["targets"][n + 1] == 61
  full = dpo.pair_example(prompt, chosen, rejected)
  np.testing.assert_array_equal(full["rej_weights"][n:], [1, 1, 1, 1])
  # a rejected answer that stops early: the error is its eos
  short = dpo.pair_example(
    prompt, [60, 61, 3], [60, 3], mask="first_divergence"
  )
  np.testing.assert_array_equal(short["rej_weights"][n : n + 2], [0, 1])
  with pytest.raises(ValueError, match="config.dpo.mask"):
    dpo.pair_example(prompt, chosen, rejected, mask="bogus")


def test_summary_table_before_and_after(obj):
  first = {
    "eval/rewards/accuracies": 0.0,
    "eval/task_accuracy": 0.5,
    "eval/task_accuracy/add": 0.25,
  }
  last = {
    "eval/rewards/accuracies": 0.9375,
    "eval/task_accuracy": 0.75,
    "eval/task_accuracy/add": 0.5,
  }
  table = evaluators.summary_table(obj.summary_rows, first, last)
  assert table.splitlines() == [
    "| held-out metric | before | after |",
    "| --- | --- | --- |",
    "| preference accuracy (implicit reward) | 0.000 | 0.938 |",
    "| task accuracy (greedy) | 0.500 | 0.750 |",
    "| task accuracy: add | 0.250 | 0.500 |",
  ]


def test_adapters_off_reference_stays_fixed_when_other_leaves_train():
  """LoRA's reference is the base with adapters off; if the freeze table
  also trains a non-adapter leaf, the reference keeps its starting value
  instead of moving with training."""
  from jft.objectives import base

  params = {
    "layers": {
      "attn": {
        "q": {
          "kernel": np.ones((2, 2)),
          "lora_a": np.ones((2, 1)),
          "lora_b": np.ones((1, 2)),
        }
      }
    },
    "final_norm": {"scale": np.ones(2)},
  }
  trainable = {
    "layers": {"attn": {"q": {"lora_a": 0, "lora_b": 0}}},
    "final_norm": {"scale": 0},
  }
  ref = base.Reference("adapters_off")
  stored = ref.stored(params, jax.tree.map(lambda _: np.zeros(2), trainable))
  assert set(stored) == {"final_norm"}  # only the moving non-adapter leaf
  stored = ref.stored(
    params, {"final_norm": {"scale": params["final_norm"]["scale"]}}
  )
  moved = jax.tree.map(lambda x: x + 5.0, params)  # training moved them all
  got = ref.tree(moved, stored)
  np.testing.assert_array_equal(got["final_norm"]["scale"], np.ones(2))
  np.testing.assert_array_equal(got["layers"]["attn"]["q"]["lora_b"], 0.0)
  np.testing.assert_array_equal(  # frozen leaves are the live (frozen) ones
    got["layers"]["attn"]["q"]["kernel"], moved["layers"]["attn"]["q"]["kernel"]
  )
