"""bench/study.py's tables and verdicts, on crafted results.

A `--quick` run of even one claim is a few whole `jft.main` processes
(~25 s of CPU each for imports and compiles): too slow for the suite, so
this checks the parts that turn runs into tables and verdicts instead.
Only keeps the study from rotting; its figures are never asserted.
"""

import csv
import functools
import importlib.util
import json
import math
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.cache
def _study():
  path = os.path.join(ROOT, "bench", "study.py")
  spec = importlib.util.spec_from_file_location("bench_study", path)
  mod = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = mod  # its dataclasses look their module up
  spec.loader.exec_module(mod)
  return mod


def _rows(train, evals, every=1, **first):
  """metrics.jsonl rows: train/loss at steps 1.., eval/loss at 0, every.."""
  rows = [dict(step=0, **first)]
  for i, v in enumerate(evals):
    rows.append({"step": i * every, "eval/loss": v})
  for i, v in enumerate(train):
    rows.append({"step": i + 1, "train/loss": v})
  return sorted(rows, key=lambda r: r["step"])


def _run(st, value, train, evals, every=1, status="done", **kw):
  return st.Run(float(value), status, _rows(train, evals, every), **kw)


def test_outcome_names_a_nonfinite_exit_diverged():
  st = _study()
  assert st.outcome("failed", "3") == "diverged"
  assert st.outcome("failed", 3.0) == "diverged"
  assert st.outcome("failed", 2) == "failed (exit 2)"
  assert st.outcome("done", 0) == "done"


def test_statistics_by_hand():
  st = _study()
  steps = np.arange(1, 7)
  v = np.array([5.0, 4.0, 4.5, 3.0, 3.5, 2.0])
  # changes from step 3 on: -1.5, +0.5, -1.5 -> std of those three
  assert math.isclose(
    st.step_noise(steps, v, start=3), float(np.std([-1.5, 0.5, -1.5]))
  )
  assert st.max_rise([5.0, 3.0, 4.5, 2.0, 2.5]) == 1.5
  assert st.max_rise([3.0, 2.0, 1.0]) == 0.0


def test_lr_verdict_holds_and_fails_as_the_numbers_say():
  st = _study()
  slow = _run(st, 1e-4, [6, 5.5, 5.2, 5.0], [6, 5.6, 5.1])
  best = _run(st, 1e-3, [6, 3, 2, 1.5], [6, 2.5, 1.5])
  noisy = _run(st, 1e-2, [6, 2, 4, 3.5], [6, 2.0, 3.4])  # rose 2 nats
  dead = _run(st, 1e-1, [6, 9], [6], status="diverged", diverged_at=3)
  v = st.verdict_lr([slow, best, noisy, dead], warmup=0)
  assert v.held and v.short == "held"
  assert "diverged (non-finite at step 3)" in v.text
  assert "| 0.1 | diverged at step 3 |" in v.tables[0]
  # Lowest lr best: 'too low is slow' does not hold.
  fast = _run(st, 1e-4, [6, 2, 1.2, 1.0], [6, 1.5, 1.0])
  v = st.verdict_lr([fast, best, dead], warmup=0)
  assert not v.held and v.short == "did not hold"
  assert "edge of the grid" in v.text
  # Finished but erratic: unstable by its rises.
  erratic = _run(st, 1.0, [6, 3, 4.5, 3, 4.6, 3.2], [6, 3.5, 3.3])
  v = st.verdict_lr([slow, best, erratic], warmup=0)
  assert v.held and v.numbers["1"]["unstable"]


def test_lr_verdict_without_finished_runs_says_so():
  st = _study()
  dead = _run(st, 1.0, [6, 9], [6], status="diverged")
  v = st.verdict_lr([dead], warmup=0)
  assert v.held is None and v.short == "no data"
  assert "diverged" in v.text and v.tables


def test_batch_verdict_equal_steps_and_equal_examples():
  st = _study()
  rng = np.random.default_rng(0)
  n = 16
  trend = np.linspace(5, 2, n)
  runs = []
  for b, noise, evals in (
    (4, 0.4, [6, 4.0, 3.0, 2.6, 2.4]),
    (16, 0.1, [6, 3.0, 2.2, 2.0, 1.9]),
  ):
    train = trend + noise * rng.standard_normal(n)
    runs.append(_run(st, b, train, evals, every=4))
  v = st.verdict_batch(runs, n)
  # smoother, but batch 16 is better per step: only partly held
  assert v.short == "partly held" and not v.held
  assert v.numbers["4"]["noise"] > v.numbers["16"]["noise"]
  # equal examples 64: batch 4 at step 16 (2.4) vs batch 16 at step 4 (3.0)
  assert "| 64 | 2.400 | 3.000 |" in v.tables[1]
  assert "best was batch 4" in v.text
  # A larger batch no better per step: held.
  runs[1] = _run(st, 16, trend, [6, 4.0, 3.0, 2.6, 2.39], every=4)
  assert st.verdict_batch(runs, n).held


