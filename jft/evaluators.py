"""Evaluators: what a run measures besides its loss, and how answers score.

Two callers share this module's scoring, so a number means the same thing
wherever it is printed:

  in a run    an evaluator is `evaluate(apply_fn, params) -> {metric:
              value}`, run by the trainer at every evaluation. Objectives do
              not evaluate: the trainer builds the evaluators a run asks for
              (`build`) from the held-out records its data source provides,
              and writes the before/after table (`summary_table`) from the
              first and last logged metrics with the rows the objective
              names.
  afterwards  `python -m jft.evaluate` (jft/evaluate.py) loads a run or a
              checkpoint and scores its answers with the same `scorer`,
              `score_answers` and `accuracy_by_task`.

Scorers (`scorer(spec)`) turn one answer into a number in [0, 1]:

  task        the built-in suite's checker (`tasks.is_correct`): rows need
              a built-in `task`; the answer is recomputed from the prompt
  exact       output == reference, surrounding whitespace ignored
              (completions usually start with a space)
  normalised  equal after lower-casing, dropping punctuation and collapsing
              whitespace (SQuAD's normalisation without article removal)
  contains    the normalised reference occurs in the normalised output as
              whole words ("4" is not in "42")
  auto        `task` for rows with a built-in task, else `exact`
  MOD:FN      a user function `FN(prompt, output, reference) -> float|bool`
              from importable module MOD

A row's reference is the first of its fields `completion`, `reference`,
`answer` that is present: a string, or a list of strings, any of which is
right (a user function gets the value as it is).
"""

from __future__ import annotations

import importlib
import math
import numbers
import re
import string
from collections.abc import Callable, Sequence

import numpy as np

from jft import generate
from jft.data import tasks
from jft.errors import UserError

REFERENCE_FIELDS = ("completion", "reference", "answer")
SCORERS = ("auto", "task", "exact", "normalised", "contains")
# row, output -> score in [0, 1] (a user function may return any float)
Scorer = Callable[[dict, str], float]


# ---------------------------------------------------------------- scorers


def reference_of(row):
  """The row's reference answer (a string or a list of strings), or None."""
  for field in REFERENCE_FIELDS:
    if row.get(field) is not None:
      return row[field]
  return None


def _references(row) -> list[str]:
  where = getattr(row, "where", "?")
  ref = reference_of(row)
  if ref is None:
    raise UserError(
      f"{where}: no reference answer to score against: give one of the "
      f"fields {', '.join(map(repr, REFERENCE_FIELDS))}"
      + (" (or a built-in 'task')" if "task" not in row else "")
    )
  refs = ref if isinstance(ref, list) else [ref]
  if not refs or not all(isinstance(r, str) for r in refs):
    raise UserError(
      f"{where}: the reference answer must be a string or a list of "
      f"strings, got {ref!r}"
    )
  return refs


def is_task_row(row) -> bool:
  """A prompt of the built-in suite, which its checker can score."""
  return row.get("task") in tasks.TASKS and isinstance(row.get("prompt"), str)


_PUNCT = str.maketrans("", "", string.punctuation)


def normalise(text: str) -> str:
  """Lower-cased, punctuation dropped, whitespace runs made one space."""
  return " ".join(text.lower().translate(_PUNCT).split())


def _best(fn: Callable[[str, str], bool]) -> Scorer:
  def score(row, output):
    return float(any(fn(output, ref) for ref in _references(row)))

  return score


def _task(row, output) -> float:
  if not is_task_row(row):
    raise UserError(
      f"{getattr(row, 'where', '?')}: scorer 'task' needs a built-in task "
      f"({', '.join(tasks.TASKS)}) in the row's 'task' field, got "
      f"{row.get('task')!r}"
    )
  try:
    return float(tasks.is_correct(row["task"], row["prompt"], output))
  except ValueError as e:  # a prompt not in the task's format
    raise UserError(f"{getattr(row, 'where', '?')}: {e}") from None


def _auto(row, output) -> float:
  return _task(row, output) if is_task_row(row) else _exact(row, output)


_exact = _best(lambda out, ref: out.strip() == ref.strip())
_normalised = _best(lambda out, ref: normalise(out) == normalise(ref))
_contains = _best(
  lambda out, ref: f" {normalise(ref)} " in f" {normalise(out)} "
)
_BUILTIN: dict[str, Scorer] = {
  "auto": _auto,
  "task": _task,
  "exact": _exact,
  "normalised": _normalised,
  "contains": _contains,
}


