"""Train/eval curves and sweep plots as PNG files (matplotlib, no display).

  python -m jft.plot RUN_OR_METRICS [...] [--out=curves.png]
      [--metrics loss eval/perplexity ...] [--labels A B ...] [--title T]
  python -m jft.plot SWEEP/results.csv --against=optimizer.lr
      [--metrics eval/loss ...] [--group_by lora.rank] [--out=lr.png]

`curves` reads one or more `metrics.jsonl` files (a run directory stands
for its own) and draws one panel per metric, runs overlaid (one colour per
run). A metric is a full name (`eval/perplexity`: that series alone) or a
quantity (`loss`: `train/loss` solid and `eval/loss` dashed on the same
axes). By default the panels are the quantities of `DEFAULT_METRICS` that
some run logged. A `null` value (non-finite when logged) breaks the line
and is marked with an `x` on the step axis. `perplexity` panels are log
scale.

`against` draws final metrics against one hyperparameter (one panel per
metric, one line per combination of `group_by` values; log x for learning
rates and for values spanning two decades or more); `jft.sweep` writes
these for every grid axis.

Figures are built with `matplotlib.figure.Figure`, not pyplot: no display,
no global backend change, nothing left open. Files are written atomically.
Every run writes WORKDIR/curves.png at its end (jft/artefacts.py).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import LogFormatter, NullLocator

from jft import cli, errors

METRICS_FILE = "metrics.jsonl"
# Quantities plotted by default, in panel order, when some run has them.
DEFAULT_METRICS = (
  "loss",
  "perplexity",
  "accuracy",
  "task_accuracy",
  "masked_accuracy",
  "rewards/accuracies",
  "rewards/margins",
  "reward",
  "objective/scores",
  "lr",
  "grad_norm",
)
SPLITS = ("train", "eval")
_STYLE = {"train": dict(ls="-"), "eval": dict(ls="--", marker="o", ms=3)}
_LOG_Y = ("perplexity",)
_LOG_X = ("lr", "learning_rate")


# ------------------------------------------------------------ reading


def metrics_path(run: str) -> str:
  """A run directory's `metrics.jsonl`, or `run` itself if it is a file."""
  if os.path.isdir(run):
    path = os.path.join(run, METRICS_FILE)
    if not os.path.isfile(path):
      raise errors.UserError(f"{run}: no {METRICS_FILE} in this directory")
    return path
  if not os.path.isfile(run):
    raise errors.UserError(f"{run}: no such run directory or metrics file")
  return run


def read_rows(path: str) -> list[dict]:
  """The rows of a metrics.jsonl. A last line cut short (a run writing it
  right now) is left out; any other line that is not a JSON object with an
  integer "step" is an error naming the file and line."""
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  rows = []
  last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except ValueError as e:
      if i == last:
        break
      raise errors.UserError(f"{path}:{i + 1}: not JSON ({e})") from None
    if not (isinstance(row, dict) and isinstance(row.get("step"), int)):
      raise errors.UserError(
        f'{path}:{i + 1}: not a metrics row (an object with an integer "step")'
      )
    rows.append(row)
  return rows


def series(rows: Sequence[Mapping], name: str) -> tuple[np.ndarray, ...]:
  """(steps, values) of the rows that log `name`; null (non-finite) is NaN.
  A step logged twice keeps its last value."""
  by_step = {}
  for row in rows:
    if name in row:
      v = row[name]
      by_step[int(row["step"])] = math.nan if v is None else float(v)
  steps = np.array(sorted(by_step), dtype=np.int64)
  return steps, np.array([by_step[s] for s in steps], dtype=np.float64)


def _panels(
  runs: Sequence[Sequence[Mapping]], metrics: Sequence[str] | None
) -> list[tuple[str, list[str]]]:
  """(title, metric names) per panel. A name some run logged is plotted as
  is; otherwise it is a quantity: its train/ and eval/ series."""
  names = set()
  for rows in runs:
    for row in rows:
      names.update(row)
  panels = []
  for m in DEFAULT_METRICS if metrics is None else metrics:
    if m in names and m != "step":
      panels.append((m, [m]))
      continue
    found = [f"{s}/{m}" for s in SPLITS if f"{s}/{m}" in names]
    if found:
      panels.append((m, found))
    elif metrics is not None:
      have = sorted(n for n in names if n != "step")
      raise errors.UserError(
        f"no metric {m!r} in these runs (neither {m} nor train/{m} or "
        f"eval/{m}); they log: {', '.join(have) or 'nothing'}"
      )
  if not panels:
    wanted = ", ".join(DEFAULT_METRICS if metrics is None else metrics)
    raise errors.UserError(f"nothing to plot: these runs log none of {wanted}")
  return panels


