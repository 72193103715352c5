"""Failure behaviour of a run: divergence, preemption, corrupt checkpoints,
a busy workdir, a changed config on resume, an unwritable folder."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import tiny_config

from jft import checkpoint, errors, metrics, resume, runlock, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rows(workdir):
  """metrics.jsonl, parsed strictly: a bare NaN/Infinity fails the test."""

  def refuse(token):
    raise AssertionError(f"metrics.jsonl holds a bare {token}")

  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(ln, parse_constant=refuse) for ln in f if ln.strip()]


def _losses(workdir):
  return {
    r["step"]: r["train/loss"] for r in _rows(workdir) if "train/loss" in r
  }


def _config(suite_dir, **kw):
  kw.setdefault("total_steps", 6)
  kw.setdefault("checkpoint_every", 2)
  kw.setdefault("eval_every", 0)
  return tiny_config(suite_dir, **kw)


@pytest.fixture(scope="module")
def whole(suite_dir, tmp_path_factory):
  """One uninterrupted 6-step run: the reference every resume must equal."""
  workdir = str(tmp_path_factory.mktemp("whole"))
  train.run(_config(suite_dir), workdir)
  return workdir


@pytest.fixture(scope="module")
def at_four(suite_dir, tmp_path_factory):
  """The same run stopped after step 4 (checkpoints at 2 and 4)."""
  workdir = str(tmp_path_factory.mktemp("at_four"))
  train.run(_config(suite_dir), workdir, stop_after=4)
  return workdir


def _copy(src, tmp_path, name="w"):
  dst = str(tmp_path / name)
  shutil.copytree(src, dst)
  return dst


def _assert_same_run(a, b):
  la, lb = _losses(a), _losses(b)
  assert sorted(la) == sorted(lb) == [1, 2, 3, 4, 5, 6]
  for s in la:
    np.testing.assert_allclose(la[s], lb[s], rtol=1e-6, err_msg=f"step {s}")


# Divergence: nothing non-finite is saved, metrics stay JSON.


def test_divergence_saves_nothing_bad_and_names_the_last_good_step(
  suite_dir, tmp_path
):
  # The reported repro: a huge lr, a checkpoint every 5 steps, log every 1.
  config = _config(suite_dir, total_steps=12, checkpoint_every=5, log_every=1)
  config.optimizer.lr = 1e6
  config.optimizer.warmup_steps = 0
  config.optimizer.schedule = "constant"
  workdir = str(tmp_path / "nan")
  with pytest.raises(train.NonFiniteLossError) as e:
    train.run(config, workdir)
  assert e.value.exit_code == errors.EXIT_NONFINITE
  msg = str(e.value)
  good = checkpoint.Checkpointer(workdir).latest_step()
  if good is None:
    assert "No checkpoint was saved" in msg and "step None" not in msg
  else:
    assert f"last good checkpoint is step {good}" in msg
    params = checkpoint.load_params(
      workdir, train.sharding.make_mesh(config.mesh)
    )
    for leaf in jax.tree.leaves(params):
      assert np.all(np.isfinite(leaf))
  _rows(workdir)  # strict JSON throughout


def test_a_non_finite_parameter_alone_stops_the_save(suite_dir, tmp_path):
  # Loss and grad norm finite, one parameter NaN after the update: caught by
  # the step's finite flag, not by the loss.
  from jft import steps

  tree = {"a": np.ones(3, np.float32), "b": np.array([1.0, np.nan])}
  assert not bool(steps.all_finite(tree))
  assert bool(steps.all_finite({"a": np.ones(3), "i": np.arange(3)}))
  assert not bool(steps.all_finite((np.float32(np.inf), tree["a"])))


def test_metric_writer_writes_null_for_non_finite(tmp_path):
  w = metrics.MetricWriter(str(tmp_path), tensorboard=False)
  w.write(1, {"eval/perplexity": float("inf"), "train/loss": float("nan")})
  w.write(2, {"train/loss": 1.5})
  rows = _rows(str(tmp_path))
  assert rows[0] == {"step": 1, "eval/perplexity": None, "train/loss": None}
  assert rows[1]["train/loss"] == 1.5


# Preemption: SIGTERM/SIGINT finish the step, save, exit 75.


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_the_step_and_resume_equals_uninterrupted(
  suite_dir, tmp_path, whole, monkeypatch, sig
):
  workdir = str(tmp_path / "pre")
  update = metrics.Progress.update

  def signal_at_three(self, step, out):
    update(self, step, out)
    if step == 3:
      os.kill(os.getpid(), sig)  # the handler runs in this (main) thread

  monkeypatch.setattr(metrics.Progress, "update", signal_at_three)
  before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
  with pytest.raises(errors.Preempted) as e:
    train.run(_config(suite_dir), workdir)
  assert e.value.step == 3 and e.value.exit_code == errors.EXIT_PREEMPTED
  assert checkpoint.Checkpointer(workdir).latest_step() == 3  # off-cadence
  # The handlers are restored once the run ends (to what they were: an
  # earlier test in this worker may have left SIGINT ignored).
  after = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
  assert after == before
  monkeypatch.setattr(metrics.Progress, "update", update)
  train.run(_config(suite_dir), workdir)
  _assert_same_run(whole, workdir)


def test_second_sigint_stops_at_once_a_second_sigterm_does_not():
  from jft import preempt

  before = signal.getsignal(signal.SIGINT)
  with preempt.Preemption(say=lambda *_: None) as p:
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)  # scheduler + launcher: one notice
    assert p.should_stop(1) and p.signame == "SIGTERM"
  with preempt.Preemption(say=lambda *_: None) as p:
    os.kill(os.getpid(), signal.SIGINT)
    assert p.should_stop(1) and p.signame == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)  # the handler runs before this returns
  assert signal.getsignal(signal.SIGINT) == before  # restored


def test_cli_sigterm_while_starting_up_still_saves_and_exits_75(
  suite_dir, tmp_path
):
  # A scheduler may preempt a job that is still loading: the signal is
  # remembered from main() on, and the run saves after its first step.
  args = [
    sys.executable,
    "-m",
    "jft.main",
    f"--config={ROOT}/configs/pretrain_clm.py",  # no --workdir: printed
    "--config.total_steps=400",
    "--config.checkpoint_every=1000",
    "--config.eval_every=0",
    "--config.batch_size=8",
    "--config.seq_len=32",
    "--config.model.d_model=32",
    "--config.model.mlp_dim=64",
    "--config.model.n_heads=2",
    "--config.model.n_kv_heads=1",
    f"--config.data.tokenizer={suite_dir / 'tok.model'}",
    f"--config.data.train_files={suite_dir / 'pretrain_train.jsonl'}",
  ]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.Popen(
    args,
    cwd=tmp_path,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    first = proc.stdout.readline()  # "workdir: runs/...", printed by main
    assert first.startswith("workdir: "), first + proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
  finally:
    proc.kill()
  assert proc.returncode == errors.EXIT_PREEMPTED, err[-3000:]
  assert "Traceback" not in err, err[-3000:]
  workdir = tmp_path / first.split(": ", 1)[1].strip()
  assert checkpoint.Checkpointer(str(workdir)).latest_step() == 1
  assert "saved a checkpoint at step 1 " in err + out


# Integrity: checksums verified, fallback to the previous good step.


def _largest_file(step_dir):
  files = [
    os.path.join(r, n)
    for r, _, ns in os.walk(step_dir)
    for n in ns
    if n != checkpoint.MANIFEST
  ]
  return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["overwrite", "truncate"])
def test_corrupt_latest_checkpoint_falls_back_and_says_so(
  suite_dir, tmp_path, whole, at_four, capsys, damage
):
  workdir = _copy(at_four, tmp_path)
  step4 = os.path.join(workdir, "checkpoints", "4")
  assert os.path.exists(os.path.join(step4, checkpoint.MANIFEST))
  victim = _largest_file(step4)
  size = os.path.getsize(victim)
  if damage == "overwrite":  # same size, different bytes: loads silently
    with open(victim, "r+b") as f:
      f.seek(size // 2)
      f.write(bytes(16))
  else:
    with open(victim, "r+b") as f:
      f.truncate(size // 2)
  capsys.readouterr()
  train.run(_config(suite_dir), workdir)
  out = capsys.readouterr().out
  assert "checkpoint step 4 is unusable" in out
  assert os.path.relpath(victim, step4) in out
  assert "falling back to step 2" in out
  assert "Resuming" in out and "at step 2" in out
  kept = os.listdir(os.path.join(workdir, checkpoint.QUARANTINE))
  assert len(kept) == 1 and kept[0].startswith("4-")  # kept, not deleted
  _assert_same_run(whole, workdir)


def test_no_good_checkpoint_is_one_clear_error(suite_dir, tmp_path, at_four):
  workdir = _copy(at_four, tmp_path)
  for step in ("2", "4"):
    with open(
      _largest_file(os.path.join(workdir, "checkpoints", step)), "ab"
    ) as f:
      f.write(b"garbage")
  with pytest.raises(errors.CheckpointError) as e:
    train.run(_config(suite_dir), workdir)
  assert "step 4" in str(e.value) and "step 2" in str(e.value)
  assert e.value.exit_code == errors.EXIT_CHECKPOINT


def test_init_from_a_corrupt_run_is_refused(tmp_path, at_four):
  workdir = _copy(at_four, tmp_path)
  with open(
    _largest_file(os.path.join(workdir, "checkpoints", "4")), "ab"
  ) as f:
    f.write(b"x")
  mesh = train.sharding.make_mesh(_config_mesh())
  with pytest.raises(errors.CheckpointError, match="step 4.*checksum"):
    checkpoint.load_params(workdir, mesh)


def _config_mesh():
  from jft import config as base

  return base.base_config().mesh


# One run per workdir.


def test_second_run_on_a_workdir_fails_at_once_naming_the_holder(
  suite_dir, tmp_path
):
  workdir = str(tmp_path / "busy")
  os.makedirs(workdir)
  with runlock.WorkdirLock(workdir):
    with pytest.raises(runlock.WorkdirBusy, match=f"pid {os.getpid()}"):
      train.run(_config(suite_dir), workdir)
  assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
  dead = subprocess.run(
    [sys.executable, "-c", "import os; print(os.getpid())"],
    capture_output=True,
    text=True,
  ).stdout.strip()
  lock = tmp_path / runlock.LOCK_FILE
  lock.write_text(json.dumps({"pid": int(dead), "host": "h", "argv": "x"}))
  said = []
  with runlock.WorkdirLock(str(tmp_path), say=said.append):
    assert json.loads(lock.read_text())["pid"] == os.getpid()
  assert said and f"pid {dead}" in said[0] and "stale" in said[0]
  # Released cleanly: the next taker has nothing to report.
  said.clear()
  with runlock.WorkdirLock(str(tmp_path), say=said.append):
    pass
  assert not said


# Resume checks the config.


def test_resume_refuses_a_changed_config_naming_old_and_new(
  suite_dir, tmp_path, at_four
):
  workdir = _copy(at_four, tmp_path)
  saved = open(os.path.join(workdir, "config.json")).read()
  changed = _config(suite_dir)
  changed.optimizer.lr = 0.5
  changed.seed = 7
  changed.objective = "mlm"
  changed.model.d_model = 64  # a shape change: caught before any restore
  with pytest.raises(errors.ConfigError) as e:
    train.run(changed, workdir)
  msg = str(e.value)
  for key, old, new in [
    ("optimizer.lr", "0.001", "0.5"),
    ("seed", "0", "7"),
    ("objective", "'clm'", "'mlm'"),
    ("model.d_model", "32", "64"),
  ]:
    assert f"{key}: {old} -> {new}" in msg, msg
  assert "allow_config_change=" in msg
  assert open(os.path.join(workdir, "config.json")).read() == saved


def test_resume_accepts_listed_and_allowed_changes(
  suite_dir, tmp_path, at_four
):
  workdir = _copy(at_four, tmp_path)
  config = _config(suite_dir, total_steps=5, log_every=2)  # may change
  config.optimizer.lr = 2e-3
  config.allow_config_change = "optimizer.lr"
  train.run(config, workdir)
  assert checkpoint.Checkpointer(workdir).latest_step() == 5
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert saved["optimizer"]["lr"] == 2e-3


def test_config_changes_table():
  old = {"a": 1, "optimizer": {"lr": 1.0}, "total_steps": 5, "mesh": {"f": 1}}
  new = {"a": 2, "optimizer": {"lr": 1.0}, "total_steps": 9, "mesh": {"f": 2}}
  assert resume.changes(old, new) == [("a", 1, 2)]
  assert resume.changes(old, new, ["a"]) == []
  assert resume.changes({"x": 1}, {}) == [("x", 1, "<absent>")]


def test_a_key_newer_than_the_saved_config_may_keep_its_default():
  """A workdir saved by a jft without `dpo.pack_pairs` resumes when the
  key has its default (what the older code did), not with another value."""
  saved = {"seed": 0, "dpo": {"beta": 0.1}}
  same = {"seed": 0, "dpo": {"beta": 0.1, "pack_pairs": False}}
  assert resume.changes(saved, same) == []
  other = {"seed": 0, "dpo": {"beta": 0.1, "pack_pairs": True}}
  assert resume.changes(saved, other) == [("dpo.pack_pairs", "<absent>", True)]
  assert resume.changes({"seed": 0}, {"seed": 0, "made_up": 1}) == [
    ("made_up", "<absent>", 1)
  ]


# Unwritable folders.


def _as_nobody(fn):
  """fn() in a forked child running as user `nobody` (root writes anywhere,
  so a permission test must drop it); returns what fn returned (a str)."""
  r, w = os.pipe()
  pid = os.fork()
  if pid == 0:  # child: no exec, no threads needed
    try:
      os.close(r)
      if os.geteuid() == 0:
        os.setgid(65534)
        os.setuid(65534)
      os.write(w, str(fn()).encode())
    finally:
      os._exit(0)
  os.close(w)
  with os.fdopen(r) as f:
    out = f.read()
  os.waitpid(pid, 0)
  return out


def test_unwritable_checkpoints_dir_is_a_clear_error(tmp_path):
  import pathlib
  import tempfile

  d = pathlib.Path(tempfile.mkdtemp(dir="/tmp"))  # traversable by anyone
  os.chmod(d, 0o755)
  (d / "checkpoints").mkdir()
  os.chmod(d / "checkpoints", 0o555)
  try:
    out = _as_nobody(lambda: checkpoint.is_writable(str(d / "checkpoints")))
  finally:
    shutil.rmtree(d)
  assert "cannot write there" in out and "Permission denied" in out, out
  assert checkpoint.is_writable(str(tmp_path / "fine")) is None


# Soak: random kill -9 / SIGTERM, some mid-save; bit-identical result.


def test_short_soak_equals_the_uninterrupted_run(tmp_path):
  import importlib.util

  spec = importlib.util.spec_from_file_location(
    "bench_soak", os.path.join(ROOT, "bench", "soak.py")
  )
  soak = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(soak)
  said = []
  problems = soak.soak(str(tmp_path), 30, 3, seed=1, say=said.append)
  assert problems == [], "\n".join(said)
  log = "\n".join(said)
  assert "kill -9" in log and "during a checkpoint write" in log
  assert "exited 75" in log
  # The comparison can fail: one changed digit is reported.
  path = tmp_path / "soak" / "metrics.jsonl"
  lines = path.read_text().splitlines()
  row = json.loads(lines[5])
  row["train/loss"] += 1e-7
  lines[5] = json.dumps(row)
  path.write_text("\n".join(lines) + "\n")
  assert any(
    "step" in p for p in soak.compare(str(tmp_path / "ref"), str(path.parent))
  )
