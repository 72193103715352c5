"""Runs one jft job as N processes on this machine, as a pod would.

Every process runs the same command plus `--coordinator_address=127.0.0.1:
PORT --num_processes=N --process_id=i`; each sees K fake CPU devices
(`--xla_force_host_platform_device_count=K`), and CPU collectives across the
processes go over gloo on the loopback interface. It is how the multi-host
code path (jax.distributed, per-process data, process-0-only outputs, orbax
multi-process checkpoints) is tested without a cluster:

  python launch/local.py --num_processes=2 --devices_per_process=4 -- \\
    --config=configs/pretrain_clm.py --workdir=runs/mp

Everything after `--` goes to `python -m jft.main` (`--module` picks another
module with the same distributed flags). Child output is prefixed `[pI]`.
If a process fails, the others are stopped (they would wait forever in a
collective) and the launcher exits with the first failing process's code;
on `--timeout` every process is killed and the exit code is 124.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

TIMEOUT_EXIT = 124


def free_port() -> int:
  """A TCP port on 127.0.0.1 that was free a moment ago."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_env(base: dict, devices: int, platform: str = "cpu") -> dict:
  """Environment of one child: K fake devices, gloo CPU collectives."""
  env = dict(base)
  flags = [
    f
    for f in env.get("XLA_FLAGS", "").split()
    if not f.startswith("--xla_force_host_platform_device_count")
  ]
  if platform == "cpu":
    flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
  env["XLA_FLAGS"] = " ".join(flags)
  env["JAX_PLATFORMS"] = platform
  env["PYTHONUNBUFFERED"] = "1"
  return env


def commands(
  args: argparse.Namespace, port: int, python: str = sys.executable
) -> list[list[str]]:
  """One argv per process."""
  return [
    [
      python,
      "-m",
      args.module,
      *args.job_args,
      f"--coordinator_address=127.0.0.1:{port}",
      f"--num_processes={args.num_processes}",
      f"--process_id={i}",
    ]
    for i in range(args.num_processes)
  ]


def _pump(stream, prefix: str, out) -> None:
  for line in iter(stream.readline, ""):
    out.write(f"{prefix}{line}")
    out.flush()
  stream.close()


def _stop(procs, sig=signal.SIGTERM) -> None:
  """Signals each still-running child's process group (children only)."""
  for p in procs:
    if p.poll() is None:
      try:
        os.killpg(p.pid, sig)
      except ProcessLookupError:
        pass


def run(cmds, env: dict, timeout: float, grace: float = 10.0, out=None) -> int:
  """Starts `cmds`, streams their output, returns the exit code (see doc)."""
  out = out or sys.stdout
  procs, pumps = [], []
  for i, cmd in enumerate(cmds):
    p = subprocess.Popen(
      cmd,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      start_new_session=True,  # own process group: stoppable as a unit
    )
    t = threading.Thread(target=_pump, args=(p.stdout, f"[p{i}] ", out))
    t.start()
    procs.append(p)
    pumps.append(t)
  deadline = time.monotonic() + timeout
  failed, code, timed_out = None, 0, False
  try:
    while any(p.poll() is None for p in procs):
      if failed is None:
        for i, p in enumerate(procs):
          if p.returncode not in (None, 0):
            failed, code = time.monotonic(), p.returncode
            out.write(f"[launch] process {i} exited with {code}; stopping\n")
            _stop(procs)
            break
      elif time.monotonic() > failed + grace:
        _stop(procs, signal.SIGKILL)
      if not timed_out and time.monotonic() > deadline:
        out.write(f"[launch] timeout after {timeout:.0f}s; killing all\n")
        _stop(procs, signal.SIGKILL)
        code, timed_out = TIMEOUT_EXIT, True
        failed = failed or time.monotonic()
      time.sleep(0.1)
  except KeyboardInterrupt:
    _stop(procs, signal.SIGKILL)
    raise
  finally:
    for p in procs:
      p.wait()
    for t in pumps:
      t.join()
  if failed is None:  # all ended on their own: the first nonzero code
    code = next((p.returncode for p in procs if p.returncode), 0)
  return code


def parse(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("--num_processes", "-n", type=int, default=2)
  parser.add_argument(
    "--devices_per_process",
    type=int,
    default=4,
    help="fake CPU devices per process (--platform=cpu)",
  )
  parser.add_argument("--platform", default="cpu", help="JAX_PLATFORMS value")
  parser.add_argument("--module", default="jft.main")
  parser.add_argument("--port", type=int, default=0, help="0 = a free port")
  parser.add_argument("--timeout", type=float, default=3600.0, help="seconds")
  parser.add_argument(
    "--dry_run", action="store_true", help="print the commands, run nothing"
  )
  parser.add_argument("job_args", nargs=argparse.REMAINDER)
  args = parser.parse_args(argv)
  if args.job_args[:1] == ["--"]:
    args.job_args = args.job_args[1:]
  if args.num_processes < 1:
    parser.error("--num_processes must be >= 1")
  return args


def main(argv: list[str] | None = None) -> int:
  args = parse(sys.argv[1:] if argv is None else argv)
  port = args.port or free_port()
  cmds = commands(args, port)
  env = child_env(os.environ, args.devices_per_process, args.platform)
  if args.dry_run:
    shown = ("XLA_FLAGS", "JAX_PLATFORMS", "JAX_CPU_COLLECTIVES_IMPLEMENTATION")
    prefix = " ".join(f"{k}={shlex.quote(env[k])}" for k in shown if k in env)
    for cmd in cmds:
      print(f"{prefix} {shlex.join(cmd)}")
    return 0
  return run(cmds, env, args.timeout)


if __name__ == "__main__":
  sys.exit(main())
