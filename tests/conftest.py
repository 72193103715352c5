"""Test setup: 8 fake CPU devices, so sharding code runs as on a pod."""

import os

from jaxlib import version as _jaxlib_version  # noqa: E402 (no backend yet)

_FLAGS = ["--xla_force_host_platform_device_count=8"]
if tuple(int(p) for p in _jaxlib_version.__version__.split(".")[:2]) >= (0, 9):
  # XLA:CPU aborts the process when one of the 8 fake devices reaches a
  # collective more than ~40 s after the others; on a loaded 2-core CI
  # machine that happens (a SIGABRT mid-suite). A slow test beats a dead run.
  _FLAGS += [
    "--xla_cpu_collective_call_warn_stuck_timeout_seconds=300",
    "--xla_cpu_collective_call_terminate_timeout_seconds=1800",
    "--xla_cpu_collective_timeout_seconds=1800",
  ]
os.environ["XLA_FLAGS"] = " ".join(
  [os.environ.get("XLA_FLAGS", "")] + _FLAGS
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _compilation_cache_dir() -> str:
  """One persistent XLA compilation cache for the whole test session: the
  xdist workers and every subprocess a test launches inherit it through
  the environment, so a tiny model's step compiled by one test is loaded,
  not compiled again, by the next that builds the same program (about a
  third of the suite's time on 2 cores). New per session (named after the
  process that set it, which deletes it at the end), so nothing from
  another checkout or run is loaded."""
  import tempfile

  return os.path.join(
    tempfile.gettempdir(), f"jft-test-xla-cache-{os.getpid()}"
  )


if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _compilation_cache_dir()
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.3"
  os.environ["JFT_TEST_XLA_CACHE_OWNER"] = str(os.getpid())

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def suite_dir(tmp_path_factory):
  """A small built-in task suite + tokenizer, shared by the whole session."""
  from jft.data import tasks
  from jft.data.tokenizer import train_tokenizer

  d = tmp_path_factory.mktemp("suite")
  paths = tasks.write_suite(str(d), n_train=300, n_eval=20, seed=0)
  texts = []
  with open(paths["pretrain_train"]) as f:
    import json

    texts = [json.loads(line)["text"] for line in f]
  train_tokenizer(texts, output_path=str(d / "tok.model"), vocab_size=512)
  return d


def tiny_config(suite_dir, objective="clm", config_file=None, **overrides):
  """Base config (or `config_file`'s) shrunk for tests: tiny model, few
  steps, the shared suite's data, no earlier stages."""
  from jft import config as base
  from jft import init

  if config_file:
    c = init.load_config_file(config_file)
    objective = c.objective
    c.init = ""
  else:
    c = base.base_config()
  c.objective = objective
  c.model.preset = "tiny"
  c.model.d_model = 32
  c.model.mlp_dim = 64
  c.model.n_heads = 2
  c.model.n_kv_heads = 1
  c.total_steps = 6
  c.batch_size = 8
  c.eval_batch_size = 8
  c.seq_len = 32
  c.log_every = 1
  c.eval_every = 3
  c.checkpoint_every = 3
  c.optimizer.warmup_steps = 2
  c.data.tokenizer = str(suite_dir / "tok.model")
  kind = {"clm": "pretrain", "sft": "sft", "dpo": "pref"}.get(
    objective, "pretrain"
  )
  c.data.train_files = str(suite_dir / f"{kind}_train.jsonl")
  c.data.eval_files = str(suite_dir / f"{kind}_eval.jsonl")
  return set_keys(c, overrides)


def set_keys(c, overrides):
  """Sets dotted keys ('optimizer.lr': 1e-3) on a ConfigDict; returns it."""
  for k, v in overrides.items():
    node = c
    *head, last = k.split(".")
    for h in head:
      node = node[h]
    node[last] = v
  return c


def pytest_sessionfinish(session):
  """The process that made the session's cache (the xdist controller, or
  the one pytest process) deletes it."""
  if os.environ.get("JFT_TEST_XLA_CACHE_OWNER") == str(os.getpid()):
    import shutil

    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