# ------------------------------------------------------------ figures


def _grid(n: int) -> tuple[int, int]:
  cols = 1 if n == 1 else 2 if n <= 4 else 3
  return math.ceil(n / cols), cols


def _figure(n: int) -> tuple[Figure, list]:
  rows, cols = _grid(n)
  fig = Figure(figsize=(5.0 * cols + 1.5, 3.3 * rows), layout="constrained")
  axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
  for ax in axes[n:]:
    ax.set_visible(False)
  return fig, list(axes[:n])


def _save(fig: Figure, out_png: str) -> str:
  folder = os.path.dirname(os.path.abspath(out_png))
  os.makedirs(folder, exist_ok=True)
  tmp = out_png + ".tmp"
  fig.savefig(tmp, format="png", dpi=100)
  os.replace(tmp, out_png)
  return out_png


def _color(i: int) -> str:
  return f"C{i % 10}"


def _label_of(run: str) -> str:
  path = os.path.abspath(run)
  if os.path.basename(path) == METRICS_FILE:
    path = os.path.dirname(path)
  return os.path.basename(path) or path


def curves(
  paths_or_runs: str | Sequence[str],
  out_png: str,
  metrics: Sequence[str] | None = None,
  labels: Sequence[str] | None = None,
  title: str | None = None,
) -> str:
  """Draws the curves of one or more runs into `out_png`; returns its path.

  `paths_or_runs`: run directories or metrics.jsonl files. `metrics`:
  names or quantities (see the module docstring; default
  `DEFAULT_METRICS`, those logged). `labels`: one per run (default: the
  run directory's name).
  """
  if isinstance(paths_or_runs, str | os.PathLike):
    paths_or_runs = [paths_or_runs]
  runs = [os.fspath(r) for r in paths_or_runs]
  if not runs:
    raise errors.UserError("no runs to plot")
  if labels is None:
    labels = [_label_of(r) for r in runs]
  if len(labels) != len(runs):
    raise errors.UserError(f"{len(labels)} labels for {len(runs)} runs")
  data = [read_rows(metrics_path(r)) for r in runs]
  panels = _panels(data, metrics)
  fig, axes = _figure(len(panels))
  marked_null = False
  for ax, (name, series_names) in zip(axes, panels, strict=True):
    positive = True
    for i, rows in enumerate(data):
      for sname in series_names:
        steps, values = series(rows, sname)
        if not len(steps):
          continue
        split = sname.split("/", 1)[0]
        style = dict(_STYLE.get(split, _STYLE["train"]))
        if np.sum(np.isfinite(values)) <= 1:
          style.setdefault("marker", "o")
          style.setdefault("ms", 4)
        ax.plot(steps, values, color=_color(i), lw=1.3, **style)
        finite = values[np.isfinite(values)]
        positive = positive and bool(np.all(finite > 0))
        bad = steps[~np.isfinite(values)]
        if len(bad):
          marked_null = True
          ax.plot(
            bad,
            np.zeros(len(bad)),
            "x",
            color=_color(i),
            ms=7,
            mew=2,
            transform=ax.get_xaxis_transform(),
            clip_on=False,
          )
    if name.rpartition("/")[2] in _LOG_Y and positive:
      ax.set_yscale("log")
      ax.yaxis.set_major_formatter(LogFormatter())  # 40, not 4x10^1
      ax.yaxis.set_minor_formatter(LogFormatter(minor_thresholds=(2, 0.5)))
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
  handles = []
  if len(runs) > 1:
    handles += [
      Line2D([], [], color=_color(i), lw=2, label=lab)
      for i, lab in enumerate(labels)
    ]
  splits = {n.split("/", 1)[0] for _, names in panels for n in names}
  for split in SPLITS:
    if split in splits:
      handles.append(Line2D([], [], color="0.3", label=split, **_STYLE[split]))
  if marked_null:
    handles.append(
      Line2D([], [], color="0.3", ls="", marker="x", mew=2, label="non-finite")
    )
  if handles:
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)
  if title or len(runs) == 1:
    fig.suptitle(title or labels[0])
  return _save(fig, out_png)


def _is_number(v) -> bool:
  return isinstance(v, int | float) and not isinstance(v, bool)


def _finite_number(v) -> float | None:
  if _is_number(v) and math.isfinite(v):
    return float(v)
  if isinstance(v, str):
    try:
      f = float(v)
    except ValueError:
      return None
    return f if math.isfinite(f) else None
  return None


def _log_x(param: str, xs: Sequence[float]) -> bool:
  if not xs or min(xs) <= 0:
    return False
  return param.rpartition(".")[2] in _LOG_X or max(xs) / min(xs) >= 100