def _user_scorer(spec: str) -> Scorer:
  module, _, name = spec.partition(":")
  try:
    fn = getattr(importlib.import_module(module), name)
  except ImportError as e:
    raise UserError(f"--scorer={spec}: cannot import {module!r} ({e})") from e
  except AttributeError:
    raise UserError(
      f"--scorer={spec}: module {module!r} has no function {name!r}"
    ) from None
  if not callable(fn):
    raise UserError(f"--scorer={spec}: {module}.{name} is not a function")

  def score(row, output):
    got = fn(row["prompt"], output, reference_of(row))
    if isinstance(got, np.bool_):
      got = bool(got)
    if not isinstance(got, numbers.Real) or not math.isfinite(got):
      raise UserError(
        f"--scorer={spec} returned {got!r} for {getattr(row, 'where', '?')}; "
        "it must return a finite float or a bool"
      )
    return float(got)

  return score


def scorer(spec: str) -> Scorer:
  """The scorer named `spec` (see the module docstring); a UserError
  naming `--scorer` for one that does not exist."""
  if spec in _BUILTIN:
    return _BUILTIN[spec]
  if re.fullmatch(r"[\w.]+:\w+", spec):
    return _user_scorer(spec)
  raise UserError(
    f"--scorer={spec}: unknown scorer; expected one of {', '.join(SCORERS)} "
    "or MODULE:FUNCTION"
  )


def score_answers(rows, texts, score: Scorer) -> list[float]:
  """One score per (row, generated text)."""
  return [score(r, t) for r, t in zip(rows, texts, strict=True)]


def accuracy_by_task(
  rows, scores, prefix: str = "eval/task_accuracy"
) -> dict[str, float]:
  """Mean score overall (`prefix`) and per task (`prefix/TASK`, for rows
  with a string `task` field)."""
  by_task: dict[str, list[float]] = {}
  for r, s in zip(rows, scores, strict=True):
    task = r.get("task")
    by_task.setdefault(task if isinstance(task, str) else None, []).append(s)
  out = {prefix: float(np.mean(sum(by_task.values(), [])))}
  for task, got in sorted((k, v) for k, v in by_task.items() if k):
    out[f"{prefix}/{task}"] = float(np.mean(got))
  return out


def win_outcomes(a: Sequence[float], b: Sequence[float]) -> list[float]:
  """Row by row, A's result against B: 1.0 a win (a > b), 0.5 a tie,
  0.0 a loss. Their mean is A's win rate with ties counted as half."""
  return [
    1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b, strict=True)
  ]


def builtin_task_rows(per_task: int, seed: int = 0) -> list[dict]:
  """`per_task` held-out prompts of every built-in task, the suite's own
  (the first ones of each task's eval split, whatever its size)."""
  return [
    r for t in tasks.TASKS for r in tasks.generate(t, per_task, seed, "eval")
  ]


# ----------------------------------------------------- in-run evaluators


class TaskAccuracy:
  """eval/task_accuracy (and per task, eval/task_accuracy/TASK): greedy
  answers to held-out built-in task prompts, checked by the suite."""

  def __init__(self, config, tokenizer, records):
    n = config.sft.max_eval_generations
    self.records = [r for r in records if is_task_row(r)][:n]
    self.config, self.tokenizer = config, tokenizer
    self._answer = None

  def __call__(self, apply_fn, params) -> dict[str, float]:
    if not self.records:
      return {}
    if self._answer is None:
      self._answer = generate.make_text_decoder(
        apply_fn, self.tokenizer, max_new=self.config.sft.max_new_tokens
      )
    texts = self._answer(params, [r["prompt"] for r in self.records])
    scores = score_answers(self.records, texts, _task)
    return accuracy_by_task(self.records, scores)


def build(config, tokenizer, records, names: Sequence[str]) -> list:
  """The evaluators `names` (an objective's `evaluators`) over `records`."""
  known = {"task_accuracy": TaskAccuracy}
  out = []
  for name in names:
    if name not in known:
      raise ValueError(f"unknown evaluator {name!r}; known: {sorted(known)}")
    out.append(known[name](config, tokenizer, records))
  return out


TASK_ROWS = (("task accuracy (greedy)", "eval/task_accuracy"),)


def summary_table(rows, first: dict, last: dict) -> str:
  """Before/after table of held-out metrics: the objective's `rows`
  ((label, key) pairs), the task-accuracy rows, then one per task."""
  rows = list(rows) + list(TASK_ROWS)
  per_task = sorted(k for k in last if k.startswith("eval/task_accuracy/"))
  rows += [(f"task accuracy: {k.rsplit('/', 1)[1]}", k) for k in per_task]
  lines = ["| held-out metric | before | after |", "| --- | --- | --- |"]
  for label, key in rows:
    if key in first and key in last:
      lines.append(f"| {label} | {first[key]:.3f} | {last[key]:.3f} |")
  return "\n".join(lines) if len(lines) > 2 else ""
