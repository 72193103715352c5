"""jft.sweep: grid parsing and checks (nothing runs on a bad key or value),
failed and interrupted points, and a two-point sweep of real runs end to
end, rerun to see both points skipped."""

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from jft import errors, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLM = os.path.join(ROOT, "configs", "pretrain_clm.py")


# ------------------------------------------------------------ the grid


def test_grid_points_and_names():
  axes = sweep.parse_grid(["optimizer.lr=1e-4, 3e-4", "lora.rank=4,8,16"])
  assert [(a.key, a.raws) for a in axes] == [
    ("optimizer.lr", ("1e-4", "3e-4")),
    ("lora.rank", ("4", "8", "16")),
  ]
  points = sweep.point_values(axes)
  assert len(points) == 6  # the cartesian product, first axis slowest
  assert points[:2] == [
    {"optimizer.lr": "1e-4", "lora.rank": "4"},
    {"optimizer.lr": "1e-4", "lora.rank": "8"},
  ]
  assert sweep.point_name(points[1]) == "lr=1e-4,rank=8"
  # Keys whose last parts clash are named in full; odd characters go.
  assert (
    sweep.point_name({"dpo.beta": "0.1", "kto.beta": "0.2", "init": "a/b c"})
    == "dpo.beta=0.1,kto.beta=0.2,init=a_b_c"
  )
  # A value may hold '='; an empty value is a value ('' for a string key).
  assert sweep.parse_grid(["optimizer.lr_scale=embed=2,"])[0].raws == (
    "embed=2",
    "",
  )
  for spec, want in [
    ("optimizer.lr", "give KEY=V1,V2"),
    ("=1,2", "give KEY=V1,V2"),
    ("lora.rank=4,8,4", "'4' is repeated"),
  ]:
    with pytest.raises(errors.UserError, match=want):
      sweep.parse_grid([spec])
  with pytest.raises(errors.UserError, match="lora.rank has two --grid"):
    sweep.parse_grid(["lora.rank=4", "lora.rank=8"])


def _plan(*args, workdir):
  return sweep.plan(
    ["python -m jft.sweep", f"--config={CLM}", f"--workdir={workdir}", *args]
  )


def test_values_are_typed_as_config_flags_and_passed_on(tmp_path):
  p = _plan(
    "--grid=optimizer.lr=1e-3,0.003",
    "--grid=data.shuffle=false",
    "--grid=model.d_model=32",  # a placeholder (None) key: typed int
    "--config.total_steps",  # the two-argument form stays a pair
    "5",
    "--noconfig.data.packing",
    workdir=tmp_path,
  )
  assert [pt.values for pt in p.points] == [
    {"optimizer.lr": 0.001, "data.shuffle": False, "model.d_model": 32},
    {"optimizer.lr": 0.003, "data.shuffle": False, "model.d_model": 32},
  ]
  first = p.points[0]
  assert first.workdir == os.path.join(
    tmp_path, "lr=1e-3,shuffle=false,d_model=32"
  )
  assert first.args == [
    f"--config={CLM}",
    f"--workdir={first.workdir}",
    "--config.total_steps",
    "5",
    "--noconfig.data.packing",
    "--config.optimizer.lr=1e-3",
    "--config.data.shuffle=false",
    "--config.model.d_model=32",
  ]
  assert first.command[:3] == [sys.executable, "-m", "jft.main"]
  assert not os.listdir(tmp_path)  # planning writes nothing


@pytest.mark.parametrize(
  "args, want",
  [
    (
      ["--grid=optimizer.lrr=1e-3", "--grid=lora.rnak=4"],
      "2 bad grid keys:\n  --grid=optimizer.lrr=1e-3: no such config key "
      "'optimizer.lrr'; did you mean 'optimizer.lr'?\n  --grid=lora.rnak=4: "
      "no such config key 'lora.rnak'; did you mean 'lora.rank'?",
    ),
    (
      ["--grid=learning_rate=1e-3"],
      "did you mean 'optimizer.lr'?",
    ),
    (
      ["--grid=optimizer.lr=1e-3,fast"],
      "--grid=optimizer.lr=1e-3,fast: value 'fast': "
      "--config.optimizer.lr=fast: config.optimizer.lr takes a float",
    ),
    (["--grid=optimizer=1"], "config.optimizer is a group of keys"),
    (
      ["--grid=lora.rank=4", "--config.lora.rank=8"],
      "--config.lora.rank is given too",
    ),
    (
      ["--grid=optimizer.lr=1e-3,-1"],  # jft.validate, naming the point
      "lr=-1: config.optimizer.lr=-1.0: must be > 0",
    ),
    (
      ["--grid=lora.rank=4", "--config.seq_len=1"],  # every point: once
      "config.seq_len=1: must be >= 2",
    ),
    (["--config.totl_steps=1", "--grid=lora.rank=4"], "did you mean 'total"),
    ([], "give at least one --grid"),
  ],
)
def test_bad_keys_and_values_fail_before_anything_runs(tmp_path, args, want):
  with pytest.raises(errors.UserError) as e:
    _plan(*args, workdir=tmp_path / "sweep")
  assert want in str(e.value)
  assert not os.path.exists(tmp_path / "sweep")


