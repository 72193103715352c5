"""Command-line entry: `python -m jft.main --config=configs/NAME.py[:ARG]`.

Flags: `--workdir=DIR` (default: a new folder under ./runs/, printed), and
`--config.KEY=VALUE` overrides; the config is locked, so a mistyped key or a
value of the wrong type fails with the key's name.
"""

from __future__ import annotations

import os
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0 (multi-process)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process.")


def default_workdir(config_path: str) -> str:
  name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
  return os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def maybe_init_distributed() -> None:
  """Starts JAX's distributed runtime for multi-process runs.

  Explicit flags win; otherwise JAX auto-detects TPU pods and SLURM.
  """
  if _COORDINATOR.value:
    jax.distributed.initialize(
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
    )
  elif (
    "SLURM_JOB_ID" in os.environ
    and int(os.environ.get("SLURM_NTASKS", "1")) > 1
  ):
    jax.distributed.initialize()
  elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
    jax.distributed.initialize()


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # orbax logs a lot at INFO
    logging.set_verbosity(logging.WARNING)
  maybe_init_distributed()
  from jft import train  # after distributed init: it may touch devices

  config = _CONFIG.value
  workdir = _WORKDIR.value
  if workdir is None:
    workdir = default_workdir(
      config_flags.get_config_filename(flags.FLAGS["config"])
    )
    if jax.process_index() == 0:
      print(f"workdir: {workdir}")
  logging.info("config:\n%s", config)
  train.run(config, workdir)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
