"""Command-line entry: `python -m jft.main --config=configs/NAME.py[:ARG]`.

Flags: `--workdir=DIR` (default: a new folder under ./runs/, printed), and
`--config.KEY=VALUE` overrides; the config is locked, so a mistyped key (with
the closest keys) or a value of the wrong type fails with the key's name,
and `jft.validate` checks every value before anything runs.

A user error (bad flag, key, value, file or data row) prints one line,
`error: ...`, and exits 2; `--verbose` or `JFT_VERBOSE=1` adds the
traceback. Other exit codes are in jft/errors.py (see jft/cli.py).

Multi-process runs (one process per host, or several per machine with
`launch/local.py`) start JAX's distributed runtime first; see
`distributed_args` for how a run finds out it is one. They need an explicit
`--workdir` on storage every process sees (a default one would carry each
process's own timestamp). Only process 0 prints, logs at INFO and writes
metrics; every process reads its own shard of the data.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from jft import cli, errors, hostmem
from jft.validate import validate

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
flags.DEFINE_bool(
  "verbose",
  False,
  "On a user error, print the traceback as well as the message (or set "
  f"{cli.VERBOSE_ENV}=1).",
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0 (multi-process)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process.")
_DISTRIBUTED = flags.DEFINE_enum(
  "distributed",
  "auto",
  ["auto", "on", "off"],
  "auto: start jax.distributed when flags or the environment (SLURM, TPU "
  "pods, JAX_COORDINATOR_ADDRESS) say the run has several processes; on: "
  "always (JAX detects the cluster: Cloud TPU VMs, SLURM, Open MPI, ...); "
  "off: never.",
)


def default_workdir(config_path: str) -> str:
  name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
  return os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def _several(value: str | None) -> bool:
  return value is not None and value.strip().isdigit() and int(value) > 1


def distributed_args(
  mode: str,
  coordinator: str | None,
  num_processes: int | None,
  process_id: int | None,
  env: Mapping[str, str],
) -> dict | None:
  """Keyword args for `jax.distributed.initialize`, or None (one process).

  In order: explicit flags (all three, or none); `JAX_COORDINATOR_ADDRESS`
  with `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`; a SLURM job step with
  several tasks (`srun`, not the batch script itself); a TPU slice whose
  worker list (`TPU_WORKER_HOSTNAMES` / `TPU_PROCESS_ADDRESSES`) has several
  hosts, or a multislice job. `mode='on'` initialises with JAX's own
  detection (`{}`), e.g. on Cloud TPU VMs, whose worker list lives in the
  metadata server rather than the environment.
  """
  if mode == "off":
    return None
  given = (coordinator, num_processes, process_id)
  if any(v is not None for v in given):
    if any(v is None for v in given):
      raise app.UsageError(
        "--coordinator_address, --num_processes and --process_id go "
        f"together; got {given}"
      )
    if not 0 <= process_id < num_processes:
      raise app.UsageError(
        f"--process_id={process_id} is not in [0, {num_processes})"
      )
    return dict(
      coordinator_address=coordinator,
      num_processes=num_processes,
      process_id=process_id,
    )
  if env.get("JAX_COORDINATOR_ADDRESS") and _several(
    env.get("JAX_NUM_PROCESSES")
  ):
    return dict(
      coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
      num_processes=int(env["JAX_NUM_PROCESSES"]),
      process_id=int(env["JAX_PROCESS_ID"]),
    )
  if mode == "on":
    return {}
  if (
    "SLURM_JOB_ID" in env
    and "SLURM_STEP_NODELIST" in env  # inside `srun`, not the batch script
    and _several(env.get("SLURM_NTASKS"))
  ):
    return {}
  hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
  if (hosts and "," in hosts) or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return {}
  return None


def maybe_init_distributed() -> bool:
  """Starts JAX's distributed runtime for multi-process runs (see above).

  On CPU, cross-process collectives use gloo unless
  `JAX_CPU_COLLECTIVES_IMPLEMENTATION` says otherwise.
  """
  kwargs = distributed_args(
    _DISTRIBUTED.value,
    _COORDINATOR.value,
    _NUM_PROCESSES.value,
    _PROCESS_ID.value,
    os.environ,
  )
  if kwargs is None:
    return False
  if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  return True


def main(argv):
  del argv
  from jft import preempt

  preempt.catch_early()  # a SIGTERM while starting up stops at step one
  if not flags.FLAGS["verbosity"].present:  # orbax logs a lot at INFO
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  validate(config)  # before any stage trains or any device is touched
  hostmem.tune()  # before JAX creates its CPU client
  maybe_init_distributed()
  from jft import init, train  # after distributed init: may touch devices

  primary = jax.process_index() == 0
  if not primary and logging.get_verbosity() > logging.WARNING:
    logging.set_verbosity(logging.WARNING)  # INFO from process 0 only
  workdir = _WORKDIR.value
  if workdir is None:
    if jax.process_count() > 1:
      raise errors.UserError(
        f"--workdir is required with {jax.process_count()} processes (each "
        "would pick its own timestamped default); use a directory all "
        "processes share"
      )
    workdir = default_workdir(
      config_flags.get_config_filename(flags.FLAGS["config"])
    )
    print(f"workdir: {workdir}")
  if primary:
    logging.info("config:\n%s", config)
    if jax.process_count() > 1:
      print(
        f"{jax.process_count()} processes, {jax.device_count()} devices "
        f"({jax.local_device_count()} per process)"
      )

  def run():
    resolved = init.resolve_stages(
      config,
      train.run,
      announce=say,
      spec=config_flags.get_config_filename(flags.FLAGS["config"]),
      workdir=workdir,
    )
    train.run(resolved, workdir)

  say = print if primary else (lambda *_: None)
  if jax.process_count() == 1:
    run()
    return
  try:
    run()
  except BaseException as exc:
    # A failed process must exit now: JAX's graceful distributed shutdown
    # would wait for peers that are blocked in a collective with it, and
    # the launcher only sees failures of processes that exit.
    sys.stdout.flush()
    code = cli.report(exc, verbose=cli.verbose_requested())
    sys.stderr.flush()
    os._exit(code or errors.EXIT_INTERNAL)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  cli.run_absl(main)
