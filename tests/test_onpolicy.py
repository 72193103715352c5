"""On-policy DPO pairs: sampling, labelling, mining files, the built-in run."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from jft import evaluators, init, train
from jft.data import feed, onpolicy, tasks
from jft.data.tokenizer import Tokenizer
from jft.models import transformer
from jft.objectives import dpo


def _rec(task, prompt):
  return {
    "task": task,
    "prompt": prompt,
    "completion": " " + tasks.answer(task, prompt),
  }


def test_pairs_from_answers_by_hand():
  recs = [
    _rec("add", "add: 2 + 3 ="),  # greedy right, a sample wrong
    _rec("copy", "copy: a b c ="),  # greedy empty (skipped), sample wrong
    _rec("sort", "sort: c a b ="),  # all right: no pair
    _rec("add", "add: 9 + 9 ="),  # greedy wrong: it is the rejected one
  ]
  answers = [
    ["5", " 6"],
    ["", "a b d"],
    ["a b c", " a b c "],
    ["17", "19"],
  ]
  rows, counts = onpolicy.pairs_from_answers(recs, answers)
  assert rows == [
    {"prompt": "add: 2 + 3 =", "chosen": " 5", "rejected": " 6", "task": "add"},
    {
      "prompt": "copy: a b c =",
      "chosen": " a b c",
      "rejected": " a b d",
      "task": "copy",
    },
    {
      "prompt": "add: 9 + 9 =",
      "chosen": " 18",
      "rejected": " 17",
      "task": "add",
    },
  ]
  assert counts == {"add": [2, 2], "copy": [1, 1], "sort": [1, 0]}
  assert "3 of 4 prompts" in onpolicy.summary_line("train", counts)
  with pytest.raises(ValueError, match="answer lists"):
    onpolicy.pairs_from_answers(recs, answers[:2])


def test_mine_asks_greedy_first_then_distinct_sample_keys():
  recs = [_rec("add", "add: 1 + 1 ="), _rec("add", "add: 2 + 2 =")]
  seen = []

  def answer_fn(prompts, key):
    seen.append(None if key is None else tuple(np.asarray(key).tolist()))
    return ["2", "5"] if key is None else ["3", "4"]

  rows, _ = onpolicy.mine(recs, answer_fn, samples=2, seed=0)
  assert seen[0] is None and len(set(seen[1:])) == 2
  # greedy "2" is right for 1 + 1, so the sampled "3" is the rejected one
  assert [r["rejected"] for r in rows] == [" 3", " 5"]


@pytest.fixture(scope="module")
def tiny_model(suite_dir):
  config = tiny_config(suite_dir, objective="dpo")
  config.data.train_files = ""
  config.data.eval_files = ""
  config.data.builtin.n_train = 12
  config.data.builtin.n_eval = 3
  config.dpo.mine_prompts = 20
  config.dpo.mine_samples = 1
  config.sft.max_new_tokens = 4
  tok = Tokenizer.load(config.data.tokenizer)
  model = transformer.Transformer(init.model_config(config, tok))
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
  return config, tok, train.make_apply_fn(model), params["params"]


def test_prepare_data_mines_the_models_own_wrong_answers(
  tiny_model, tmp_path, monkeypatch
):
  config, tok, apply_fn, params = tiny_model
  obj = dpo.DPO(config, tok)
  kw = dict(workdir=str(tmp_path), apply_fn=apply_fn, params=params)
  train_path, eval_path, held_rows = feed.files(
    config, obj, tokenizer=tok, **kw
  )
  with open(os.path.join(tmp_path, "data", "sft_train.jsonl")) as f:
    prompts = [json.loads(line) for line in f][:20]
  greedy = onpolicy.make_answer_fn(
    apply_fn, params, tok, max_new=4, temperature=1.0
  )([r["prompt"] for r in prompts], None)
  with open(train_path) as f:
    rows = {r["prompt"]: r for r in map(json.loads, f)}
  assert rows  # a random model gets (nearly) everything wrong
  greedy_wrong = 0
  for rec, g in zip(prompts, greedy, strict=True):
    row = rows.get(rec["prompt"])
    wrong = g.strip() and not tasks.is_correct(rec["task"], rec["prompt"], g)
    if wrong:  # the greedy answer, when wrong, is the rejected one
      greedy_wrong += 1
      assert row["rejected"] == " " + g.strip()
    if row:
      assert row["chosen"] == rec["completion"]
      assert not tasks.is_correct(rec["task"], rec["prompt"], row["rejected"])
  assert greedy_wrong > 0  # the greedy check above really ran
  assert set(rows) <= {r["prompt"] for r in prompts}
  with open(eval_path) as f:
    held_out = [json.loads(line)["prompt"] for line in f]
  assert all(tasks.split_of(p) == "eval" for p in held_out)
  # task accuracy is scored on every held-out prompt, not only mined ones
  (task_eval,) = evaluators.build(config, tok, held_rows, obj.evaluators)
  assert len(task_eval.records) == 4 * 3
  # a second call (a resumed run) reuses the files without decoding
  monkeypatch.setattr(onpolicy, "mine", None)
  again = feed.files(config, obj, tokenizer=tok, **kw)
  assert again[:2] == (train_path, eval_path)


def test_prepare_data_config_errors(tiny_model, tmp_path):
  config, tok, apply_fn, params = tiny_model
  kw = dict(workdir=str(tmp_path), apply_fn=apply_fn, params=params)
  bad = config.copy_and_resolve_references()
  bad.dpo.mine_prompts = 10**6
  with pytest.raises(ValueError, match="config.dpo.mine_prompts"):
    feed.files(bad, dpo.DPO(bad, tok), tokenizer=tok, **kw)
  bad.dpo.builtin_pairs = "mined"
  with pytest.raises(ValueError, match="config.dpo.builtin_pairs"):
    feed.files(bad, dpo.DPO(bad, tok), tokenizer=tok, **kw)
  # user files are read as given
  user = config.copy_and_resolve_references()
  user.data.train_files, user.data.eval_files = "a.jsonl", "b.jsonl"
  got = feed.files(user, dpo.DPO(user, tok), tokenizer=tok, **kw)
  assert got == ("a.jsonl", "b.jsonl", None)


def test_builtin_dpo_run_trains_on_mined_pairs(tiny_model, tmp_path):
  """The built-in run mines pairs, then trains on them: at step 0 the
  policy is its reference (margin 0, loss log 2); after the step-2 update
  (warmup makes step 1's lr 0) the held-out mined pairs are preferred."""
  config = tiny_model[0].copy_and_resolve_references()
  config.total_steps = 2
  config.eval_every = 2
  config.checkpoint_every = 2
  config.sft.max_eval_generations = 8
  wd = str(tmp_path / "w")
  train.run(config, wd)
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  first, last = rows[0], rows[-1]
  assert [r["step"] for r in rows] == [0, 1, 2]
  with open(os.path.join(wd, "data", "onpolicy_train.jsonl")) as f:
    assert first["data/train_pairs"] == sum(1 for _ in f) > 0
  with open(os.path.join(wd, "data", "onpolicy_eval.jsonl")) as f:
    assert first["data/eval_pairs"] == sum(1 for _ in f) > 0
  assert 0.0 <= first["eval/task_accuracy"] <= 1.0
  assert first["eval/loss"] == pytest.approx(math.log(2), abs=1e-5)
  assert first["eval/rewards/margins"] == pytest.approx(0.0, abs=1e-6)
  assert first["eval/rewards/accuracies"] == 0.0
  assert rows[1]["train/loss"] == pytest.approx(math.log(2), abs=1e-5)
  # One real update (lr 1e-3) on mined pairs: the held-out mined pairs'
  # margin went from 0 to ~0.09, most pairs ranked right (12 of 12 here).
  assert last["step"] == 2
  assert last["eval/rewards/margins"] > 0.02
  assert last["eval/rewards/accuracies"] > 0.5
  assert last["eval/loss"] < math.log(2) - 0.01


def test_unpaired_rows_per_file_without_repeats(tmp_path):
  """KTO's rows: each file of a comma-separated spec unpaired next to it;
  the true answer shared by two pairs of one prompt appears once."""
  a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
  a.write_text(
    json.dumps({"prompt": "p", "chosen": " 3", "rejected": " 4"})
    + "\n"
    + json.dumps({"prompt": "p", "chosen": " 3", "rejected": " 5"})
    + "\n"
  )
  b.write_text(json.dumps({"prompt": "q", "chosen": " x", "rejected": " y"}))
  train, ev = onpolicy.unpaired(f"{a},{b}", str(b))
  assert train == f"{tmp_path / 'a_kto.jsonl'},{tmp_path / 'b_kto.jsonl'}"
  assert ev == str(tmp_path / "b_kto.jsonl")
  rows = [json.loads(x) for x in (tmp_path / "a_kto.jsonl").open()]
  assert rows == [
    {"prompt": "p", "completion": " 3", "label": True},
    {"prompt": "p", "completion": " 4", "label": False},
    {"prompt": "p", "completion": " 5", "label": False},
  ]
