"""The built-in study: do four things users are taught about hyperparameters
hold on jft's built-in tasks?

  python bench/study.py [--out runs/study] [--claims 1,2,3,4] [--parallel 1]
      [--quick]

1. learning rate: too high is unstable, too low is slow (CLM from scratch,
   `tiny`, lr 1e-4 ... 1; a run that goes non-finite exits 3 and is recorded
   as "diverged", not as a crash);
2. batch size: larger batches give smoother curves, but not always better
   results per step (CLM from scratch at equal steps; smoothness is the std
   of the step-to-step change of train/loss over the second half; eval loss
   at equal steps and at equal examples seen);
3. epochs: more passes over a small set overfit (SFT on 256 examples written
   to OUT/data, unpacked so an epoch is 16 steps of 16 rows, 1-30 epochs
   through `data.num_epochs` with `total_steps=0`; the gap between the eval
   loss and the training loss of the last epoch);
4. LoRA rank: a higher rank helps up to a point on a harder task (LoRA SFT on
   `add` alone, ranks 1-32, rsLoRA so every rank gets the update size of the
   default rank-8 config; eval loss and task accuracy).

Claims 3 and 4 start from `configs/pretrain_clm.py`'s model, trained once
into OUT/base (not the `run:` stage cache, whose key changes with every edit
of jft/). Each claim is one `jft.sweep` grid in OUT/claimN: resumable (rerun
the same command; finished points are skipped, and a claim whose points all
finished or diverged is not run again), with the sweep's results.csv,
results.md and plots. The study adds OUT/claimN.png, OUT/study.md (every
table and verdict) and OUT/study.json. A verdict is decided by the fixed
rules in `verdict_*` (tolerance `TOL` nats), printed with its numbers; this
is a measurement, never a pass/fail test.

`--quick` shrinks every grid to two points and a few steps (default out
runs/study-quick), for a smoke run of the plumbing. Each point is still a
whole `jft.main` process, ~25 s of CPU for imports and compiles, so
`--quick --claims 1` takes ~50 s of CPU and all four claims ~3.5 min. The
full study took 17 min of CPU on a 2-vCPU Xeon (README, "What the four
hyperparameters do"). Child runs share a JAX compilation cache in
OUT/jax_cache (`--jax_cache=` to turn it off). Time each part took when it
ran is kept in OUT/timing.json and shown in study.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_util import cpu_name  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402
from PIL import Image  # noqa: E402

from jft import errors, plot, results, sweep  # noqa: E402
from jft.data import tasks  # noqa: E402

TOL = 0.05  # nats: differences smaller than this count as ties
CLAIMS = {
  1: "Too high a learning rate is unstable, too low is slow",
  2: "Larger batches give smoother curves, but not always better results "
  "per step",
  3: "More epochs on a small set overfit: train and eval loss diverge",
  4: "A higher LoRA rank helps, up to a point, on a harder task (add)",
}
KEYS = {
  1: "optimizer.lr",
  2: "batch_size",
  3: "data.num_epochs",
  4: "lora.rank",
}


# ------------------------------------------------------------ the plan


@dataclasses.dataclass(frozen=True)
class Sizes:
  base_steps: int
  lrs: str
  lr_steps: int
  lr_eval_every: int
  batches: str
  batch_steps: int
  batch_eval_every: int
  n_small: int  # claim 3's training rows per task
  n_small_eval: int  # its eval rows per task
  epoch_lrs: str
  epochs: str
  epoch_eval_every: int
  ranks: str
  rank_steps: int
  rank_eval_every: int


FULL = Sizes(
  base_steps=600,
  lrs="1e-4,1e-3,1e-2,1e-1,1",
  lr_steps=300,
  lr_eval_every=50,
  batches="4,16,64",
  batch_steps=256,
  batch_eval_every=16,
  n_small=64,
  n_small_eval=50,
  epoch_lrs="1e-4,1e-3",
  epochs="1,3,10,30",
  epoch_eval_every=32,
  ranks="1,2,4,8,16,32",
  rank_steps=600,
  rank_eval_every=200,
)
QUICK = Sizes(
  base_steps=20,
  lrs="1e-3,1",
  lr_steps=12,
  lr_eval_every=6,
  batches="4,16",
  batch_steps=16,
  batch_eval_every=4,
  n_small=8,
  n_small_eval=4,
  epoch_lrs="1e-3",
  epochs="1,3",
  epoch_eval_every=4,
  ranks="1,4",
  rank_steps=8,
  rank_eval_every=4,
)
# The default rank-8 config's scale alpha/rank = 16/8 = 2; rsLoRA's
# alpha/sqrt(rank) equals it at rank 8 with this alpha, and keeps the size
# of an update the same at every rank (with alpha/rank, rank 1 would take
# updates 2.8x as large and rank 32 ones half as large as rank 8's).
LORA_ALPHA = 2 * math.sqrt(8)


def _cfg(name: str) -> str:
  return os.path.join(ROOT, "configs", name)


def claim_sweep(claim: int, out: str, s: Sizes) -> tuple[str, list[str]]:
  """(config, the sweep's other arguments) of a claim."""
  base = os.path.join(out, "base")
  if claim == 1:
    return _cfg("pretrain_clm.py"), [
      f"--grid=optimizer.lr={s.lrs}",
      f"--config.total_steps={s.lr_steps}",
      f"--config.eval_every={s.lr_eval_every}",
      f"--config.checkpoint_every={s.lr_steps}",
      "--config.log_every=1",
    ]
  if claim == 2:
    return _cfg("pretrain_clm.py"), [
      f"--grid=batch_size={s.batches}",
      f"--config.total_steps={s.batch_steps}",
      f"--config.eval_every={s.batch_eval_every}",
      f"--config.checkpoint_every={s.batch_steps}",
      "--config.log_every=1",
    ]
  if claim == 3:
    train, ev = small_sft_files(out, s)
    return _cfg("sft.py"), [
      f"--grid=optimizer.lr={s.epoch_lrs}",
      f"--grid=data.num_epochs={s.epochs}",
      f"--config.init={base}",
      f"--config.data.train_files={train}",
      f"--config.data.eval_files={ev}",
      "--config.total_steps=0",  # as many steps as the epochs take
      "--config.seq_len=32",
      "--config.data.packing=False",  # an epoch: len(rows) / batch steps
      f"--config.eval_every={s.epoch_eval_every}",
      "--config.checkpoint_every=1000",
      "--config.log_every=1",
      "--config.optimizer.warmup_steps=2",
      "--config.sft.max_eval_generations=100",
    ]
  if claim == 4:
    return _cfg("lora.py"), [
      f"--grid=lora.rank={s.ranks}",
      f"--config.init={base}",
      "--config.data.builtin.tasks=add",
      "--config.seq_len=32",
      f"--config.total_steps={s.rank_steps}",
      f"--config.eval_every={s.rank_eval_every}",
      f"--config.checkpoint_every={s.rank_steps}",
      "--config.log_every=1",
      "--config.lora.rslora=True",
      f"--config.lora.alpha={LORA_ALPHA:.4f}",
    ]
  raise ValueError(f"no claim {claim}")


def small_sft_files(out: str, s: Sizes) -> tuple[str, str]:
  """Claim 3's data: `n_small` training rows per task (the suite's train
  split) and `n_small_eval` held-out rows per task, as SFT JSONL in
  OUT/data. Deterministic; rewritten only when different."""
  folder = os.path.join(out, "data")
  os.makedirs(folder, exist_ok=True)
  paths = []
  for split, n in (("train", s.n_small), ("eval", s.n_small_eval)):
    rows = [r for t in tasks.TASKS for r in tasks.generate(t, n, 0, split)]
    order = np.random.default_rng(0).permutation(len(rows))
    text = "".join(json.dumps(rows[i]) + "\n" for i in order)
    path = os.path.join(folder, f"small_sft_{split}.jsonl")
    old = open(path).read() if os.path.exists(path) else None
    if old != text:
      with open(path + ".tmp", "w") as f:
        f.write(text)
      os.replace(path + ".tmp", path)
    paths.append(path)
  return paths[0], paths[1]


# ------------------------------------------------------------ a run's data


@dataclasses.dataclass
class Run:
  """One point of a claim: its grid value, outcome and metrics rows."""

  value: float
  status: str  # done | diverged | failed (exit N) | pending | ...
  rows: list[dict]
  diverged_at: int | None = None
  group: float | None = None  # the second grid key's value (claim 3: lr)

  def series(self, name: str) -> tuple[np.ndarray, np.ndarray]:
    return plot.series(self.rows, name)

  def final(self, name: str) -> float:
    """The last finite value of `name` (NaN if none)."""
    _, v = self.series(name)
    v = v[np.isfinite(v)]
    return float(v[-1]) if len(v) else math.nan

  def best(self, name: str) -> float:
    _, v = self.series(name)
    v = v[np.isfinite(v)]
    return float(v.min()) if len(v) else math.nan

  def at(self, name: str, step: int) -> float:
    steps, v = self.series(name)
    hit = v[steps == step]
    return float(hit[0]) if len(hit) else math.nan

  def first(self, name: str) -> float:
    for row in self.rows:
      if row.get(name) is not None:
        return float(row[name])
    return math.nan

  @property
  def ok(self) -> bool:
    return self.status == "done"


def outcome(status: str, exit_code) -> str:
  """A results.csv status as the study names it: a non-finite run (exit 3)
  is 'diverged'."""
  code = None if exit_code in (None, "") else int(float(exit_code))
  if status == "failed" and code == errors.EXIT_NONFINITE:
    return "diverged"
  if status == "failed":
    return f"failed (exit {code})"
  return status


def load_runs(folder: str, key: str, group: str | None = None) -> list[Run]:
  """The runs of a sweep folder (its results.csv and metrics files), by
  `group` (a second grid key), then `key`."""
  out = []
  for row in plot.read_results(os.path.join(folder, "results.csv")):
    workdir = row.get("workdir") or ""
    path = os.path.join(workdir, plot.METRICS_FILE)
    rows = plot.read_rows(path) if os.path.exists(path) else []
    status = outcome(str(row.get("status")), row.get("exit_code"))
    at = None
    if status == "diverged":
      log = os.path.join(workdir, sweep.LOG_FILE)
      text = open(log, errors="replace").read() if os.path.exists(log) else ""
      found = re.findall(r"diverged at step (\d+)", text)
      at = int(found[-1]) if found else None
    g = float(row[group]) if group else None
    out.append(Run(float(row[key]), status, rows, at, g))
  return sorted(out, key=lambda r: (r.group or 0.0, r.value))


# ------------------------------------------------------------ statistics


def step_noise(steps, values, start: int = 0) -> float:
  """Std of the step-to-step change of a curve logged every step, over the
  steps >= `start` (NaN with fewer than 3 changes)."""
  keep = (steps >= start) & np.isfinite(values)
  s, v = steps[keep], values[keep]
  d = np.diff(v)[np.diff(s) == 1]
  return float(np.std(d)) if len(d) >= 2 else math.nan


def max_rise(values) -> float:
  """The most a curve rose above its running minimum (0 if it never did)."""
  v = np.asarray(values, dtype=float)
  v = v[np.isfinite(v)]
  if not len(v):
    return math.nan
  return float(np.max(v - np.minimum.accumulate(v)))


def mean_over(run: Run, name: str, lo: int, hi: int) -> float:
  """Mean of `name` over steps lo < step <= hi (NaN if none)."""
  steps, v = run.series(name)
  keep = (steps > lo) & (steps <= hi) & np.isfinite(v)
  return float(v[keep].mean()) if keep.any() else math.nan


def _f(x, digits: int = 3) -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "—"
  if isinstance(x, float):
    return f"{x:.{digits}f}"
  return str(x)


def _g(x: float) -> str:
  return f"{x:g}"


def md_table(head: Sequence[str], rows: Sequence[Sequence]) -> str:
  lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
  return "\n".join(lines)


@dataclasses.dataclass
class Verdict:
  claim: int
  held: bool | None  # None: not enough finished runs to say
  short: str  # held | did not hold | partly | no data
  text: str  # the sentence(s) with the numbers
  tables: list[str]
  numbers: dict

  def markdown(self) -> str:
    return "\n\n".join(
      [*self.tables, f"**Verdict: {self.short}.** {self.text}"]
    )


def _no_data(claim: int, runs: Sequence[Run], need: int) -> Verdict | None:
  ok = [r for r in runs if r.ok]
  if len(ok) >= need:
    return None
  states = ", ".join(f"{_g(r.value)}: {r.status}" for r in runs) or "none"
  return Verdict(
    claim,
    None,
    "no data",
    f"only {len(ok)} run(s) finished ({states}); nothing to judge",
    [],
    {},
  )


# ------------------------------------------------------------ verdicts


def verdict_lr(runs: Sequence[Run], warmup: int = 50) -> Verdict:
  """Claim 1. A run is unstable when it diverged (non-finite: exit 3), or
  after warm-up its train loss rose > 1 nat above its running minimum or
  moved from step to step with more than twice the noise (`step_noise`)
  of the best lr's run. Held when the highest lr is unstable and ends > TOL
  worse than the best lr (or diverged); the lowest lr ends > TOL worse than
  the best with its eval loss still falling (its last eval below the one
  before by > 0.01); and the best lr is neither of them."""
  rows, num = [], {}
  for r in runs:
    steps, v = r.series("train/loss")
    _, ev = r.series("eval/loss")
    ev = ev[np.isfinite(ev)]
    num[r.value] = dict(
      status=r.status,
      diverged_at=r.diverged_at,
      train=r.final("train/loss"),
      eval=r.final("eval/loss"),
      best=r.best("eval/loss"),
      rise=max_rise(v[steps > warmup]),
      noise=step_noise(steps, v, start=warmup + 1),
      falling=float(ev[-2] - ev[-1]) if len(ev) >= 2 else math.nan,
    )
  done = [r for r in runs if r.ok]
  best = min(done, key=lambda r: r.final("eval/loss")) if done else None
  ref = num[best.value]["noise"] if best else math.nan
  for r in runs:
    n = num[r.value]
    n["unstable"] = bool(
      r.status == "diverged"
      or (math.isfinite(n["rise"]) and n["rise"] > 1.0)
      or (math.isfinite(ref) and n["noise"] > 2 * ref)
    )
    status = r.status
    if status == "diverged" and r.diverged_at is not None:
      status += f" at step {r.diverged_at}"
    rows.append(
      [
        _g(r.value),
        status,
        _f(n["train"]),
        _f(n["eval"]),
        _f(n["best"]),
        _f(n["falling"]),
        _f(n["noise"], 4),
        _f(n["rise"]),
        "yes" if n["unstable"] else "no",
      ]
    )
  table = md_table(
    [
      "lr",
      "outcome",
      "final train loss",
      "final eval loss",
      "best eval loss",
      "last eval drop",
      f"train-loss noise after step {warmup}",
      "max rise above running min",
      "unstable",
    ],
    rows,
  )
  nd = _no_data(1, runs, 2)
  if nd:
    nd.tables = [table]
    nd.numbers = {_g(k): v for k, v in num.items()}
    return nd
  hi, lo = runs[-1], runs[0]
  best_loss = best.final("eval/loss")
  n_hi, n_lo = num[hi.value], num[lo.value]
  too_high = n_hi["unstable"] and (
    hi.status == "diverged" or n_hi["eval"] > best_loss + TOL
  )
  too_low = lo.ok and n_lo["eval"] > best_loss + TOL and n_lo["falling"] > 0.01
  interior = best is not hi and best is not lo
  held = bool(too_high and too_low and interior)
  if hi.status == "diverged":
    hi_what = f"diverged (non-finite at step {hi.diverged_at})"
  else:
    hi_what = (
      f"ended at eval loss {_f(n_hi['eval'])}, its train loss noise "
      f"{_f(n_hi['noise'], 4)} against {_f(ref, 4)} at the best lr and its "
      f"largest rise {_f(n_hi['rise'])}"
    )
  parts = [
    f"Best lr {_g(best.value)} (final eval loss {_f(best_loss)}).",
    f"The highest, {_g(hi.value)}, {hi_what}"
    + (": unstable." if too_high else ": not clearly unstable."),
    f"The lowest, {_g(lo.value)}, ended at {_f(n_lo['eval'])}, its eval "
    f"loss still falling by {_f(n_lo['falling'])} between its last two "
    "evaluations" + (": slow." if too_low else ": not clearly slow."),
  ]
  if not interior:
    parts.append(f"The best lr is at the edge of the grid ({_g(best.value)}).")
  for r in runs:
    if r is not hi and r.status == "diverged":
      parts.append(f"lr {_g(r.value)} diverged too.")
  return Verdict(
    1,
    held,
    "held" if held else "did not hold",
    " ".join(parts),
    [table],
    {_g(k): v for k, v in num.items()},
  )


def verdict_batch(runs: Sequence[Run], steps_total: int) -> Verdict:
  """Claim 2. 'Smoother' held when the step-to-step noise of train/loss
  (second half) falls with every larger batch. 'Not always better per
  step' held when, at the half-way or the last step, some larger batch's
  eval loss is not lower than the next smaller batch's by > TOL. The claim
  held when both did. Also reported: eval loss at equal examples seen."""
  nd = _no_data(2, runs, 2)
  half = steps_total // 2
  marks = sorted({steps_total // 4, half, steps_total})
  num, rows = {}, []
  for r in runs:
    steps, v = r.series("train/loss")
    noise = step_noise(steps, v, start=half)
    evals = {m: r.at("eval/loss", m) for m in marks}
    num[r.value] = dict(status=r.status, noise=noise, eval=evals)
    rows.append(
      [
        _g(r.value),
        r.status,
        _f(noise, 4),
        _f(r.final("train/loss")),
        *[_f(evals[m]) for m in marks],
        f"{int(r.value) * steps_total:,}",
      ]
    )
  steps_table = md_table(
    [
      "batch",
      "outcome",
      f"train-loss noise (std of step-to-step change, steps {half}-"
      f"{steps_total})",
      "final train loss",
      *[f"eval loss @ step {m}" for m in marks],
      "examples seen",
    ],
    rows,
  )
  # Equal examples: every batch's eval at the step where it has seen E.
  examples = sorted({int(r.value) * steps_total for r in runs})
  ex_rows = []
  for e in examples:
    cells = []
    for r in runs:
      b = int(r.value)
      cells.append(_f(r.at("eval/loss", e // b)) if e % b == 0 else "—")
    ex_rows.append([f"{e:,}", *cells])
  ex_table = md_table(
    ["examples seen", *[f"eval loss, batch {_g(r.value)}" for r in runs]],
    ex_rows,
  )
  if nd:
    nd.tables = [steps_table, ex_table]
    nd.numbers = {_g(k): v for k, v in num.items()}
    return nd
  done = [r for r in runs if r.ok]
  noise = [num[r.value]["noise"] for r in done]
  smoother = all(b < a for a, b in zip(noise, noise[1:], strict=False))
  pairs = list(zip(done, done[1:], strict=False))
  not_better = []
  for small, large in pairs:
    for m in (half, steps_total):
      a, b = num[small.value]["eval"][m], num[large.value]["eval"][m]
      if math.isfinite(a) and math.isfinite(b) and not b < a - TOL:
        not_better.append((small.value, large.value, m, a, b))
  per_example = []  # (examples, batch that was best)
  for e in examples:
    have = [
      (r.at("eval/loss", e // int(r.value)), r.value)
      for r in done
      if e % int(r.value) == 0
      and math.isfinite(r.at("eval/loss", e // int(r.value)))
    ]
    if len(have) >= 2:
      per_example.append((e, min(have)[1], have))
  held = bool(smoother and not_better)
  noise_txt = ", ".join(
    f"{_f(num[r.value]['noise'], 4)} at batch {_g(r.value)}" for r in done
  )
  parts = [
    f"Train-loss noise {noise_txt}: "
    + ("smoother with every larger batch." if smoother else "not monotone.")
  ]
  if not_better:
    parts.append(
      "Per step, a larger batch was not better (by > "
      f"{TOL}) in {len(not_better)} case(s): "
      + "; ".join(
        f"batch {_g(b)} vs {_g(a)} at step {m}: {_f(lb)} vs {_f(la)}"
        for a, b, m, la, lb in not_better
      )
      + "."
    )
  else:
    gains = "; ".join(
      f"batch {_g(lg.value)} vs {_g(sm.value)} at step {steps_total}: "
      f"{_f(num[lg.value]['eval'][steps_total])} vs "
      f"{_f(num[sm.value]['eval'][steps_total])}"
      for sm, lg in pairs
    )
    parts.append(
      "Per step, every larger batch was better at both the half-way and "
      f"the last step ({gains}): that part did not hold here."
    )
  for e, winner, have in per_example:
    parts.append(
      f"At {e:,} examples seen the best was batch {_g(winner)} ("
      + ", ".join(f"batch {_g(b)} {_f(v)}" for v, b in sorted(have))
      + ")."
    )
  short = "held" if held else ("partly held" if smoother else "did not hold")
  return Verdict(
    2,
    held,
    short,
    " ".join(parts),
    [steps_table, ex_table],
    {
      _g(k): dict(v, eval={str(m): x for m, x in v["eval"].items()})
      for k, v in num.items()
    },
  )


def epoch_steps(run: Run) -> int | None:
  """Steps per epoch of a `data.num_epochs` run (its last step / epochs)."""
  steps, _ = run.series("train/loss")
  if not len(steps) or not run.value:
    return None
  return int(round(int(steps.max()) / run.value))


def _epoch_group(runs: Sequence[Run]) -> tuple[dict, list, str, bool, bool]:
  """One learning rate's runs of claim 3: (numbers by epochs, table rows,
  verdict text, widening, overfit)."""
  num, rows = {}, []
  lr = runs[0].group
  at = "" if lr is None else f"At lr {_g(lr)}: "
  for r in runs:
    per = epoch_steps(r)
    last = int(per * r.value) if per else 0
    train = mean_over(r, "train/loss", last - per, last) if per else math.nan
    ev = r.final("eval/loss")
    steps, evs = r.series("eval/loss")
    ok = np.isfinite(evs) & (steps > 0)
    low = float(evs[ok].min()) if ok.any() else math.nan
    low_step = int(steps[ok][np.argmin(evs[ok])]) if ok.any() else None
    num[r.value] = dict(
      status=r.status,
      steps=last,
      start=r.at("eval/loss", 0),
      train=train,
      eval=ev,
      low=low,
      low_step=low_step,
      gap=ev - train,
      acc=r.final("eval/task_accuracy"),
      start_acc=r.at("eval/task_accuracy", 0),
    )
    rows.append(
      [
        _g(lr) if lr is not None else "",
        _g(r.value),
        last,
        r.status,
        _f(train),
        _f(ev),
        f"{_f(low)} (step {low_step})",
        _f(ev - train),
        _f(r.final("eval/task_accuracy")),
      ]
    )
  done = [r for r in runs if r.ok]
  if len(done) < 2:
    return num, rows, f"{at}fewer than two runs finished.", False, False
  gaps = [num[r.value]["gap"] for r in done]
  widening = all(b >= a - 0.01 for a, b in zip(gaps, gaps[1:], strict=False))
  widening = bool(widening and gaps[-1] - gaps[0] > 0.1)
  longest = done[-1]
  fewer = min(done[:-1], key=lambda r: num[r.value]["eval"])
  n, nf = num[longest.value], num[fewer.value]
  overfit = bool(n["eval"] > nf["eval"] + TOL)
  gap_txt = ", ".join(
    f"{_f(num[r.value]['gap'])} after {_g(r.value)}" for r in done
  )
  start = n["start"]
  below = [r for r in done if num[r.value]["eval"] < start - TOL]
  text = (
    f"{at}{'the' if at else 'The'} gap (eval − train loss) was {gap_txt} "
    "epochs ("
    + ("it widens" if widening else "it does not widen steadily")
    + f"); after {_g(longest.value)} epochs the eval loss ended at "
    f"{_f(n['eval'])} against {_f(nf['eval'])} after {_g(fewer.value)} "
    + ("(overfit)" if overfit else "(not worse: no overfitting)")
    + f". The starting model's eval loss was {_f(start)} (task accuracy "
    f"{_f(n['start_acc'])}); "
    + (
      f"{len(below)} of {len(done)} runs ended more than {TOL} below it."
      if below
      else f"no run ended more than {TOL} below it."
    )
  )
  return num, rows, text, widening, overfit


def verdict_epochs(runs: Sequence[Run]) -> Verdict:
  """Claim 3, per learning rate (`Run.group`). The gap is the final eval
  loss minus the mean train/loss over the last epoch (the loss on the
  training rows during the last pass). At one lr the claim held when the
  gap never shrinks by more than 0.01 from one epoch count to the next and
  grows by > 0.1 from the fewest epochs to the most, and the longest run
  overfits: its final eval loss is > TOL above the lowest final eval loss
  of the runs with fewer epochs. Held when it held at every lr; partly when
  the gap widened at some lr."""
  groups: dict = {}
  for r in runs:
    groups.setdefault(r.group, []).append(r)
  rows, texts, numbers, flags = [], [], {}, []
  for g, members in groups.items():
    num, grows, text, widening, overfit = _epoch_group(members)
    rows += grows
    texts.append(text)
    flags.append((widening, overfit))
    for k, v in num.items():
      numbers[_g(k) if g is None else f"lr={_g(g)},epochs={_g(k)}"] = v
  head = [
    "epochs",
    "steps",
    "outcome",
    "train loss (last epoch)",
    "final eval loss",
    "lowest eval loss after step 0",
    "gap (eval − train)",
    "task accuracy",
  ]
  if all(g is None for g in groups):
    table = md_table(head, [r[1:] for r in rows])
  else:
    table = md_table(["lr", *head], rows)
  nd = _no_data(3, runs, 2)
  if nd:
    nd.tables, nd.numbers = [table], numbers
    return nd
  held = all(w and o for w, o in flags)
  partly = any(w for w, _ in flags)
  return Verdict(
    3,
    held,
    "held" if held else ("partly held" if partly else "did not hold"),
    " ".join(texts),
    [table],
    numbers,
  )


def verdict_rank(runs: Sequence[Run]) -> Verdict:
  """Claim 4. Held when the best rank's final eval loss is > TOL below rank
  min's (a higher rank helps) and the smallest rank within TOL of the best
  is below the largest rank tried (it stops helping)."""
  num, rows = {}, []
  for r in runs:
    num[r.value] = dict(
      status=r.status,
      params=r.first("params/trainable"),
      train=r.final("train/loss"),
      eval=r.final("eval/loss"),
      acc=r.final("eval/task_accuracy"),
    )
    p = num[r.value]["params"]
    rows.append(
      [
        _g(r.value),
        f"{int(p):,}" if math.isfinite(p) else "—",
        r.status,
        _f(r.final("train/loss")),
        _f(r.final("eval/loss")),
        _f(r.final("eval/task_accuracy")),
      ]
    )
  table = md_table(
    [
      "rank",
      "trainable params",
      "outcome",
      "final train loss",
      "final eval loss",
      "task accuracy (add)",
    ],
    rows,
  )
  nd = _no_data(4, runs, 2)
  if nd:
    nd.tables = [table]
    nd.numbers = {_g(k): v for k, v in num.items()}
    return nd
  done = [r for r in runs if r.ok]
  best = min(done, key=lambda r: r.final("eval/loss"))
  lo = done[0]
  gain = lo.final("eval/loss") - best.final("eval/loss")
  helps = gain > TOL
  sat = next(
    r for r in done if r.final("eval/loss") <= best.final("eval/loss") + TOL
  )
  plateau = sat.value < done[-1].value
  held = bool(helps and plateau)
  acc = ", ".join(f"{_f(num[r.value]['acc'])} at {_g(r.value)}" for r in done)
  parts = [
    f"Eval loss {_f(lo.final('eval/loss'))} at rank {_g(lo.value)}, best "
    f"{_f(best.final('eval/loss'))} at rank {_g(best.value)} "
    + (
      f"(a gain of {_f(gain)})"
      if helps
      else f"(no gain beyond the {TOL} tolerance)"
    )
    + f"; within {TOL} of the best from rank {_g(sat.value)} on"
    + (" — it stops helping there." if plateau else " — no plateau seen.")
  ]
  parts.append(f"Task accuracy on add: {acc}.")
  return Verdict(
    4,
    held,
    "held" if held else ("partly held" if helps else "did not hold"),
    " ".join(parts),
    [table],
    {_g(k): v for k, v in num.items()},
  )


# ------------------------------------------------------------ figures


def _line(ax, run_value, i, x, y, **kw):
  ax.plot(x, y, color=f"C{i % 10}", lw=1.2, label=run_value, **kw)


def _save(fig: Figure, path: str) -> str:
  """A palette PNG (a third of the bytes: these figures get committed)."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=80)
  buf.seek(0)
  with Image.open(buf) as im:
    im.convert("RGB").quantize(colors=256).save(
      path + ".tmp", format="PNG", optimize=True
    )
  os.replace(path + ".tmp", path)
  return path


def figure(claim: int, runs: Sequence[Run], path: str) -> str:
  """OUT/claimN.png: three panels per claim."""
  fig = Figure(figsize=(14, 3.4), layout="constrained")
  axes = fig.subplots(1, 3)
  label = {1: "lr", 2: "batch", 3: "epochs", 4: "rank"}[claim]
  lrs = list(dict.fromkeys(r.group for r in runs))
  for i, r in enumerate(runs):
    name = f"{label} {_g(r.value)}" + (" (diverged)" * (r.status == "diverged"))
    if r.group is not None:
      name = f"lr {_g(r.group)}, {name}"
    s, v = r.series("train/loss")
    es, ev = r.series("eval/loss")
    if claim == 1:
      _line(axes[0], name, i, s, v)
      _line(axes[1], name, i, es, ev, marker="o", ms=3)
    elif claim == 2:
      b = int(r.value)  # examples seen from step 1 on (log x)
      _line(axes[0], name, i, s, v)
      _line(axes[1], name, i, s[s > 0] * b, v[s > 0])
      _line(axes[2], name, i, es[es > 0] * b, ev[es > 0], marker="o", ms=3)
    elif claim == 3:  # colour: epochs; line style: lr
      per = epoch_steps(r) or 1
      k = sorted({q.value for q in runs}).index(r.value)
      ls = ("-", "--", ":", "-.")[lrs.index(r.group) % 4]
      _line(axes[0], name, k, s / per, v, ls=ls)
      keep = es > 0  # log x; the start is the grey line
      _line(axes[1], name, k, es[keep] / per, ev[keep], marker="o", ms=3, ls=ls)
    elif claim == 4:
      _line(axes[0], name, i, es, ev, marker="o", ms=3)
  if claim == 1:
    axes[0].set(title="train/loss", xlabel="step", ylim=(0, 8))
    axes[1].set(title="eval/loss", xlabel="step", ylim=(0, 8))
    done = [r for r in runs if r.ok]
    axes[2].plot(
      [r.value for r in done], [r.final("eval/loss") for r in done], "o-"
    )
    for r in runs:
      if r.status == "diverged":
        axes[2].axvline(r.value, color="r", ls=":", label="diverged")
    axes[2].set(title="final eval/loss", xlabel="lr", xscale="log")
  elif claim == 2:
    axes[0].set(title="train/loss", xlabel="step")
    axes[1].set(title="train/loss", xlabel="examples seen", xscale="log")
    axes[2].set(title="eval/loss", xlabel="examples seen", xscale="log")
  elif claim == 3:
    axes[0].set(title="train/loss", xlabel="epoch", xscale="log")
    axes[1].set(title="eval/loss", xlabel="epoch", xscale="log")
    for j, lr in enumerate(lrs):
      done = [r for r in runs if r.ok and r.group == lr]
      num = _epoch_group(done)[0] if done else {}
      xs = [r.value for r in done]
      tag = "" if lr is None else f", lr {_g(lr)}"
      for key, marker in (("train", "o"), ("eval", "s")):
        axes[2].plot(
          xs,
          [num[x][key] for x in xs],
          marker=marker,
          ls=("-", "--", ":", "-.")[j % 4],
          color="C0" if key == "train" else "C3",
          label=key + tag,
        )
    start = [r.at("eval/loss", 0) for r in runs if r.ok]
    if start and math.isfinite(start[0]):
      for ax in axes[1:]:
        ax.axhline(start[0], color="0.5", lw=0.8, label="eval at start")
    axes[2].set(title="train (last epoch) and eval loss", xlabel="epochs")
    axes[2].set_xscale("log")
  elif claim == 4:
    axes[0].set(title="eval/loss", xlabel="step")
    done = [r for r in runs if r.ok]
    xs = [r.value for r in done]
    axes[1].plot(xs, [r.final("eval/loss") for r in done], "o-")
    axes[1].set(title="final eval/loss", xlabel="rank", xscale="log")
    axes[2].plot(xs, [r.final("eval/task_accuracy") for r in done], "o-")
    axes[2].set(title="task accuracy (add)", xlabel="rank", xscale="log")
    for ax in axes[1:]:
      ax.set_xticks(xs, [_g(x) for x in xs])
  for ax in axes:
    ax.grid(True, alpha=0.3)
    ax.xaxis.set_minor_formatter(NullFormatter())
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  fig.suptitle(f"Claim {claim}: {CLAIMS[claim]}", fontsize=10)
  return _save(fig, path)


# ------------------------------------------------------------ running


def _cpu_children() -> float:
  r = resource.getrusage(resource.RUSAGE_CHILDREN)
  return r.ru_utime + r.ru_stime


def _cpu_self() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def train_base(out: str, s: Sizes) -> int:
  """configs/pretrain_clm.py's model into OUT/base (resumable; a finished
  run exits 0 at once)."""
  workdir = os.path.join(out, "base")
  cmd = [
    sys.executable,
    "-m",
    "jft.main",
    f"--config={_cfg('pretrain_clm.py')}",
    f"--workdir={workdir}",
    f"--config.total_steps={s.base_steps}",
  ]
  os.makedirs(workdir, exist_ok=True)
  print(f"base: {' '.join(cmd[2:])} (log: {workdir}/run.log)", flush=True)
  with open(os.path.join(workdir, "run.log"), "ab") as log:
    return subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)


def _settled(p: sweep.Plan) -> bool:
  """Every point finished, or diverged, with the same arguments (a diverged
  point would diverge again: not retried)."""

  def same(a, b):
    return [x for x in a if x != "--verbose"] == [
      x for x in b if x != "--verbose"
    ]

  for pt in p.points:
    r = sweep.Record.load(pt.workdir)
    if r is None or not same(r.args, pt.args):
      return False
    nonfinite = r.status == "failed" and r.exit_code == errors.EXIT_NONFINITE
    if r.status != "done" and not nonfinite:
      return False
  return True


def run_claim(
  claim: int, out: str, s: Sizes, parallel: int
) -> tuple[int, bool]:
  """Runs (or resumes) a claim's sweep: (its exit code, whether anything
  ran)."""
  config, args = claim_sweep(claim, out, s)
  folder = os.path.join(out, f"claim{claim}")
  argv = [
    sweep.PROG,
    f"--config={config}",
    f"--workdir={folder}",
    f"--parallel={parallel}",
    *args,
  ]
  print(f"\n== claim {claim}: {CLAIMS[claim]}", flush=True)
  print("$ python -m jft.sweep " + " ".join(argv[1:]), flush=True)
  p = sweep.plan(argv)
  if _settled(p):
    print("every point finished (or diverged) earlier; not run again")
    records = {pt.name: sweep.Record.load(pt.workdir) for pt in p.points}
    rows = sweep.result_rows(p, records)
    sweep.write_results(p, rows)
    if not os.path.exists(os.path.join(folder, "curves.png")):
      results.write_plots(folder, rows, [a.key for a in p.axes])
    return 0, False
  return sweep.execute(p), True


def judge(claim: int, out: str, s: Sizes) -> tuple[Verdict, list[Run]]:
  group = "optimizer.lr" if claim == 3 else None
  runs = load_runs(os.path.join(out, f"claim{claim}"), KEYS[claim], group)
  if claim == 1:
    return verdict_lr(runs, warmup=50 if s is FULL else 0), runs
  if claim == 2:
    return verdict_batch(runs, s.batch_steps), runs
  if claim == 3:
    return verdict_epochs(runs), runs
  return verdict_rank(runs), runs


def _finite(x):
  """`x` with non-finite floats as None (strict JSON)."""
  if isinstance(x, dict):
    return {str(k): _finite(v) for k, v in x.items()}
  if isinstance(x, list | tuple):
    return [_finite(v) for v in x]
  if isinstance(x, float | np.floating):
    return float(x) if math.isfinite(x) else None
  if isinstance(x, np.bool_):
    return bool(x)
  return x


TIMING_FILE = "timing.json"


def _ledger(out: str) -> dict:
  """OUT/timing.json: {part: {wall_s, cpu_s, date}} for the base and each
  claim, as measured when that part last ran (a part skipped as finished
  keeps its entry)."""
  try:
    with open(os.path.join(out, TIMING_FILE)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _record(out: str, part: str, wall_s: float, cpu_s: float) -> None:
  ledger = _ledger(out)
  ledger[part] = dict(
    wall_s=round(wall_s, 1),
    cpu_s=round(cpu_s, 1),
    date=time.strftime("%Y-%m-%d %H:%M"),
  )
  path = os.path.join(out, TIMING_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump(ledger, f, indent=1)
  os.replace(path + ".tmp", path)


def report(
  verdicts: Mapping[int, Verdict],
  timing: dict,
  quick: bool,
  ledger: Mapping[str, Mapping] | None = None,
) -> str:
  lines = [
    "# The built-in study",
    "",
    f"{time.strftime('%Y-%m-%d')}, {cpu_name()}, "
    f"{os.cpu_count()} CPUs{' (--quick)' * quick}; "
    f"wall {results.duration(timing['wall_s'])}, CPU "
    f"{results.duration(timing['cpu_s'])} (this invocation).",
    "",
  ]
  if ledger:
    lines += [
      "Time each part took when it ran (child processes' CPU time):",
      "",
      "| part | wall | CPU | ran at |",
      "| --- | --- | --- | --- |",
    ]
    for part, t in ledger.items():
      lines.append(
        f"| {part} | {results.duration(t['wall_s'])} | "
        f"{results.duration(t['cpu_s'])} | {t.get('date', '')} |"
      )
    wall = sum(t["wall_s"] for t in ledger.values())
    cpu = sum(t["cpu_s"] for t in ledger.values())
    lines += [
      f"| total | {results.duration(wall)} | {results.duration(cpu)} | |",
      "",
    ]
  lines += ["| claim | verdict |", "| --- | --- |"]
  for c, v in verdicts.items():
    lines.append(f"| {c}. {CLAIMS[c]} | {v.short} |")
  for c, v in verdicts.items():
    lines += ["", f"## {c}. {CLAIMS[c]}", "", v.markdown(), ""]
    lines.append(f"![claim {c}](claim{c}.png)")
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument(
    "--out", default=None, help="default runs/study (--quick: runs/study-quick)"
  )
  ap.add_argument("--claims", default="1,2,3,4")
  ap.add_argument("--parallel", type=int, default=1)
  ap.add_argument("--quick", action="store_true")
  ap.add_argument(
    "--jax_cache",
    default=None,
    help="JAX compilation cache for the runs ('' = none; default "
    "OUT/jax_cache)",
  )
  args = ap.parse_args(argv)
  out = os.path.abspath(
    args.out or os.path.join("runs", "study-quick" if args.quick else "study")
  )
  s = QUICK if args.quick else FULL
  claims = sorted({int(c) for c in args.claims.split(",") if c.strip()})
  if not set(claims) <= set(CLAIMS):
    ap.error(f"--claims: pick from {sorted(CLAIMS)}")
  cache = (
    os.path.join(out, "jax_cache")
    if args.jax_cache is None
    else (args.jax_cache)
  )
  if cache:
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", cache)
  os.makedirs(out, exist_ok=True)
  t0, c0 = time.time(), _cpu_children() + _cpu_self()
  print(f"study: {out} ({cpu_name()}, {os.cpu_count()} CPUs)", flush=True)
  timing: dict = {"claims": {}}
  if {3, 4} & set(claims):
    t, c = time.time(), _cpu_children()
    made = os.path.exists(os.path.join(out, "base", "curves.png"))
    code = train_base(out, s)
    timing["base"] = dict(wall_s=time.time() - t, cpu_s=_cpu_children() - c)
    if not made and not code:
      _record(out, "base", **timing["base"])
    if code:
      print(f"base run failed (exit {code}); see {out}/base/run.log")
      return code
  verdicts: dict[int, Verdict] = {}
  for claim in claims:
    t, c = time.time(), _cpu_children()
    try:
      code, ran = run_claim(claim, out, s, args.parallel)
    except errors.UserError as e:
      print(f"error: claim {claim}: {e}")
      return errors.EXIT_USER
    wall, cpu = time.time() - t, _cpu_children() - c
    timing["claims"][claim] = dict(wall_s=wall, cpu_s=cpu, exit=code)
    if ran:
      _record(out, f"claim {claim}", wall, cpu)
    if code == errors.EXIT_PREEMPTED:
      print("interrupted: rerun the same command to resume")
      return code
    v, runs = judge(claim, out, s)
    verdicts[claim] = v
    try:
      figure(claim, runs, os.path.join(out, f"claim{claim}.png"))
    except Exception as e:  # a figure is never worth losing the tables
      print(f"warning: claim{claim}.png not drawn ({type(e).__name__}: {e})")
    print(f"\n-- claim {claim}: {CLAIMS[claim]}\n")
    print(v.markdown(), flush=True)
  timing["wall_s"] = time.time() - t0
  timing["cpu_s"] = _cpu_children() + _cpu_self() - c0
  ledger = _ledger(out)
  text = report(verdicts, timing, args.quick, ledger)
  with open(os.path.join(out, "study.md"), "w") as f:
    f.write(text)
  with open(os.path.join(out, "study.json"), "w") as f:
    json.dump(
      dict(
        date=time.strftime("%Y-%m-%d"),
        cpu=cpu_name(),
        quick=args.quick,
        timing=timing,
        ledger=ledger,
        verdicts={
          c: dict(
            held=v.held, short=v.short, text=v.text, numbers=_finite(v.numbers)
          )
          for c, v in verdicts.items()
        },
      ),
      f,
      indent=1,
      default=str,
    )
  print("\n== verdicts")
  for c, v in verdicts.items():
    print(f"  {c}. {CLAIMS[c]}: {v.short}")
  print(
    f"wall {results.duration(timing['wall_s'])}, CPU "
    f"{results.duration(timing['cpu_s'])}; {out}/study.md"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
