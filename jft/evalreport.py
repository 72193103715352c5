"""What `python -m jft.evaluate` writes and reads back: eval.json, eval.md,
samples.jsonl, and the `--compare` table across evaluations.

eval.json holds every number (`metrics`: name -> float; `counts`: name ->
int), what was evaluated (`source`, `adapter`, `head`), when (`created`,
UTC) and by which code (`jft_code`, the hash stage caching uses), the data
(`files`: per flag, the file's absolute path, sha256 and line count, or the
built-in suite's description), the `settings`, and the name of the samples
file. eval.md shows the same as markdown tables.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from jft.errors import UserError


def _fmt(v) -> str:
  if isinstance(v, int):  # bools too
    return str(v)
  if isinstance(v, float):
    return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"
  return "" if v is None else str(v)


def markdown(result: dict) -> str:
  """eval.md: what was evaluated, then a table each for metrics, counts
  and data files."""
  src = result["source"] + (
    f" + adapter {result['adapter']}" if result["adapter"] else ""
  )
  lines = [f"# Evaluation of {src}", "", f"{result['created']}", ""]
  lines += ["| metric | value |", "| --- | --- |"]
  lines += [f"| {k} | {_fmt(v)} |" for k, v in result["metrics"].items()]
  lines += ["", "| count | value |", "| --- | --- |"]
  lines += [f"| {k} | {v} |" for k, v in result["counts"].items()]
  lines += ["", "| data | file | sha256 | lines |", "| --- | --- | --- | --- |"]
  for flag, f in result["files"].items():
    if "sha256" in f:
      lines.append(
        f"| {flag} | {f['path']} | {f['sha256'][:16]} | {f['lines']} |"
      )
    else:
      lines.append(f"| {flag} | {f['builtin']} | | |")
  settings = ", ".join(
    f"{k}={v}" for k, v in result["settings"].items() if v not in (None, "")
  )
  lines += ["", f"Settings: {settings}."]
  if result["samples"]:
    lines.append(f"Generations: {result['samples']}.")
  return "\n".join(lines) + "\n"


def _write(path: str, text: str) -> None:
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def write_reports(out: str, result: dict, samples: list[dict]) -> None:
  os.makedirs(out, exist_ok=True)
  if result["samples"]:
    _write(
      os.path.join(out, result["samples"]),
      "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples),
    )
  _write(os.path.join(out, "eval.json"), json.dumps(result, indent=2) + "\n")
  _write(os.path.join(out, "eval.md"), markdown(result))


def find_eval_json(path: str) -> str:
  """eval.json of a run dir (RUN/eval/), an eval dir, or the file itself."""
  for p in (path, os.path.join(path, "eval.json")):
    if os.path.isfile(p):
      return p
  p = os.path.join(path, "eval", "eval.json")
  if os.path.isfile(p):
    return p
  raise UserError(
    f"--compare: {path}: no eval.json (run python -m jft.evaluate {path} first)"
  )


def compare(paths: Sequence[str]) -> str:
  """One markdown table: a row per metric (in first-seen order), a column
  per evaluation; a missing metric is a blank cell."""
  results = []
  for p in paths:
    where = find_eval_json(p)
    try:
      with open(where, encoding="utf-8") as f:
        metrics = json.load(f)["metrics"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise UserError(f"--compare: {where}: not a jft eval.json ({e})") from e
    if not isinstance(metrics, dict):
      raise UserError(f"--compare: {where}: 'metrics' is not an object")
    results.append(metrics)
  names = list(dict.fromkeys(k for r in results for k in r))
  lines = [
    "| metric | " + " | ".join(paths) + " |",
    "| --- |" + " --- |" * len(paths),
  ]
  for k in names:
    cells = [_fmt(r.get(k)) for r in results]
    lines.append(f"| {k} | " + " | ".join(cells) + " |")
  return "\n".join(lines)
