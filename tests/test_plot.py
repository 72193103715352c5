"""jft.plot: curves from metrics.jsonl files, final metrics against a
hyperparameter, the CLI, and the curves.png every finished run writes."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.image import imread

from jft import artefacts, errors, plot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_run(folder, rows):
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, "metrics.jsonl")
  with open(path, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  return str(folder)


def _rows(scale=1.0, null_at=None):
  """A run of 40 steps: train rows every 2 steps (lr warm-up, a falling
  loss), eval rows every 10 with perplexity, one step-0 accounting row."""
  rows = [{"step": 0, "params/trainable": 1000, "eval/loss": 4.0 * scale}]
  for s in range(2, 41, 2):
    loss = scale * (3.0 * math.exp(-s / 15) + 0.5)
    rows.append(
      {
        "step": s,
        "train/loss": None if s == null_at else loss,
        "train/lr": 1e-3 * min(1.0, s / 10),
        "train/grad_norm": 1.0 / s,
      }
    )
    if s % 10 == 0:
      ev = loss + 0.2
      rows.append({"step": s, "eval/loss": ev, "eval/perplexity": math.exp(ev)})
  return rows


def _image(path):
  """The PNG as pixels; asserts it is a real, non-blank picture."""
  assert os.path.getsize(path) > 10_000, path
  img = imread(path)
  assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
  # Drawn: many distinct colours, and a fair share of non-white pixels.
  rgb = img[..., :3]
  codes = (rgb * 255).astype(np.uint32) @ np.array([1 << 16, 1 << 8, 1])
  assert len(np.unique(codes)) > 50
  assert np.mean(np.all(rgb > 0.98, axis=-1)) < 0.97
  return img


def test_series_keeps_nulls_as_nan(tmp_path):
  run = _write_run(tmp_path / "a", _rows(null_at=20))
  rows = plot.read_rows(plot.metrics_path(run))
  steps, values = plot.series(rows, "train/loss")
  assert list(steps) == list(range(2, 41, 2))
  assert math.isnan(values[list(steps).index(20)])
  assert np.isfinite(np.delete(values, list(steps).index(20))).all()
  steps, values = plot.series(rows, "eval/loss")
  assert list(steps) == [0, 10, 20, 30, 40]


def test_curves_writes_png_with_train_and_eval_panels(tmp_path):
  a = _write_run(tmp_path / "a", _rows(null_at=20))
  b = _write_run(tmp_path / "b", _rows(scale=1.3))
  one = plot.curves(a, str(tmp_path / "one.png"))
  _image(one)
  two = str(tmp_path / "out" / "two.png")  # a folder that does not exist
  assert plot.curves([a, f"{b}/metrics.jsonl"], two, labels=["x", "y"]) == two
  img = _image(two)
  # Default panels: loss (train + eval), perplexity, lr, grad_norm -> 2x2.
  assert plot._panels([plot.read_rows(f"{a}/metrics.jsonl")], None) == [
    ("loss", ["train/loss", "eval/loss"]),
    ("perplexity", ["eval/perplexity"]),
    ("lr", ["train/lr"]),
    ("grad_norm", ["train/grad_norm"]),
  ]
  # Explicit metrics: a full name, and a quantity; one panel is smaller.
  small = plot.curves(
    [a, b], str(tmp_path / "small.png"), metrics=["eval/perplexity"]
  )
  assert imread(small).shape[0] < img.shape[0]
  assert not [f for f in os.listdir(tmp_path / "out") if f.endswith(".tmp")]


def test_curves_errors_name_what_is_missing(tmp_path):
  a = _write_run(tmp_path / "a", _rows())
  with pytest.raises(errors.UserError, match="no metric 'bleu'.*train/loss"):
    plot.curves(a, str(tmp_path / "x.png"), metrics=["bleu"])
  with pytest.raises(errors.UserError, match="no metrics.jsonl"):
    plot.curves(str(tmp_path), str(tmp_path / "x.png"))
  with pytest.raises(errors.UserError, match="2 labels for 1 runs"):
    plot.curves(a, str(tmp_path / "x.png"), labels=["p", "q"])
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "metrics.jsonl").write_text('{"step": 0}\nnot json\n{"step": 1}\n')
  with pytest.raises(errors.UserError, match="metrics.jsonl:2: not JSON"):
    plot.read_rows(str(bad / "metrics.jsonl"))
  # A last line cut short (the run is writing it) is left out.
  (bad / "metrics.jsonl").write_text('{"step": 0, "train/loss": 1}\n{"ste')
  assert plot.read_rows(str(bad / "metrics.jsonl")) == [
    {"step": 0, "train/loss": 1}
  ]
  assert not os.path.exists(tmp_path / "x.png")


def test_against_plots_the_given_numbers(tmp_path, monkeypatch):
  results = [
    {"optimizer.lr": lr, "lora.rank": r, "eval/loss": 1 + r * lr * 100}
    for lr in (1e-4, 3e-4, 1e-3)
    for r in (4, 8)
  ]
  results.append({"optimizer.lr": 3e-3, "lora.rank": 4, "eval/loss": None})
  drawn = []
  real_plot = plot.Figure.subplots

  def spy(self, *a, **k):  # records each panel's lines
    axes = real_plot(self, *a, **k)
    drawn.append(axes)
    return axes

  monkeypatch.setattr(plot.Figure, "subplots", spy)
  out = plot.against(
    results,
    "optimizer.lr",
    ["eval/loss"],
    str(tmp_path / "lr.png"),
    group_by=["lora.rank"],
  )
  _image(out)
  ax = drawn[0].ravel()[0]
  assert ax.get_xscale() == "log"  # a learning rate
  lines = {ln.get_label(): ln for ln in ax.get_lines()}
  assert set(lines) == {"rank=4", "rank=8"}
  np.testing.assert_allclose(lines["rank=4"].get_xdata(), [1e-4, 3e-4, 1e-3])
  np.testing.assert_allclose(lines["rank=4"].get_ydata(), [1.04, 1.12, 1.4])
  np.testing.assert_allclose(lines["rank=8"].get_ydata(), [1.08, 1.24, 1.8])
  # A hyperparameter that is not a number is categorical; rank is linear.
  cat = [
    {"schedule": s, "eval/loss": v} for s, v in (("cosine", 1), ("linear", 2))
  ]
  _image(plot.against(cat, "schedule", ["eval/loss"], str(tmp_path / "s.png")))
  assert [t.get_text() for t in drawn[-1].ravel()[0].get_xticklabels()] == [
    "cosine",
    "linear",
  ]
  plot.against(results, "lora.rank", ["eval/loss"], str(tmp_path / "r.png"))
  assert drawn[-1].ravel()[0].get_xscale() == "linear"
  with pytest.raises(errors.UserError, match="no finite value"):
    plot.against(results, "optimizer.lr", ["bleu"], str(tmp_path / "n.png"))


def test_cli_writes_curves_and_against(tmp_path):
  a = _write_run(tmp_path / "a", _rows())
  b = _write_run(tmp_path / "b", _rows(scale=1.2))
  csv = tmp_path / "results.csv"
  csv.write_text(
    "name,optimizer.lr,status,eval/loss\n"
    "a,0.001,done,1.5\nb,0.003,done,1.2\nc,0.01,failed,\n"
  )
  cmds = [
    [a, b, f"--out={tmp_path / 'c.png'}", "--metrics", "loss", "lr"],
    [str(csv), "--against=optimizer.lr", "--metrics=eval/loss"]
    + [f"--out={tmp_path / 'ag.png'}"],
  ]
  for args in cmds:
    out = subprocess.run(
      [sys.executable, "-m", "jft.plot", *args],
      capture_output=True,
      text=True,
      cwd=ROOT,
      timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "wrote" in out.stdout
  _image(tmp_path / "c.png")
  _image(tmp_path / "ag.png")
  out = subprocess.run(
    [sys.executable, "-m", "jft.plot", a, "--metrics=bleu"],
    capture_output=True,
    text=True,
    cwd=str(tmp_path),
    timeout=120,
  )
  assert out.returncode == errors.EXIT_USER
  assert out.stderr.startswith("error: no metric 'bleu'")


def test_write_curves_never_fails_a_run(tmp_path, capsys):
  run = _write_run(tmp_path / "run", _rows())
  path = artefacts.write_curves(run, os.path.join(run, "metrics.jsonl"))
  assert path == os.path.join(run, "curves.png")
  _image(path)
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "metrics.jsonl").write_text('{"step": 0, "data/x": 1}\n')
  capsys.readouterr()
  assert (
    artefacts.write_curves(str(empty), str(empty / "metrics.jsonl")) is None
  )
  out = capsys.readouterr().out
  assert out.count("\n") == 1 and out.startswith("warning: ")
  assert "curves.png not written (UserError: nothing to plot" in out