# ------------------------------------------------------------ running


def _fake_plan(tmp_path, scripts, parallel=1):
  """A sweep over `x` whose points run small Python scripts, not jft.main:
  each script gets its workdir as argv[1]."""
  axis = sweep.Axis("x", tuple(str(i) for i in range(len(scripts))), "x=...")
  points = []
  for i, script in enumerate(scripts):
    workdir = str(tmp_path / "sweep" / f"x={i}")
    code = textwrap.dedent(script)
    points.append(
      sweep.Point(
        name=f"x={i}",
        raws={"x": str(i)},
        values={"x": i},
        workdir=workdir,
        args=[f"--fake={i}"],
        command=[sys.executable, "-c", code, workdir],
      )
    )
  return sweep.Plan(str(tmp_path / "sweep"), [axis], points, parallel)


_GOOD = """
import json, os, sys
with open(os.path.join(sys.argv[1], "metrics.jsonl"), "w") as f:
  for s in (0, 1, 2):
    f.write(json.dumps({"step": s, "train/loss": 3.0 - s}) + "\\n")
  f.write(json.dumps({"step": 2, "eval/loss": %s}) + "\\n")
print("trained")
"""


def _read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_a_failed_point_is_recorded_and_the_others_run(tmp_path, capsys):
  scripts = [
    _GOOD % "2.5",
    "import sys; print('error: config.x=1: no good', file=sys.stderr); "
    "sys.exit(2)",
    _GOOD % "1.5",
  ]
  plan = _fake_plan(tmp_path, scripts, parallel=2)
  assert sweep.execute(plan) == sweep.EXIT_FAILED
  out = capsys.readouterr().out
  assert "[2/3] x=1: FAILED (exit 2): error: config.x=1: no good" in out
  rows = _read_csv(tmp_path / "sweep" / "results.csv")
  assert [(r["name"], r["status"], r["exit_code"]) for r in rows] == [
    ("x=0", "done", "0"),
    ("x=1", "failed", "2"),
    ("x=2", "done", "0"),
  ]
  assert rows[0]["train/loss"] == "1.0" and rows[2]["best eval/loss"] == "1.5"
  assert rows[1]["train/loss"] == "" and float(rows[1]["wall_s"]) >= 0
  md = (tmp_path / "sweep" / "results.md").read_text()
  assert "| 1 | failed (exit 2) |" in md
  assert "| 2 | done | 1 | 1.5 | 1.5 |" in md
  for png in ("curves.png", "against_x.png"):
    assert os.path.getsize(tmp_path / "sweep" / png) > 10_000
  # The log keeps the command and the point's output.
  log = (tmp_path / "sweep" / "x=1" / "run.log").read_text()
  assert log.startswith("\n$ ") and "no good" in log
  # A rerun skips the finished points and retries the failed one.
  plan.points[1].command[2] = "print('fixed')"
  assert sweep.execute(plan) == 0
  out = capsys.readouterr().out
  assert out.count("finished earlier, skipped") == 2
  record = json.loads((tmp_path / "sweep" / "x=1" / "point.json").read_text())
  assert (record["status"], record["attempts"]) == ("done", 2)


