"""Tests for jft.data.tasks: determinism, splits, checking, wrong answers."""

import json
import os
import re

import numpy as np
import pytest

from jft.data import tasks


def _reference_answer(task, prompt):
  """Independent of tasks.answer: parse with a regex, compute by hand."""
  if task == "add":
    a, b = re.fullmatch(r"add: (\d+) \+ (\d+) =", prompt).groups()
    return str(int(a) + int(b))
  body = re.fullmatch(rf"{task}: ([a-z](?: [a-z]){{2,7}}) =", prompt).group(1)
  letters = body.split()
  if task == "reverse":
    letters = letters[::-1]
  if task == "sort":
    letters = sorted(letters)
  return " ".join(letters)


def test_hand_examples():
  assert tasks.answer("add", "add: 12 + 345 =") == "357"
  assert tasks.answer("reverse", "reverse: a b c d =") == "d c b a"
  assert tasks.answer("sort", "sort: d a c =") == "a c d"
  assert tasks.answer("copy", "copy: q x b =") == "q x b"
  assert tasks.is_correct("add", "add: 99 + 1 =", " 100\n")
  assert not tasks.is_correct("add", "add: 99 + 1 =", " 1000")
  with pytest.raises(ValueError, match="Not a 'sort' prompt"):
    tasks.answer("sort", "reverse: a b c =")
  with pytest.raises(ValueError, match="Unknown task"):
    tasks.generate("mul", 1, 0, "train")
  with pytest.raises(ValueError, match="Unknown split"):
    tasks.generate("add", 1, 0, "test")


@pytest.mark.parametrize("task", tasks.TASKS)
def test_generate_format_and_determinism(task):
  a = tasks.generate(task, 300, seed=3, split="train")
  assert a == tasks.generate(task, 300, seed=3, split="train")
  assert a != tasks.generate(task, 300, seed=4, split="train")
  assert len(a) == 300 and len({ex["prompt"] for ex in a}) == 300
  assert a[:100] == tasks.generate(task, 100, seed=3, split="train")
  for ex in a:
    assert ex["task"] == task
    assert ex["completion"] == " " + _reference_answer(task, ex["prompt"])
  if task == "add":
    numbers = [int(x) for ex in a for x in re.findall(r"\d+", ex["prompt"])]
    assert min(numbers) < 10 and 10 <= max(numbers) <= 99
  else:
    lengths = {len(ex["completion"].split()) for ex in a}
    assert lengths == set(range(3, 9))


@pytest.mark.parametrize("task", tasks.TASKS)
def test_train_eval_disjoint(task):
  train = tasks.generate(task, 2000, seed=0, split="train")
  evals = tasks.generate(task, 200, seed=0, split="eval")
  other_seed = tasks.generate(task, 200, seed=7, split="eval")
  train_prompts = {ex["prompt"] for ex in train}
  assert len(evals) == 200
  assert not train_prompts & {ex["prompt"] for ex in evals + other_seed}
  assert all(tasks.split_of(ex["prompt"]) == "eval" for ex in evals)


def test_eval_fraction_is_about_ten_percent():
  rng = np.random.default_rng(0)
  prompts = [tasks.sample("copy", rng)[0] for _ in range(5000)]
  frac = np.mean([tasks.split_of(p) == "eval" for p in prompts])
  assert 0.08 < frac < 0.12