def test_epochs_verdict_gap_and_overfit():
  st = _study()
  # 2 steps per epoch; train loss falls with epochs, eval turns up.
  one = _run(st, 1, [2.0, 1.8], [2.5, 1.9], every=2)
  three = _run(st, 3, [2, 1.6, 1.4, 1.2, 1.0, 0.9], [2.5, 1.6, 1.5, 1.6], 2)
  ten = _run(st, 10, list(np.linspace(2, 0.1, 20)), [2.5, 1.5, 2.5], every=10)
  v = st.verdict_epochs([one, three, ten])
  assert v.held, v.text
  # gap after 1 epoch: eval 1.9 - mean train of steps 1-2 (1.9) = 0
  assert math.isclose(v.numbers["1"]["gap"], 0.0, abs_tol=1e-9)
  assert math.isclose(v.numbers["3"]["train"], 0.95)
  assert v.numbers["10"]["steps"] == 20
  assert v.numbers["10"]["low"] == 1.5 and v.numbers["10"]["start"] == 2.5
  assert "| 10 | 20 | done |" in v.tables[0]
  # eval loss that keeps falling: no overfit, partly held (the gap widens)
  ten = _run(st, 10, list(np.linspace(2, 0.1, 20)), [2.5, 1.5, 1.4], 10)
  v = st.verdict_epochs([one, three, ten])
  assert not v.held and v.short == "partly held"
  assert "3 of 3 runs ended more than 0.05 below it" in v.text


def test_epochs_verdict_per_learning_rate():
  st = _study()

  def run(lr, epochs, train, evals, every):
    r = _run(st, epochs, train, evals, every)
    r.group = lr
    return r

  fit = [
    run(1e-3, 1, [2.0, 1.8], [1.0, 1.9], 2),
    run(1e-3, 3, [2, 1.6, 1.4, 1.2, 1.0, 0.9], [1.0, 1.6, 1.5, 1.6], 2),
  ]
  flat = [
    run(1e-4, 1, [1.0, 1.0], [1.0, 1.0], 2),
    run(1e-4, 3, [1.0] * 6, [1.0, 1.0, 1.0, 1.0], 2),
  ]
  v = st.verdict_epochs(fit + flat)
  assert v.short == "partly held" and not v.held
  assert "| 0.001 | 3 | 6 | done |" in v.tables[0]
  assert "lr=0.0001,epochs=3" in v.numbers
  assert v.text.count("no run ended more than 0.05 below it") == 2


def test_rank_verdict_plateau():
  st = _study()

  def r(rank, loss, acc):
    rows = [
      {"step": 0, "params/trainable": 100.0 * rank, "eval/loss": 3.0},
      {"step": 1, "train/loss": loss, "eval/loss": loss},
      {"step": 1, "eval/task_accuracy": acc},
    ]
    return st.Run(float(rank), "done", rows)

  runs = [r(1, 1.5, 0.1), r(4, 1.2, 0.3), r(16, 1.19, 0.31), r(32, 1.2, 0.3)]
  v = st.verdict_rank(runs)
  assert v.held and "from rank 4 on" in v.text
  assert "| 16 | 1,600 | done |" in v.tables[0]
  flat = [r(1, 1.2, 0.3), r(32, 1.19, 0.3)]
  assert st.verdict_rank(flat).short == "did not hold"
  rising = [r(1, 1.5, 0.1), r(4, 1.3, 0.2), r(32, 1.1, 0.4)]
  assert st.verdict_rank(rising).short == "partly held"


def test_load_runs_reads_a_sweep_folder(tmp_path):
  st = _study()
  rows = []
  for name, status, code in (("lr=1e-3", "done", 0), ("lr=1", "failed", 3)):
    wd = tmp_path / name
    wd.mkdir()
    with open(wd / "metrics.jsonl", "w") as f:
      for row in _rows([5.0, 4.0], [6.0, 4.5]):
        f.write(json.dumps(row) + "\n")
    (wd / "run.log").write_text(
      "error: training diverged at step 7 (train/loss nan)\n" * (code == 3)
    )
    rows.append([name, name[3:], status, code, str(wd)])
  with open(tmp_path / "results.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["name", "optimizer.lr", "status", "exit_code", "workdir"])
    w.writerows(rows)
  runs = st.load_runs(str(tmp_path), "optimizer.lr")
  assert [(r.value, r.status, r.diverged_at) for r in runs] == [
    (1e-3, "done", None),
    (1.0, "diverged", 7),
  ]
  assert runs[0].final("eval/loss") == 4.5
  for claim in (1, 2, 3, 4):
    path = st.figure(claim, runs, str(tmp_path / f"c{claim}.png"))
    assert os.path.getsize(path) > 0


def test_small_sft_files_are_disjoint_and_stable(tmp_path):
  st = _study()
  train, ev = st.small_sft_files(str(tmp_path), st.QUICK)
  first = open(train).read()
  tr = [json.loads(x) for x in first.splitlines()]
  te = [json.loads(x) for x in open(ev).read().splitlines()]
  assert (
    len(tr) == 4 * st.QUICK.n_small and len(te) == 4 * st.QUICK.n_small_eval
  )
  assert {r["task"] for r in tr} == {"add", "copy", "reverse", "sort"}
  assert not {r["prompt"] for r in tr} & {r["prompt"] for r in te}
  assert st.small_sft_files(str(tmp_path), st.QUICK) == (train, ev)
  assert open(train).read() == first


def test_report_lists_every_verdict():
  st = _study()
  v = st.Verdict(2, False, "partly held", "numbers here.", ["| t |"], {})
  text = st.report({2: v}, {"wall_s": 61.0, "cpu_s": 30.0}, quick=True)
  assert "| 2. Larger batches" in text and "partly held" in text
  assert "![claim 2](claim2.png)" in text and "1m01s" in text
