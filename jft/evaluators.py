"""Evaluators: what a run measures besides its loss, as plug-ins.

An evaluator is `evaluate(apply_fn, params) -> {metric: value}`, run by the
trainer at every evaluation. Objectives do not evaluate: the trainer builds
the evaluators a run asks for (`build`) from the held-out records its data
source provides, and writes the before/after table (`summary_table`) from
the first and last logged metrics with the rows the objective names.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jft import generate
from jft.data import tasks


class TaskAccuracy:
  """eval/task_accuracy (and per task, eval/task_accuracy/TASK): greedy
  answers to held-out built-in task prompts, checked by the suite."""

  def __init__(self, config, tokenizer, records):
    n = config.sft.max_eval_generations
    self.records = [
      r
      for r in records
      if r.get("task") in tasks.TASKS and isinstance(r.get("prompt"), str)
    ][:n]
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
    return accuracy_by_task(self.records, texts)


def accuracy_by_task(records, texts) -> dict[str, float]:
  """Overall and per-task accuracy of `texts` answering `records`."""
  by_task: dict[str, list[bool]] = {}
  for r, text in zip(records, texts, strict=True):
    ok = tasks.is_correct(r["task"], r["prompt"], text)
    by_task.setdefault(r["task"], []).append(ok)
  out = {"eval/task_accuracy": float(np.mean(sum(by_task.values(), [])))}
  for task, right in sorted(by_task.items()):
    out[f"eval/task_accuracy/{task}"] = float(np.mean(right))
  return out


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