@pytest.mark.parametrize("task", tasks.TASKS)
def test_is_correct_and_wrong_answer(task):
  rng = np.random.default_rng(1)
  kinds = set()
  for ex in tasks.generate(task, 300, seed=1, split="eval"):
    prompt, completion = ex["prompt"], ex["completion"]
    ans = _reference_answer(task, prompt)
    assert tasks.is_correct(task, prompt, completion)
    assert tasks.is_correct(task, prompt, f"  {ans} \n")
    for _ in range(10):
      wrong = tasks.wrong_answer(task, prompt, completion, rng)
      assert wrong != ans and wrong.strip() == wrong
      assert not tasks.is_correct(task, prompt, " " + wrong)
      if task == "add":
        assert re.fullmatch(r"0|[1-9]\d*", wrong)  # A well-formed number.
        kinds.add("near" if abs(int(wrong) - int(ans)) <= 10 else "digit")
      else:
        got, want = wrong.split(), ans.split()
        assert len(got) == len(want)
        diff = [
          i for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w
        ]
        assert len(diff) == 1  # one letter misread ...
        assert got[diff[0]] not in want  # ... as a letter not in the input
        kinds.add(diff[0])
  if task == "add":
    assert kinds == {"near", "digit"}
  else:
    assert len(kinds) >= 3  # the error lands at various positions
  assert not tasks.is_correct(task, ex["prompt"], "")


def test_wrong_answer_degenerate_cases():
  rng = np.random.default_rng(0)
  for _ in range(50):
    assert tasks.wrong_answer("add", "add: 0 + 0 =", "0", rng) != "0"
    w = tasks.wrong_answer("reverse", "reverse: a a a =", "a a a", rng)
    assert w != "a a a"
    w = tasks.wrong_answer("reverse", "reverse: a b a =", "a b a", rng)
    assert w != "a b a"
    assert tasks.wrong_answer("sort", "sort: b b b =", "b b b", rng) != "b b b"


def _read(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_write_suite(tmp_path):
  out = str(tmp_path / "suite")
  paths = tasks.write_suite(out, tasks=("add", "sort"), n_train=50, n_eval=10)
  expected = {
    f"{k}_{s}" for k in ("pretrain", "sft", "pref") for s in tasks.SPLITS
  }
  assert set(paths) == expected
  fields = {
    "pretrain": {"text"},
    "sft": {"prompt", "completion", "task"},
    "pref": {"prompt", "chosen", "rejected", "task"},
  }
  for split, n in (("train", 50), ("eval", 10)):
    sft = _read(paths[f"sft_{split}"])
    assert len(sft) == 2 * n
    assert sorted(r["task"] for r in sft) == ["add"] * n + ["sort"] * n
    assert {r["task"] for r in sft[:n]} == {"add", "sort"}  # Interleaved.
    for kind in fields:
      rows = _read(paths[f"{kind}_{split}"])
      assert len(rows) == 2 * n and all(set(r) == fields[kind] for r in rows)
    pre = _read(paths[f"pretrain_{split}"])
    assert [r["text"] for r in pre] == [
      r["prompt"] + r["completion"] for r in sft
    ]
    for r in _read(paths[f"pref_{split}"]):
      assert r["chosen"] == " " + _reference_answer(r["task"], r["prompt"])
      assert r["rejected"].startswith(" ") and r["rejected"] != r["chosen"]
      assert not tasks.is_correct(r["task"], r["prompt"], r["rejected"])
  train = {r["prompt"] for r in _read(paths["sft_train"])}
  assert not train & {r["prompt"] for r in _read(paths["sft_eval"])}

  # Idempotent: same params -> files untouched (a rewrite is a new inode).
  inodes = {k: os.stat(p).st_ino for k, p in paths.items()}
  contents = {k: open(p, "rb").read() for k, p in paths.items()}
  assert (
    tasks.write_suite(out, tasks=("add", "sort"), n_train=50, n_eval=10)
    == paths
  )
  assert {k: os.stat(p).st_ino for k, p in paths.items()} == inodes
  tasks.write_suite(out, tasks=("add", "sort"), n_train=60, n_eval=10)
  assert len(_read(paths["sft_train"])) == 120
  assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
  # Deterministic: writing the first parameters again reproduces the bytes.
  tasks.write_suite(out, tasks=("add", "sort"), n_train=50, n_eval=10)
  assert {k: open(p, "rb").read() for k, p in paths.items()} == contents
  with open(os.path.join(out, "suite.json")) as f:
    assert json.load(f)["n_train"] == 50
