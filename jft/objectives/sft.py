"""Supervised fine-tuning: loss on completion / assistant tokens only.

Rows are `{"prompt","completion"}` or chat `{"messages": [{"role",
"content"}, ...]}`. The chat template is data (`config.sft.chat_template` or
a JSON file): per role a prefix and suffix. Assistant content and the eos
after it carry loss weight 1, everything else 0, so the model learns to
answer and to stop. `eval/task_accuracy` comes from greedy generation on
held-out prompts of the built-in tasks.
"""

from __future__ import annotations

import json

import numpy as np

from jft import generate
from jft.data import pipeline, tasks
from jft.data.jsonl import DataError
from jft.objectives.clm import CLM


def load_template(sft_cfg) -> dict[str, tuple[str, str]]:
  if sft_cfg.template_file:
    with open(sft_cfg.template_file) as f:
      rows = json.load(f)["roles"]
  else:
    rows = sft_cfg.chat_template
  return {role: (pre, suf) for role, pre, suf in rows}


def segments(record, template) -> list[tuple[str, bool]]:
  """(text, trained) pieces of one row; errors name file, line and field."""
  where = getattr(record, "where", "?")
  if "messages" in record:
    msgs = record["messages"]
    if not isinstance(msgs, list) or not msgs:
      raise DataError(f"{where}: field 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
      if not isinstance(m, dict) or not isinstance(m.get("content"), str):
        raise DataError(
          f"{where}: field 'messages[{i}]' needs a string 'content'"
        )
      role = m.get("role")
      if role not in template:
        raise DataError(
          f"{where}: field 'messages[{i}].role' is {role!r}; the chat "
          f"template knows {sorted(template)}"
        )
      pre, suf = template[role]
      trained = role == "assistant"
      out += [(pre, False), (m["content"], trained), (suf, False)]
      if trained:
        out.append((None, True))  # eos, trained
    if not any(t for _, t in out):
      raise DataError(f"{where}: field 'messages' has no assistant turn")
    return out
  for field in ("prompt", "completion"):
    if not isinstance(record.get(field), str):
      raise DataError(
        f"{where}: missing or non-string field {field!r} (SFT rows need "
        "'prompt' and 'completion', or 'messages')"
      )
  if not record["completion"]:
    raise DataError(f"{where}: field 'completion' is empty")
  return [(record["prompt"], False), (record["completion"], True), (None, True)]


def encode_segments(segs, tok) -> tuple[list[int], list[float]]:
  """[bos] + pieces (None = eos) -> ids and per-token trained mask."""
  ids, mask = [tok.bos_id], [0.0]
  for text, trained in segs:
    piece = [tok.eos_id] if text is None else tok.encode(text)
    ids += piece
    mask += [1.0 if trained else 0.0] * len(piece)
  return ids, mask


def fit(ids, mask, max_len: int, policy: str):
  """Applies the truncation policy; returns (ids, mask, status)."""
  if len(ids) <= max_len:
    return ids, mask, "ok"
  if policy == "truncate_prompt":
    first = mask.index(1.0)
    cut = len(ids) - max_len
    if cut <= first - 1:  # drop prompt tokens after bos, from the left
      return ids[:1] + ids[1 + cut :], mask[:1] + mask[1 + cut :], "truncated"
    return None, None, "skipped"
  if policy == "skip":
    return None, None, "skipped"
  raise ValueError(
    f"config.sft.truncation: unknown {policy!r}; expected "
    "'truncate_prompt' or 'skip'"
  )


class TaskEval:
  """eval/task_accuracy (and per task, eval/task_accuracy/TASK): greedy
  answers to held-out built-in task prompts."""

  def __init__(self, config, tokenizer):
    self.config, self.tokenizer = config, tokenizer
    self.records = []
    self._answer = None

  def setup(self, records) -> None:
    n = self.config.sft.max_eval_generations
    self.records = [
      r
      for r in records
      if r.get("task") in tasks.TASKS and isinstance(r.get("prompt"), str)
    ][:n]

  def evaluate(self, apply_fn, params) -> dict[str, float]:
    if not self.records:
      return {}
    if self._answer is None:
      self._answer = generate.make_text_decoder(
        apply_fn, self.tokenizer, max_new=self.config.sft.max_new_tokens
      )
    texts = self._answer(params, [r["prompt"] for r in self.records])
    by_task: dict[str, list[bool]] = {}
    for r, text in zip(self.records, texts, strict=True):
      ok = tasks.is_correct(r["task"], r["prompt"], text)
      by_task.setdefault(r["task"], []).append(ok)
    out = {"eval/task_accuracy": float(np.mean(sum(by_task.values(), [])))}
    for task, right in sorted(by_task.items()):
      out[f"eval/task_accuracy/{task}"] = float(np.mean(right))
    return out


class SFT(CLM):
  """Token-weighted CE on trained tokens; same loss as CLM."""

  name = "sft"
  fields = ()
  builtin_split = "sft"

  def __init__(self, config, tokenizer):
    super().__init__(config, tokenizer)
    self.template = load_template(config.sft)
    self.data_stats: dict[str, float] = {}
    self.tasks = TaskEval(config, tokenizer)

  def make_examples(self, records, split: str = "train"):
    tok, seq = self.tokenizer, self.config.seq_len
    out, counts = [], {"truncated": 0, "skipped": 0}
    for r in records:
      ids, mask = encode_segments(segments(r, self.template), tok)
      ids, mask, status = fit(ids, mask, seq + 1, self.config.sft.truncation)
      if status != "ok":
        counts[status] += 1
      if ids is not None:
        out.append(pipeline.causal_example(ids, np.asarray(mask, np.float32)))
    for k, v in counts.items():
      self.data_stats[f"data/{split}_{k}"] = v
    self.data_stats[f"data/{split}_examples"] = len(out)
    if counts["skipped"] or counts["truncated"]:
      print(
        f"sft {split}: {counts['truncated']} of {len(records)} rows had "
        f"their prompt truncated and {counts['skipped']} were skipped "
        f"(longer than seq_len + 1 = {seq + 1} tokens)"
      )
    if not out:
      raise DataError(f"sft {split}: every row was skipped (seq_len={seq})")
    return out

  def eval_setup(self, records) -> None:
    self.tasks.setup(records)

  def host_eval(self, apply_fn, params) -> dict[str, float]:
    return self.tasks.evaluate(apply_fn, params)
