"""The Weights & Biases writer: offline runs read back from W&B's own run
files, the resumed run id, the config rules, and nothing W&B-related
imported (or contacted) when it is off."""

import glob
import json
import os
import struct
import subprocess
import sys

import pytest

from jft import config as base
from jft import errors, metrics
from jft.validate import violations

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def offline(tmp_path, monkeypatch):
  """W&B offline with every file it writes under tmp_path."""
  pytest.importorskip("wandb")
  for var, sub in (
    ("WANDB_DIR", "wandb_dir"),
    ("WANDB_CONFIG_DIR", "wandb_config"),
    ("WANDB_CACHE_DIR", "wandb_cache"),
    ("WANDB_DATA_DIR", "wandb_data"),
  ):
    os.makedirs(tmp_path / sub, exist_ok=True)
    monkeypatch.setenv(var, str(tmp_path / sub))
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  monkeypatch.delenv("WANDB_API_KEY", raising=False)
  yield tmp_path
  import wandb

  wandb.teardown()  # stops W&B's service process


def _records(path):
  """The protobuf records of a W&B run file (`run-ID.wandb`): a LevelDB-
  style log of 32 KiB blocks, 7-byte header `:W&B` + magic + version, each
  record `crc32 | length | type` then data, split FIRST/MIDDLE/LAST across
  blocks (W&B's own format; the SDK no longer ships a Python reader)."""
  from wandb.proto import wandb_internal_pb2 as pb

  data = open(path, "rb").read()
  ident, magic, _ = struct.unpack("<4sHB", data[:7])
  assert (ident, magic) == (b":W&B", 0xBEE1)
  block, pos, chunks, out = 32768, 7, b"", []
  while pos + 7 <= len(data):
    if block - pos % block < 7:  # a block's tail too short for a header
      pos += block - pos % block
      continue
    _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
    pos += 7
    if kind == 0:  # zero padding to the end of the block
      pos += (block - pos % block) % block
      continue
    chunks = (
      data[pos : pos + length]
      if kind in (1, 2)
      else chunks + data[pos : pos + length]
    )
    pos += length
    if kind in (1, 4):  # FULL or LAST: a whole record
      record = pb.Record()
      record.ParseFromString(chunks)
      out.append(record)
  return out


def _run_files(folder):
  """The offline run files under FOLDER/wandb, once W&B has written them
  (its service writes them after `finish()` returns; teardown waits)."""
  import wandb

  wandb.teardown()
  return sorted(
    glob.glob(os.path.join(folder, "wandb", "offline-run-*", "*.wandb"))
  )


def _read_run(path):
  """(run record, config, history rows) from an offline run's file."""
  run, config, history = None, {}, []
  for r in _records(path):
    kind = r.WhichOneof("record_type")
    if kind == "run":
      run = r.run
      for item in r.run.config.update:
        config[item.key] = json.loads(item.value_json)
    elif kind == "config":
      for item in r.config.update:
        config[item.key] = json.loads(item.value_json)
    elif kind == "history":
      items = {
        item.key or "/".join(item.nested_key): json.loads(item.value_json)
        for item in r.history.item
      }
      history.append({k: v for k, v in items.items() if k[0] != "_"})
  return run, config, history


def _config(**wandb):
  c = base.base_config()
  c.wandb.update(dict(enabled=True, mode="offline", **wandb))
  return c


def test_offline_run_logs_config_and_metrics(offline):
  workdir = offline / "run"
  workdir.mkdir()
  c = _config(project="jft-test", name="tiny")
  resolved = dict(c.to_dict(), runtime={"process_count": 1})
  (workdir / "config.json").write_text(json.dumps(resolved, default=str))
  w = metrics.MetricWriter(str(workdir), tensorboard=False, config=c)
  w.write(0, {"params/trainable": 123, "eval/loss": 4.5})
  w.write(
    5, {"train/loss": 2.25, "train/lr": 1e-3, "train/grad_norm": float("nan")}
  )
  w.write(10, {"train/loss": 1.5, "eval/loss": float("inf")})
  w.close()

  (path,) = _run_files(workdir)
  run, config, history = _read_run(path)
  assert (run.project, run.display_name) == ("jft-test", "tiny")
  assert run.run_id == (workdir / metrics.WANDB_ID_FILE).read_text().strip()
  # The W&B config is the run's resolved config.json.
  assert config["optimizer"]["lr"] == c.optimizer.lr
  assert config["runtime"] == {"process_count": 1}
  assert config["wandb"]["project"] == "jft-test"
  # Each row with its step; a non-finite value is left out (null in jsonl).
  assert history == [
    {"step": 0, "params/trainable": 123, "eval/loss": 4.5},
    {"step": 5, "train/loss": 2.25, "train/lr": 1e-3},
    {"step": 10, "train/loss": 1.5},
  ]
  rows = [json.loads(ln) for ln in open(workdir / "metrics.jsonl")]
  assert rows[1]["train/grad_norm"] is None and rows[2]["eval/loss"] is None


def test_resumed_run_keeps_its_wandb_id_and_dir_option(offline):
  workdir, elsewhere = offline / "run", offline / "elsewhere"
  workdir.mkdir()
  for _ in range(2):  # a run, then its resume
    w = metrics.MetricWriter(
      str(workdir), tensorboard=False, config=_config(dir=str(elsewhere))
    )
    w.write(1, {"train/loss": 1.0})
    w.close()
  run_id = (workdir / metrics.WANDB_ID_FILE).read_text().strip()
  files = _run_files(elsewhere)  # wandb.dir, not the workdir
  assert len(files) == 2 and not _run_files(workdir)
  for path in files:
    run, _, history = _read_run(path)
    assert (run.run_id, run.display_name) == (run_id, "run")  # the workdir's
    assert history == [{"step": 1, "train/loss": 1.0}]


def test_wandb_rules_and_missing_package(monkeypatch, tmp_path):
  c = base.base_config()
  assert not [v for v in violations(c) if "wandb" in v]
  c.wandb.enabled, c.wandb.mode, c.wandb.project = True, "sometimes", " "
  bad = "\n".join(violations(c))
  assert "config.wandb.mode='sometimes': must be one of 'online'" in bad
  assert "config.wandb.project=' '" in bad
  monkeypatch.setattr(metrics, "wandb_installed", lambda: False)
  assert "config.wandb.enabled=True: must be False unless the wandb " in (
    "\n".join(violations(c))
  )
  monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails
  with pytest.raises(errors.UserError, match=r"pip install 'jft\[wandb\]'"):
    metrics.MetricWriter(str(tmp_path), tensorboard=False, config=_config())


def test_nothing_wandb_is_imported_when_disabled(tmp_path):
  """A run's config and writer with W&B off (the default): the wandb
  package is never imported, so it can contact nothing."""
  code = f"""
import sys
from jft import config, metrics, train, validate
c = config.base_config()
validate.validate(c)
w = metrics.MetricWriter({str(tmp_path)!r}, config=c)
w.write(0, {{"train/loss": 1.0}})
w.close()
loaded = sorted(m for m in sys.modules if m.split(".")[0].startswith("wandb"))
print("WANDB_MODULES", loaded)
"""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("WANDB_MODE", None)
  out = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=env,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert "WANDB_MODULES []" in out.stdout
  assert not os.path.exists(tmp_path / "wandb")
  assert not os.path.exists(tmp_path / metrics.WANDB_ID_FILE)
  assert os.path.exists(tmp_path / "metrics.jsonl")
