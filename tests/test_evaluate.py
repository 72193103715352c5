"""python -m jft.evaluate: every metric against numbers computed here by
hand (numpy on `.logits`, the scorers on crafted strings), the files it
writes, --compare, an hf: source, and the errors users see.

One tiny SFT run (one step) is trained per module; an HF export of it, a
perturbed copy (a second, different model) and a reward model (the run with
`head='score'`) are made from it without training. Models load once and
keep their compiled functions (`LOAD`)."""

import functools
import hashlib
import json
import os
import shutil
import types

import numpy as np
import pytest
from conftest import tiny_config
from safetensors.numpy import load_file, save_file

import jft
from jft import cli, evaluate, evaluators, scoring, train
from jft import config as base_config
from jft.data import tasks
from jft.data.jsonl import DataError
from jft.errors import UserError
from jft.models import transformer

COMMON = ["--max_new_tokens", "4", "--per_task", "2"]


@functools.cache
def _load(source, adapter, dtype):
  return jft.load(source, adapter=adapter, dtype=dtype)


def LOAD(source, adapter=None, dtype="float32"):  # noqa: N802
  return _load(source, adapter, dtype)


# A user scorer (`--scorer test_evaluate:overlap`): the share of the
# reference's characters the output has.
def overlap(prompt, output, reference):
  del prompt
  ref = set(reference)
  return len(ref & set(output)) / len(ref)


def not_a_number(prompt, output, reference):
  return "yes"