def test_a_signal_stops_running_points_and_starts_no_new_one(tmp_path, capsys):
  wait = """
import signal, sys, time
def stop(*_):
  print("saving"); sys.exit(75)
signal.signal(signal.SIGTERM, stop)
open(sys.argv[1] + "/started", "w").close()
time.sleep(60)
"""
  plan = _fake_plan(tmp_path, [wait, wait, wait], parallel=2)
  started = [os.path.join(p.workdir, "started") for p in plan.points]

  def interrupt():  # once both running points are up
    while not all(os.path.exists(s) for s in started[:2]):
      threading.Event().wait(0.05)
    os.kill(os.getpid(), signal.SIGTERM)

  before = signal.getsignal(signal.SIGTERM)
  threading.Thread(target=interrupt, daemon=True).start()
  assert sweep.execute(plan) == errors.EXIT_PREEMPTED
  out = capsys.readouterr().out
  assert "SIGTERM: running points save a checkpoint and stop" in out
  assert "rerun the same command to resume" in out
  rows = _read_csv(tmp_path / "sweep" / "results.csv")
  assert [r["status"] for r in rows] == [
    "interrupted",
    "interrupted",
    "pending",
  ]
  assert not os.path.exists(started[2])
  assert signal.getsignal(signal.SIGTERM) == before  # handlers restored


def test_points_sharing_an_unmade_stage_do_not_start_together(tmp_path):
  """With --parallel, a point waits while another trains a `run:` stage it
  needs too; a point without it runs alongside."""
  stamp = """
import os, sys, time
open(os.path.join(sys.argv[1], "start"), "w").write(repr(time.time()))
time.sleep(%s)
open(os.path.join(sys.argv[1], "end"), "w").write(repr(time.time()))
"""
  plan = _fake_plan(tmp_path, [stamp % 1.5, stamp % 0, stamp % 0], parallel=2)
  plan.points[0].stages = plan.points[1].stages = ("cache/pretrain-abc",)
  assert sweep.execute(plan, say=lambda *_: None) == 0

  def at(i, what):
    return float(open(os.path.join(plan.points[i].workdir, what)).read())

  assert at(1, "start") >= at(0, "end")  # waited for the stage's maker
  assert at(2, "start") < at(0, "end")  # no stage: ran alongside


# ------------------------------------------------------------ end to end


def test_two_point_sweep_end_to_end_then_skipped(suite_dir, tmp_path):
  """Two real `jft.main` runs at once (tiny model, 4 steps, one device),
  then the same command again: both points are skipped."""
  workdir = tmp_path / "sweep"
  cmd = [
    sys.executable,
    "-m",
    "jft.sweep",
    f"--config={CLM}",
    "--grid=optimizer.lr=1e-3,3e-3",
    f"--workdir={workdir}",
    "--parallel=2",  # both at once: one core each
    "--config.total_steps=4",
    "--config.log_every=2",
    "--config.eval_every=4",
    "--config.checkpoint_every=4",
    "--config.batch_size=4",
    "--config.eval_batch_size=4",
    "--config.seq_len=32",
    "--config.model.d_model=32",
    "--config.model.mlp_dim=64",
    "--config.model.n_heads=2",
    "--config.model.n_kv_heads=1",
    "--config.mesh.num_devices=1",
    f"--config.data.tokenizer={suite_dir / 'tok.model'}",
    f"--config.data.train_files={suite_dir / 'pretrain_train.jsonl'}",
    f"--config.data.eval_files={suite_dir / 'pretrain_eval.jsonl'}",
  ]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(
    cmd, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600
  )
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert "[1/2] lr=1e-3: done" in out.stdout
  assert "[2/2] lr=3e-3: done" in out.stdout
  rows = _read_csv(workdir / "results.csv")
  assert [(r["name"], r["optimizer.lr"], r["status"]) for r in rows] == [
    ("lr=1e-3", "0.001", "done"),
    ("lr=3e-3", "0.003", "done"),
  ]
  for r in rows:
    assert r["exit_code"] == "0" and r["steps"] == "4"
    assert float(r["wall_s"]) > 0
    assert 0 < float(r["train/loss"]) < 10
    assert float(r["best eval/loss"]) <= float(r["eval/loss"]) < 10
    assert r["eval/perplexity"] and r["workdir"].endswith(r["name"])
  md = (workdir / "results.md").read_text().splitlines()
  assert md[0].startswith("| optimizer.lr | status | train/loss | eval/loss |")
  assert md[2].startswith("| 1e-3 | done |") and md[3].startswith("| 3e-3 |")
  for png in (
    "curves.png",
    "against_optimizer.lr.png",
    "lr=1e-3/curves.png",
    "lr=3e-3/curves.png",
  ):
    assert os.path.getsize(workdir / png) > 10_000, png

  again = subprocess.run(
    cmd, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600
  )
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count("finished earlier, skipped") == 2
  assert ": running (log" not in again.stdout
  assert _read_csv(workdir / "results.csv") == rows