def against(
  results: Sequence[Mapping],
  param: str,
  metrics: Sequence[str],
  out_png: str,
  group_by: Sequence[str] = (),
  title: str | None = None,
) -> str:
  """Final metrics (y) against hyperparameter `param` (x) into `out_png`.

  `results`: one mapping per run (a sweep's results.csv rows), holding
  `param`, the `metrics` and the `group_by` keys. A run whose metric is
  missing or not finite is left out of that panel. Numbers on x are
  numeric (log scale for a learning rate or a span of two decades);
  anything else is categorical in first-seen order.
  """
  metrics = list(metrics)
  if not metrics:
    raise errors.UserError("against: no metrics to plot")
  rows = [r for r in results if param in r]
  if not rows:
    raise errors.UserError(f"against: no result has {param!r}")
  raw_x = [r[param] for r in rows]
  numeric = all(_finite_number(v) is not None for v in raw_x) and not any(
    isinstance(v, bool) for v in raw_x
  )
  if numeric:
    xs = [_finite_number(v) for v in raw_x]
    categories = None
  else:
    categories = list(dict.fromkeys(str(v) for v in raw_x))
    xs = [float(categories.index(str(v))) for v in raw_x]
  fig, axes = _figure(len(metrics))
  groups = list(dict.fromkeys(tuple(r.get(k) for k in group_by) for r in rows))
  plotted = 0
  for ax, metric in zip(axes, metrics, strict=True):
    for gi, group in enumerate(groups):
      pts = sorted(
        (x, _finite_number(r.get(metric)))
        for x, r in zip(xs, rows, strict=True)
        if tuple(r.get(k) for k in group_by) == group
        and _finite_number(r.get(metric)) is not None
      )
      if not pts:
        continue
      plotted += len(pts)
      label = ", ".join(
        f"{k.rpartition('.')[2]}={v}"
        for k, v in zip(group_by, group, strict=True)
      )
      ax.plot(
        [p[0] for p in pts],
        [p[1] for p in pts],
        "o-",
        color=_color(gi),
        label=label or None,
      )
    if numeric and _log_x(param, xs):
      ax.set_xscale("log")
    ticks = sorted(set(xs))
    if numeric and len(ticks) <= 10:  # a grid's values, as typed
      ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
      ax.xaxis.set_minor_locator(NullLocator())
    if categories is not None:
      ax.set_xticks(range(len(categories)), categories)
    ax.set_title(metric)
    ax.set_xlabel(param)
    ax.grid(True, alpha=0.3)
    if group_by and ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  if not plotted:
    raise errors.UserError(
      f"against: no finite value of {', '.join(metrics)} to plot"
    )
  if title:
    fig.suptitle(title)
  return _save(fig, out_png)


def read_results(path: str) -> list[dict]:
  """A results.csv as dicts, numbers as floats (for `against`)."""
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  out = []
  for row in rows:
    out.append(
      {
        k: (_finite_number(v) if _finite_number(v) is not None else v)
        for k, v in row.items()
      }
    )
  return out


# ------------------------------------------------------------ CLI


def _names(values: Sequence[str] | None) -> list[str] | None:
  """`--metrics a b,c` -> ['a', 'b', 'c']."""
  if values is None:
    return None
  return [n.strip() for v in values for n in v.split(",") if n.strip()]


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(
    prog="python -m jft.plot", description=__doc__.split("\n\n")[0]
  )
  p.add_argument(
    "inputs", nargs="+", help="run directories or metrics.jsonl files"
  )
  p.add_argument("--out", default="curves.png", help="the PNG to write")
  p.add_argument("--metrics", nargs="+", help="names or quantities")
  p.add_argument("--labels", nargs="+", help="one per run")
  p.add_argument("--title")
  p.add_argument(
    "--against", help="with a results.csv: the hyperparameter on x"
  )
  p.add_argument("--group_by", nargs="+", default=[])
  p.add_argument("--verbose", action="store_true")
  args = p.parse_args(argv)
  if args.against:
    if len(args.inputs) != 1:
      raise errors.UserError("--against takes one results.csv")
    results = read_results(args.inputs[0])
    metrics = _names(args.metrics)
    if not metrics:
      raise errors.UserError("--against needs --metrics")
    out = against(
      results,
      args.against,
      metrics,
      args.out,
      group_by=_names(args.group_by),
      title=args.title,
    )
  else:
    out = curves(
      args.inputs,
      args.out,
      metrics=_names(args.metrics),
      labels=args.labels,
      title=args.title,
    )
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  cli.run_main(main)