@pytest.fixture(scope="module")
def m(suite_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("evaluate")
  config = tiny_config(suite_dir, objective="sft", total_steps=1, eval_every=0)
  config.checkpoint_every = 1
  config.mesh.num_devices = 1
  run = str(root / "run")
  train.run(config, run)
  lm = LOAD(run)
  hf_dir = str(root / "hf")
  lm.save_hf(hf_dir)
  other = str(root / "other")  # a different model: weights perturbed
  shutil.copytree(hf_dir, other)
  w = load_file(os.path.join(other, "model.safetensors"))
  rng = np.random.default_rng(0)
  w = {
    k: v + 0.5 * rng.standard_normal(v.shape).astype(v.dtype)
    for k, v in w.items()
  }
  save_file(w, os.path.join(other, "model.safetensors"))
  rm = str(root / "rm")  # the run as a reward model: a fresh score head
  shutil.copytree(run, rm)
  with open(os.path.join(rm, "config.json")) as f:
    c = json.load(f)
  c["model"]["head"] = "score"
  with open(os.path.join(rm, "config.json"), "w") as f:
    json.dump(c, f)
  return types.SimpleNamespace(
    root=root,
    run=run,
    hf=f"hf:{hf_dir}",
    other=f"hf:{other}",
    rm=rm,
    lm=lm,
    tok=lm.tokenizer,
    n=0,
  )


def _eval(m, *argv) -> tuple[dict, str]:
  """(eval.json, out dir) of one evaluation into a fresh folder."""
  m.n += 1
  out = str(m.root / f"out{m.n}")
  assert evaluate.main([*argv, *COMMON, "--out", out], load=LOAD) == 0
  with open(os.path.join(out, "eval.json")) as f:
    return json.load(f), out


def _jsonl(path, rows) -> str:
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return str(path)


def _samples(out) -> list[dict]:
  with open(os.path.join(out, "samples.jsonl")) as f:
    return [json.loads(line) for line in f]


def _logp(logits, ids) -> np.ndarray:
  """log p(ids[t] | ids[:t]) for t >= 1, by hand: [T-1]."""
  x = logits.astype(np.float64)
  x = x - x.max(-1, keepdims=True)
  logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
  return np.array([logp[t - 1, ids[t]] for t in range(1, len(ids))])


def _forward(model, ids) -> np.ndarray:
  """model.logits (a reward model: scores) of one sequence, run right-padded
  to 32 tokens so that one shape compiles (attention is causal: padding
  changes nothing before it)."""
  padded = np.full((1, 32), model.tokenizer.pad_id, np.int32)
  padded[0, : len(ids)] = ids
  return model.logits(padded)[0, : len(ids)]


def _seq_logp(model, ids, weights) -> float:
  lp = _logp(_forward(model, ids), ids)
  return float(np.sum(lp * np.asarray(weights[1:])))


def _pair_ids(tok, prompt, completion):
  """bos + prompt + completion + eos, and weights on completion + eos."""
  p = tok.bos_prefix + tok.encode(prompt)
  c = tok.encode(completion) + [tok.eos_id]
  return p + c, [0.0] * len(p) + [1.0] * len(c)


# ------------------------------------------------------------- no model


def test_scorers_on_crafted_strings():
  def row(**kw):
    return {"prompt": "q", **kw}

  exact = evaluators.scorer("exact")
  assert exact(row(completion=" 42"), "42 \n") == 1.0  # whitespace only
  assert exact(row(completion=" 42"), "42.") == 0.0
  assert exact(row(reference="Paris"), "paris") == 0.0
  norm = evaluators.scorer("normalised")
  assert norm(row(answer="the answer is 42"), " The  Answer, is 42!") == 1.0
  assert norm(row(answer="42"), "4 2") == 0.0
  assert evaluators.normalise("  A,b.  C!\t") == "ab c"
  has = evaluators.scorer("contains")
  assert has(row(completion="Paris"), "It is paris.") == 1.0
  assert has(row(completion="42"), "it is 421") == 0.0  # whole words
  assert has(row(completion="new york"), "in New  York!") == 1.0
  assert has(row(completion=["four", "4"]), "Four.") == 1.0  # any of them
  task = evaluators.scorer("task")
  add = {"task": "add", "prompt": "add: 19 + 23 ="}
  assert task(add, " 42") == 1.0 and task(add, " 41") == 0.0
  auto = evaluators.scorer("auto")
  assert auto(add, "42") == 1.0  # the checker
  assert auto(row(task="trivia", completion="b"), "b") == 1.0  # exact
  assert auto(row(task="trivia", completion="b"), "B") == 0.0
  user = evaluators.scorer("test_evaluate:overlap")
  assert user(row(reference="abcd"), "xxab") == 0.5
  with pytest.raises(UserError, match=r"f.jsonl:3: no reference answer"):
    exact(_rec({"prompt": "q"}, "f.jsonl:3"), "x")
  with pytest.raises(UserError, match="reference answer must be a string"):
    exact(row(answer=3), "3")
  with pytest.raises(UserError, match="scorer 'task' needs a built-in task"):
    task(row(task="trivia", completion="b"), "b")


def _rec(d, where):
  from jft.data.jsonl import Record

  r = Record(d)
  r.where = where
  return r


def test_scorer_errors_name_the_flag():
  with pytest.raises(UserError, match=r"--scorer=fuzzy: unknown scorer"):
    evaluators.scorer("fuzzy")
  with pytest.raises(UserError, match=r"--scorer=nomod_xyz:f: cannot import"):
    evaluators.scorer("nomod_xyz:f")
  with pytest.raises(UserError, match=r"has no function 'nothing'"):
    evaluators.scorer("test_evaluate:nothing")
  bad = evaluators.scorer("test_evaluate:not_a_number")
  with pytest.raises(UserError, match=r"returned 'yes' for f.jsonl:2"):
    bad(_rec({"prompt": "q", "answer": "a"}, "f.jsonl:2"), "a")


def test_win_outcomes_count_ties_as_half_and_group_by_task():
  out = evaluators.win_outcomes([1.0, 0.5, 0.0, 2.0, True], [0, 0.5, 1, 2, 0])
  assert out == [1.0, 0.5, 0.0, 0.5, 1.0]
  rows = [{"task": "a"}, {"task": "a"}, {"task": "b"}, {}, {"task": "b"}]
  got = evaluators.accuracy_by_task(rows, out, prefix="win_rate")
  assert got == {"win_rate": 0.6, "win_rate/a": 0.75, "win_rate/b": 0.5}


def test_windows_score_every_token_once_with_enough_context():
  assert scoring.windows(13, 8, 3) == [(0, 8, 1), (3, 11, 8), (6, 13, 11)]
  assert scoring.windows(8, 8, 3) == [(0, 8, 1)]
  for n in range(1, 40):
    for window, stride in ((8, 3), (5, 4), (6, 1)):
      spans = scoring.windows(n, window, stride)
      scored = [t for _, end, first in spans for t in range(first, end)]
      assert scored == list(range(1, n))
      for start, end, first in spans:
        assert end - start <= window
        assert start == 0 or first - start >= window - stride  # context


def test_padded_batches_hold_every_sequence_once_in_few_shapes():
  seqs = [[7] * n for n in (3, 40, 17, 16, 5, 100, 33, 2, 16)]
  got = list(scoring.padded_batches(seqs, 64, 128, 0))
  seen = sorted(i for idx, _ in got for i in idx)
  assert seen == list(range(len(seqs)))
  for idx, arr in got:
    assert arr.shape[0] * arr.shape[1] <= 64 or arr.shape[0] == 1
    for r, i in enumerate(idx):
      assert arr[r, : len(seqs[i])].tolist() == seqs[i]
      assert not arr[r, len(seqs[i]) :].any()
  assert [a.shape for _, a in got] == [
    (4, 16),  # 2, 3, 5, 16
    (1, 16),  # 16
    (1, 32),  # 17
    (1, 64),  # 33
    (1, 64),  # 40
    (1, 128),  # 100
  ]


# ---------------------------------------------------------------- models


def test_perplexity_matches_numpy(m, tmp_path):
  """Text rows score bos..eos; prompt/completion rows only completion +
  eos; a long row in windows of 14 tokens, 5 apart, each token once."""
  tok, lm = m.tok, m.lm
  long = "sort: q w e r t y u i o p a s d f g h j k l ="  # > 2 windows
  rows = [
    {"text": "add: 1 + 2 = 3"},
    {"prompt": "copy: a b =", "completion": " a b"},
    {"text": long},
  ]
  data = _jsonl(tmp_path / "ppl.jsonl", rows)
  got, _ = _eval(
    m, m.run, "--metrics=perplexity", "--perplexity_data", data,
    "--window", "14", "--stride", "5",
  )  # fmt: skip
  ids = tok.bos_prefix + tok.encode("add: 1 + 2 = 3") + [tok.eos_id]
  assert len(ids) <= 14  # one window: the whole row at once
  short = _seq_logp(lm, ids, [1.0] * len(ids))
  count = len(ids) - 1
  ids, w = _pair_ids(tok, "copy: a b =", " a b")
  assert len(ids) <= 14
  short += _seq_logp(lm, ids, w)
  count += sum(w)
  ids = tok.bos_prefix + tok.encode(long) + [tok.eos_id]
  assert len(ids) > 14 + 5  # three windows
  # HF's recipe: windows start every 5 tokens, each scores what the one
  # before did not reach, from its own start.
  windowed, done = 0.0, 1
  for begin in range(0, len(ids), 5):
    end = min(begin + 14, len(ids))
    lp = _logp(_forward(lm, ids[begin:end]), ids[begin:end])
    windowed += float(np.sum(lp[done - begin - 1 :]))
    done = end
    if end == len(ids):
      break
  assert done == len(ids)
  count += len(ids) - 1
  nll = -(short + windowed) / count
  assert got["metrics"]["nll"] == pytest.approx(nll, rel=1e-5)
  assert got["metrics"]["perplexity"] == pytest.approx(np.exp(nll), rel=1e-5)
  assert got["counts"] == {
    "perplexity_rows": 3,
    "perplexity_tokens": count,
    "perplexity_windowed_rows": 1,
  }
  # The default window (2048 for a model that does not say) holds every
  # row: the long one is scored with its whole context.
  got, _ = _eval(m, m.run, "--metrics=perplexity", "--perplexity_data", data)
  full = short + _seq_logp(lm, ids, [1.0] * len(ids))
  assert got["metrics"]["nll"] == pytest.approx(-full / count, rel=1e-5)
  assert got["counts"]["perplexity_windowed_rows"] == 0
  assert abs(full - short - windowed) > 1e-4  # the windows did matter


def test_task_accuracy_on_a_user_file_with_known_answers(m, tmp_path):
  """References equal to the model's own greedy answers are right, others
  wrong; per task over the rows' 'task' field; a module:function scorer
  gets (prompt, output, reference)."""
  prompts = ["copy: a b =", "add: 3 + 4 =", "sort: c a b =", "reverse: x y ="]
  own = m.lm.generate_text(prompts, max_new_tokens=4)
  rows = [
    {"prompt": prompts[0], "completion": own[0], "task": "x"},
    {"prompt": prompts[1], "reference": own[1], "task": "x"},
    {"prompt": prompts[2], "answer": own[2] + "zz", "task": "y"},
    {"prompt": prompts[3], "answer": "not this", "task": "y"},
  ]
  data = _jsonl(tmp_path / "qa.jsonl", rows)
  got, out = _eval(m, m.run, "--task_data", data, "--scorer=exact")
  assert got["metrics"] == {
    "task_accuracy": 0.5,
    "task_accuracy/x": 1.0,
    "task_accuracy/y": 0.0,
  }
  samples = _samples(out)
  assert [s["output"] for s in samples] == own
  assert [s["score"] for s in samples] == [1.0, 1.0, 0.0, 0.0]
  assert samples[2]["reference"] == own[2] + "zz"
  got, _ = _eval(
    m, m.run, "--task_data", data, "--scorer=test_evaluate:overlap"
  )
  want = [
    overlap(p, o, evaluators.reference_of(r))
    for p, o, r in zip(prompts, own, rows, strict=True)
  ]
  assert got["metrics"]["task_accuracy"] == pytest.approx(np.mean(want))
  assert got["metrics"]["task_accuracy/y"] == pytest.approx(np.mean(want[2:]))


def test_builtin_task_accuracy_is_the_in_run_code_path(m, monkeypatch):
  """jft.evaluate and a run's TaskAccuracy evaluator give the same numbers
  on the same prompts: both go through evaluators' scorer and averaging
  (the checker is patched so that the numbers are not all zero)."""
  monkeypatch.setattr(
    tasks, "is_correct", lambda task, prompt, out: len(prompt + out) % 2 == 0
  )
  got, out = _eval(m, m.run)
  records = evaluators.builtin_task_rows(2)
  assert [s["prompt"] for s in _samples(out)] == [r["prompt"] for r in records]
  config = base_config.base_config()
  config.sft.max_new_tokens = 4
  in_run = evaluators.TaskAccuracy(config, m.tok, records)
  apply_fn = train.make_apply_fn(transformer.Transformer(m.lm.config))
  want = in_run(apply_fn, m.lm.params)
  assert 0 < want["eval/task_accuracy"] < 1
  assert got["metrics"] == {k[len("eval/") :]: v for k, v in want.items()}
  assert set(got["settings"]["metrics"].split(",")) == {
    "task_accuracy",
    "samples",
  }


def test_preference_logps_and_implicit_reward(m, tmp_path):
  """logps and implicit-reward accuracy against numpy; a pair and its swap
  disagree; against itself as reference every implicit reward is 0."""
  tok, lm = m.tok, m.lm
  pairs = [
    ("add: 1 + 2 =", " 3", " 4"),
    ("copy: a b c =", " a b c", " a b d"),
    ("sort: b a =", " a b", " b a"),
  ]
  rows = [dict(prompt=p, chosen=c, rejected=r) for p, c, r in pairs]
  rows += [dict(prompt=p, chosen=r, rejected=c) for p, c, r in pairs[:2]]
  data = _jsonl(tmp_path / "pref.jsonl", rows)
  got, _ = _eval(
    m, m.run, "--preference_data", data, "--reference", m.other,
    "--beta", "0.5", "--metrics", "preference",
  )  # fmt: skip
  ref = LOAD(m.other)

  def logps(model):
    out = []
    for r in rows:
      c = _seq_logp(model, *_pair_ids(tok, r["prompt"], r["chosen"]))
      j = _seq_logp(model, *_pair_ids(tok, r["prompt"], r["rejected"]))
      out.append((c, j))
    return np.array(out)

  pol, rf = logps(lm), logps(ref)
  assert got["metrics"]["preference/logps_accuracy"] == pytest.approx(
    np.mean(pol[:, 0] > pol[:, 1])
  )
  reward = 0.5 * (pol - rf)  # [N, 2] chosen, rejected
  assert got["metrics"]["preference/rewards_accuracy"] == pytest.approx(
    np.mean(reward[:, 0] > reward[:, 1])
  )
  assert got["metrics"]["preference/rewards_margin"] == pytest.approx(
    np.mean(reward[:, 0] - reward[:, 1]), rel=1e-4, abs=1e-6
  )
  # A pair and its swap: exactly one of the two is right.
  right = pol[:, 0] > pol[:, 1]
  assert right[0] != right[3] and right[1] != right[4]
  got, _ = _eval(
    m, m.run, "--preference_data", data, "--reference", m.run,
    "--metrics", "preference",
  )  # fmt: skip
  assert got["metrics"]["preference/rewards_accuracy"] == 0.0
  assert got["metrics"]["preference/rewards_margin"] == pytest.approx(
    0.0, abs=1e-4
  )
  assert got["counts"]["preference_pairs"] == 5


def _rm_score(rm, ids) -> float:
  return float(_forward(rm, ids)[-1])


def test_reward_model_preference(m, tmp_path):
  """A reward model (the run with head 'score') scores each sequence at
  its last token (eos); evaluated itself it measures preference only."""
  rm = LOAD(m.rm)
  assert rm.config.head == "score"
  rows = [
    dict(prompt="add: 5 + 5 =", chosen=" 10", rejected=" 11"),
    dict(prompt="reverse: a b =", chosen=" b a", rejected=" a b"),
    dict(prompt="reverse: a b =", chosen=" a b", rejected=" b a"),
  ]
  data = _jsonl(tmp_path / "pref.jsonl", rows)
  got, out = _eval(m, m.rm, "--preference_data", data)
  assert got["head"] == "score" and got["samples"] is None
  assert not os.path.exists(os.path.join(out, "samples.jsonl"))
  s = np.array(
    [
      [
        _rm_score(rm, _pair_ids(m.tok, r["prompt"], r[k])[0])
        for k in ("chosen", "rejected")
      ]
      for r in rows
    ]
  )
  assert set(got["metrics"]) == {
    "preference/rm_accuracy",
    "preference/rm_margin",
  }
  assert got["metrics"]["preference/rm_accuracy"] == pytest.approx(
    np.mean(s[:, 0] > s[:, 1])
  )
  assert got["metrics"]["preference/rm_margin"] == pytest.approx(
    np.mean(s[:, 0] - s[:, 1]), rel=1e-4, abs=1e-6
  )
  assert (s[1, 0] > s[1, 1]) != (s[2, 0] > s[2, 1])  # the swapped pair
  # The same numbers for a language model judged by --reward_model.
  lm_got, _ = _eval(
    m, m.run, "--preference_data", data, "--reward_model", m.rm,
    "--metrics=preference",
  )  # fmt: skip
  for k, v in got["metrics"].items():
    assert lm_got["metrics"][k] == pytest.approx(v)
  assert "preference/logps_accuracy" in lm_got["metrics"]
  with pytest.raises(UserError, match="is a reward model .*task_accuracy"):
    _eval(m, m.rm, "--metrics=task_accuracy")


def test_win_rate_ties_scorer_and_reward_model_judge(m, tmp_path):
  """Against itself every prompt ties (0.5); against another model the
  judge's scores decide, recomputed here from the saved generations."""
  got, out = _eval(m, m.run, "--baseline", m.run)
  n = 4 * 2
  assert got["metrics"]["win_rate"] == 0.5
  assert got["counts"]["win_rate_ties"] == n
  theirs = LOAD(m.other)
  rows = [r for r in evaluators.builtin_task_rows(2)]
  prompts = [r["prompt"] for r in rows]
  ours_txt = m.lm.generate_text(prompts, max_new_tokens=4)
  theirs_txt = theirs.generate_text(prompts, max_new_tokens=4)
  assert ours_txt != theirs_txt
  got, out = _eval(
    m, m.run, "--baseline", m.other, "--scorer=test_evaluate:overlap",
    "--metrics=win_rate,samples",
  )  # fmt: skip
  a = [
    overlap(p, o, r["completion"])
    for p, o, r in zip(prompts, ours_txt, rows, strict=True)
  ]
  b = [
    overlap(p, o, r["completion"])
    for p, o, r in zip(prompts, theirs_txt, rows, strict=True)
  ]
  want = [
    1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b, strict=True)
  ]
  assert got["metrics"]["win_rate"] == pytest.approx(np.mean(want))
  samples = _samples(out)
  assert [s["output"] for s in samples] == ours_txt
  assert [s["baseline_output"] for s in samples] == theirs_txt
  assert [s["outcome"] for s in samples] == want
  c = got["counts"]
  assert (c["win_rate_wins"], c["win_rate_ties"], c["win_rate_losses"]) == (
    want.count(1.0),
    want.count(0.5),
    want.count(0.0),
  )
  # Judged by a reward model: its score of bos + prompt + answer + eos.
  rm = LOAD(m.rm)
  got, _ = _eval(
    m, m.run, "--baseline", m.other, "--reward_model", m.rm,
    "--metrics=win_rate",
  )  # fmt: skip

  def score(p, text):
    ids = m.tok.bos_prefix + m.tok.encode(p) + m.tok.encode(text)
    return _rm_score(rm, ids + [m.tok.eos_id])

  want = [
    float(np.sign(score(p, x) - score(p, y)) + 1) / 2
    for p, x, y in zip(prompts, ours_txt, theirs_txt, strict=True)
  ]
  assert got["metrics"]["win_rate"] == pytest.approx(np.mean(want))


