"""A run's final and best metrics; a sweep's results tables and plots.

`summarize(metrics.jsonl)` gives what a results row holds for one run:
the last step, the final `train/loss`, and each `eval/` metric's final
value and, where better is clear (loss and perplexity lower, accuracies
higher), its best (`best eval/loss`). A `null` (non-finite) value is NaN.

`write_tables(DIR, rows, keys)` writes DIR/results.csv (every column;
empty = not logged, `nan` = non-finite) and DIR/results.md (the grid
values, status, final train/loss, the `HEADLINE` eval metrics' final and
best values, wall time). `write_plots(DIR, rows, keys)` draws
DIR/curves.png (every run's curves overlaid) and DIR/against_KEY.png per
key with several values (final metrics against it; one line per value of
the other keys), with `jft.plot`. `jft.sweep` calls all three.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jft import plot

# The eval/ metrics results.md shows (when logged) and the sweep plots draw.
HEADLINE = (
  "eval/loss",
  "eval/accuracy",
  "eval/task_accuracy",
  "eval/masked_accuracy",
  "eval/rewards/accuracies",
)
# results.csv's columns before the metrics (after name and the grid keys).
FIXED = ("status", "exit_code", "steps", "wall_s", "workdir")


def lower_is_better(name: str) -> bool | None:
  """True for losses and perplexity, False for accuracies, else None."""
  last = name.rpartition("/")[2]
  if last in ("loss", "perplexity"):
    return True
  if "accura" in last:
    return False
  return None


def metric_order(name: str) -> tuple:
  """Headline metrics first, in HEADLINE's order, then by name."""
  return (HEADLINE.index(name) if name in HEADLINE else len(HEADLINE), name)


def summarize(metrics_path: str) -> dict[str, Any]:
  """`steps`, `train/loss`, each `eval/X` and `best eval/X` (see the module
  docstring) from a metrics.jsonl; {} when there is none yet."""
  if not os.path.exists(metrics_path):
    return {}
  rows = plot.read_rows(metrics_path)
  out: dict[str, Any] = {}
  if rows:
    out["steps"] = max(r["step"] for r in rows)
  finals, values = {}, {}
  for row in rows:
    for k, v in row.items():
      if k == "train/loss" or k.startswith("eval/"):
        finals[k] = math.nan if v is None else float(v)
        if v is not None and math.isfinite(v):
          values.setdefault(k, []).append(float(v))
  if "train/loss" in finals:
    out["train/loss"] = finals.pop("train/loss")
  for k in sorted(finals, key=metric_order):
    out[k] = finals[k]
    lower = lower_is_better(k)
    if lower is not None and values.get(k):
      out[f"best {k}"] = (min if lower else max)(values[k])
  return out


def columns(rows: Sequence[Mapping], keys: Sequence[str]) -> list[str]:
  """results.csv's columns: name, `keys`, `FIXED`, train/loss, then each
  eval/ metric followed by its best value."""
  have = {k for r in rows for k in r}
  cols = ["name", *keys, *FIXED]
  cols += [c for c in ("train/loss",) if c in have]
  evals = sorted({k for k in have if k.startswith("eval/")}, key=metric_order)
  for e in evals:
    cols += [c for c in (e, f"best {e}") if c in have]
  return cols


def _csv_value(v) -> str:
  if v is None:
    return ""
  if isinstance(v, float):
    return "nan" if math.isnan(v) else repr(v)
  return str(v)


def _md_value(v) -> str:
  if v is None:
    return ""
  if isinstance(v, float):
    return "nan" if not math.isfinite(v) else f"{v:.4g}"
  return str(v).replace("|", "\\|")


def duration(s: float | None) -> str:
  """`42s`, `3m07s`; '' for None."""
  if s is None:
    return ""
  s = int(round(s))
  return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def write_tables(
  folder: str,
  rows: Sequence[Mapping],
  keys: Sequence[str],
  shown: Mapping[str, Mapping[str, str]] | None = None,
) -> tuple[str, str]:
  """FOLDER/results.csv and FOLDER/results.md; returns both paths.

  `rows`: one mapping per run with `name`, each of `keys`, `FIXED` and
  `summarize`'s metrics. `shown[name][key]`: a value as results.md shows
  it (the sweep's values as typed); default: the row's value.
  """
  os.makedirs(folder, exist_ok=True)
  cols = columns(rows, keys)
  csv_path = os.path.join(folder, "results.csv")
  with open(csv_path + ".tmp", "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(cols)
    for row in rows:
      w.writerow([_csv_value(row.get(c)) for c in cols])
  os.replace(csv_path + ".tmp", csv_path)

  metric_cols = [c for c in ("train/loss",) if c in cols]
  for h in HEADLINE:
    metric_cols += [c for c in (h, f"best {h}") if c in cols]
  head = [*keys, "status", *metric_cols, "wall"]
  lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  for row in rows:
    status = str(row.get("status", ""))
    if row.get("exit_code"):
      status += f" (exit {row['exit_code']})"
    given = (shown or {}).get(row.get("name"), {})
    cells = [_md_value(given.get(k, row.get(k))) for k in keys]
    cells += [status] + [_md_value(row.get(c)) for c in metric_cols]
    cells.append(duration(row.get("wall_s")))
    lines.append("| " + " | ".join(cells) + " |")
  md_path = os.path.join(folder, "results.md")
  with open(md_path + ".tmp", "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  os.replace(md_path + ".tmp", md_path)
  return csv_path, md_path


def _file_name(key: str) -> str:
  return re.sub(r"[^A-Za-z0-9._+=-]", "_", key)


def write_plots(
  folder: str,
  rows: Sequence[Mapping],
  keys: Sequence[str],
  say: Callable[[str], Any] = print,
) -> list[str]:
  """FOLDER/curves.png (the runs of `rows` with a metrics.jsonl in their
  `workdir`, labelled by name) and FOLDER/against_KEY.png for each key of
  `keys` with several values (status `done` rows only). A plot that
  cannot be drawn is a one-line warning, never an error. Returns the
  paths written."""
  out = []

  def attempt(path: str, draw: Callable[[], str]) -> None:
    try:
      out.append(draw())
    except Exception as e:  # a plot is never worth failing a sweep
      reason = " ".join(f"{type(e).__name__}: {e}".split())
      say(f"warning: {path} not written ({reason[:300]})")

  runs = [
    r
    for r in rows
    if r.get("workdir")
    and os.path.exists(os.path.join(r["workdir"], plot.METRICS_FILE))
  ]
  if runs:
    path = os.path.join(folder, "curves.png")
    attempt(
      path,
      lambda: plot.curves(
        [r["workdir"] for r in runs],
        path,
        labels=[str(r["name"]) for r in runs],
      ),
    )
  done = [r for r in rows if r.get("status") == "done"]
  have = set(columns(rows, keys))
  metrics = [m for m in ("train/loss", *HEADLINE) if m in have]
  varied = [k for k in keys if len({str(r.get(k)) for r in rows}) > 1]
  for key in varied if done and metrics else ():
    path = os.path.join(folder, f"against_{_file_name(key)}.png")
    others = [k for k in varied if k != key]
    attempt(
      path,
      lambda key=key, path=path, others=others: plot.against(
        done, key, metrics, path, group_by=others
      ),
    )
  return out