def test_eval_files_and_compare(m, tmp_path, capsys):
  data = _jsonl(tmp_path / "ppl.jsonl", [{"text": "copy: a ="}] * 3)
  first, out1 = _eval(m, m.run, "--perplexity_data", data)
  with open(data, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  assert first["files"]["perplexity_data"] == {
    "path": os.path.abspath(data),
    "sha256": digest,
    "lines": 3,
  }
  assert "builtin" in first["files"]["task_data"]
  assert first["source"] == m.run and first["adapter"] is None
  assert first["created"].endswith("+00:00") and first["jft_code"]
  assert first["settings"]["max_new_tokens"] == 4
  assert len(_samples(out1)) == 8 and first["samples"] == "samples.jsonl"
  with open(os.path.join(out1, "eval.md")) as f:
    md = f.read()
  assert f"# Evaluation of {m.run}" in md
  assert f"| perplexity | {first['metrics']['perplexity']:.4f} |" in md
  assert (
    f"| perplexity_data | {os.path.abspath(data)} | {digest[:16]} | 3 |" in md
  )
  second, out2 = _eval(
    m, m.run, "--metrics=perplexity", "--perplexity_data", data
  )
  os.makedirs(os.path.join(m.run, "eval"), exist_ok=True)
  shutil.copy(os.path.join(out2, "eval.json"), os.path.join(m.run, "eval"))
  capsys.readouterr()
  evaluate.main(["--compare", out1, m.run])  # an eval dir and a run dir
  table = capsys.readouterr().out.strip().splitlines()
  assert table[0] == f"| metric | {out1} | {m.run} |"
  assert table[1] == "| --- | --- | --- |"
  rows = {line.split(" | ")[0][2:]: line for line in table[2:]}
  ppl = first["metrics"]["perplexity"]
  assert rows["perplexity"] == f"| perplexity | {ppl:.4f} | {ppl:.4f} |"
  acc = first["metrics"]["task_accuracy"]
  assert rows["task_accuracy"] == f"| task_accuracy | {acc:.4f} |  |"


def test_adapter_reaches_load_and_the_report(m, tmp_path):
  calls = []

  def load(source, adapter=None, dtype="float32"):
    calls.append((source, adapter, dtype))
    return LOAD(source)  # the adapter itself is jft.load's (test_hf_run)

  adapter = str(tmp_path)
  out = str(tmp_path / "out")
  argv = [m.run, "--adapter", adapter, "--metrics=task_accuracy", *COMMON]
  assert evaluate.main([*argv, "--out", out], load=load) == 0
  assert calls == [(m.run, adapter, "float32")]
  with open(os.path.join(out, "eval.json")) as f:
    assert json.load(f)["adapter"] == adapter
  with open(os.path.join(out, "eval.md")) as f:
    assert f.readline() == f"# Evaluation of {m.run} + adapter {adapter}\n"


def test_hf_source_and_default_out(m, tmp_path, monkeypatch):
  """An hf: export of the run scores as the run does; its eval lands in a
  new folder under ./evals."""
  monkeypatch.chdir(tmp_path)
  data = _jsonl(tmp_path / "ppl.jsonl", [{"text": "reverse: a b c ="}])
  argv = ["--metrics=perplexity,task_accuracy", "--perplexity_data", data]
  assert evaluate.main([m.hf, *argv, *COMMON], load=LOAD) == 0
  (made,) = os.listdir(tmp_path / "evals")
  assert made.startswith("hf-")
  with open(tmp_path / "evals" / made / "eval.json") as f:
    theirs = json.load(f)
  ours, _ = _eval(m, m.run, *argv)
  for k, v in ours["metrics"].items():
    assert theirs["metrics"][k] == pytest.approx(v, rel=1e-5), k


def test_errors_name_the_file_line_or_flag(m, tmp_path, capsys):
  def fails(match, *argv, error=UserError):
    with pytest.raises(error, match=match):
      evaluate.main([*argv, *COMMON, "--out", str(tmp_path / "x")], load=LOAD)

  fails(r"SOURCE='/no/such/run': no such directory", "/no/such/run")
  fails(r"not a jft run directory \(no config.json\)", str(tmp_path))
  fails(
    r"SOURCE='run:configs/sft.py': expected a jft run", "run:configs/sft.py"
  )
  fails(
    r"--baseline='hf:/nope': no such directory", m.run, "--baseline=hf:/nope"
  )
  fails(r"--adapter=/nope: no such directory", m.run, "--adapter=/nope")
  fails(r"--metrics: unknown metric 'bleu'", m.run, "--metrics=perplexity,bleu")
  fails(r"--scorer=fuzzy: unknown scorer", m.run, "--scorer=fuzzy")
  fails(r"--metrics=win_rate needs --baseline", m.run, "--metrics=win_rate")
  fails(
    r"--baseline is read by win_rate, which is not among",
    m.run, "--metrics=perplexity", f"--baseline={m.run}",
  )  # fmt: skip
  fails(
    r"--reward_model=.*: not a reward model",
    m.run,
    "--metrics=preference",
    f"--reward_model={m.run}",
  )
  fails(
    r"--task_data=/no.jsonl: file not found",
    m.run,
    "--task_data=/no.jsonl",
    error=DataError,
  )
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "a",\n')
  fails(rf"{bad}:2: invalid JSON", m.run, f"--task_data={bad}", error=DataError)
  no_ref = _jsonl(
    tmp_path / "noref.jsonl", [{"prompt": "p", "answer": "a"}, {"prompt": "q"}]
  )
  fails(rf"{no_ref}:2: no reference answer", m.run, f"--task_data={no_ref}")
  fails(r"--compare: /nope: no eval.json", "--compare", "/nope")
  # On the command line: one line on stderr, exit code 2.
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    cli.run_main(lambda: evaluate.main(["/no/such/run"]), [])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["error: SOURCE='/no/such/run': no such directory"]


def test_token_logprobs_equal_logits(m):
  ids = m.tok.bos_prefix + m.tok.encode("sort: c b a =")
  padded = np.full((8, 16), m.tok.pad_id, np.int32)
  padded[:, : len(ids)] = ids
  want = _logp(_forward(m.lm, ids), ids)
  got = m.lm.token_logprobs(padded)
  assert got.shape == (8, 15)
  np.testing.assert_allclose(got[3, : len(ids) - 1], want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="not a reward model"):
    m.lm.scores(padded)
  with pytest.raises(ValueError, match="is a reward model"):
    LOAD(m.rm).token_logprobs(padded)
