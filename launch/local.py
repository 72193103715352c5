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

Exit code (the launcher's, for scripts and schedulers):
  0    every process exited 0.
  N    the first failing process's code (first by time of detection; a
       process killed by signal S counts as 128+S). As soon as one process
       fails, the others get SIGTERM (they would wait forever in a
       collective) and SIGKILL after `--stop_grace` seconds (default 10).
  75   preempted: SIGTERM or SIGINT reached the launcher, it forwarded the
       same signal to every process, and they saved a checkpoint and exited
       75 (jft.errors.EXIT_PREEMPTED; rerun the same command to resume).
       After a forwarded signal the launcher exits with the processes' code
       (the first non-zero one if they differ; 0 if they all exited 0).
  124  `--timeout` seconds passed: every process is killed.

Signals: the first SIGTERM/SIGINT to the launcher is forwarded, as the same
signal, to each process's process group (each child runs in its own
session); the launcher then waits up to `--grace` seconds (default 120, a
checkpoint save takes time) and SIGKILLs what is left. A second SIGTERM/
SIGINT kills all processes at once. If the launcher itself dies, even by
SIGKILL, each child gets SIGTERM from the kernel (Linux: PR_SET_PDEATHSIG),
so none is left running. Output never blocks a child: if the launcher's own
stdout goes away (`| head`, a closed terminal), it keeps reading and
discarding the children's output.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

TIMEOUT_EXIT = 124
PREEMPTED_EXIT = 75  # = jft.errors.EXIT_PREEMPTED (not imported: no jax here)
PR_SET_PDEATHSIG = 1  # linux/prctl.h
JOIN_OUTPUT_S = 10.0  # after the last exit: how long to wait for its output


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


class _Output:
  """Thread-safe line writer that goes quiet once its stream fails.

  A closed pipe (`| head`) or closed stream must not stop the pumps: they
  keep reading the children's output and drop it, so no child ever blocks
  on a full pipe.
  """

  def __init__(self, stream):
    self.stream = stream
    self.lock = threading.Lock()
    self.broken = False

  def write(self, text: str) -> None:
    with self.lock:
      if self.broken:
        return
      try:
        self.stream.write(text)
        self.stream.flush()
      except (OSError, ValueError):  # BrokenPipeError; a closed stream
        self.broken = True


def _pump(stream, prefix: str, out: _Output) -> None:
  """Copies a child's output to `out`, line by line, until its EOF."""
  try:
    for line in iter(stream.readline, ""):
      out.write(
        f"{prefix}{line}" if line.endswith("\n") else f"{prefix}{line}\n"
      )
  finally:
    stream.close()


def _parent_death_signal():
  """A `preexec_fn`: the child gets SIGTERM when the launcher dies (Linux).

  None elsewhere or without libc's prctl. Resolved here, before the fork,
  so that the child only makes the call.
  """
  if not sys.platform.startswith("linux"):
    return None
  try:
    prctl = ctypes.CDLL(None, use_errno=True).prctl
  except (OSError, AttributeError):
    return None
  parent, sigterm = os.getpid(), int(signal.SIGTERM)

  def preexec() -> None:
    prctl(PR_SET_PDEATHSIG, sigterm)
    if os.getppid() != parent:  # the launcher died before prctl
      os.kill(os.getpid(), sigterm)

  return preexec


def _signal(procs, indices, sig) -> None:
  """Sends `sig` to the process group of each child in `indices`."""
  for i in indices:
    try:
      os.killpg(procs[i].pid, sig)
    except (ProcessLookupError, PermissionError):
      pass


def _exit_code(returncode: int) -> int:
  """A child's return code as a shell reports it (killed by S: 128+S)."""
  return 128 - returncode if returncode < 0 else returncode


def _describe(returncode: int) -> str:
  if returncode >= 0:
    return f"exited with {returncode}"
  try:
    name = signal.Signals(-returncode).name
  except ValueError:
    name = f"signal {-returncode}"
  return f"was killed by {name}"


def _signame(sig: int) -> str:
  try:
    return signal.Signals(sig).name
  except ValueError:
    return f"signal {sig}"


def run(
  cmds,
  env: dict,
  timeout: float,
  grace: float = 120.0,
  out=None,
  stop_grace: float = 10.0,
) -> int:
  """Starts `cmds`, streams their output, returns the exit code (see doc).

  `grace`: seconds the children get to save and exit after a SIGTERM/SIGINT
  forwarded from the launcher; `stop_grace`: after one of them failed and
  the others were sent SIGTERM. Then SIGKILL. Signal handlers are installed
  only when called from the main thread.
  """
  out = _Output(out or sys.stdout)
  received: list[int] = []
  previous = {}
  if threading.current_thread() is threading.main_thread():
    for sig in (signal.SIGTERM, signal.SIGINT):
      previous[sig] = signal.signal(sig, lambda s, _f: received.append(s))
  procs, pumps = [], []
  try:
    preexec = _parent_death_signal()
    for cmd in cmds:  # all started before any thread (preexec_fn + threads)
      procs.append(
        subprocess.Popen(
          cmd,
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
          errors="replace",  # odd bytes must not kill the pump
          start_new_session=True,  # own process group: stoppable as a unit
          preexec_fn=preexec,
        )
      )
    for i, p in enumerate(procs):
      t = threading.Thread(
        target=_pump, args=(p.stdout, f"[p{i}] ", out), daemon=True
      )
      t.start()
      pumps.append(t)
    return _watch(procs, received, timeout, grace, stop_grace, out)
  finally:
    _signal(
      procs,
      [i for i, p in enumerate(procs) if p.poll() is None],
      signal.SIGKILL,
    )
    for p in procs:
      p.wait()
    until = time.monotonic() + JOIN_OUTPUT_S
    for i, t in enumerate(pumps):
      t.join(max(0.0, until - time.monotonic()))
      if t.is_alive():  # a leftover grandchild holds the pipe open
        out.write(f"[launch] output of process {i} still open; not waiting\n")
    for sig, handler in previous.items():
      signal.signal(sig, handler)


def _watch(procs, received, timeout, grace, stop_grace, out) -> int:
  """Polls every child until all have exited; returns the exit code."""
  deadline = time.monotonic() + timeout
  code = None  # fixed by the first event: a non-zero exit or the timeout
  done, asked = set(), set()  # exited; sent their one SIGTERM/SIGINT
  kill_at, killed, timed_out, handled = None, False, False, 0
  while True:
    now = time.monotonic()
    failed = None
    for i, p in enumerate(procs):  # every child, every time: no any()
      if i in done or p.poll() is None:
        continue
      done.add(i)
      if p.returncode != 0:
        out.write(f"[launch] process {i} {_describe(p.returncode)}\n")
        if code is None:
          code, failed = _exit_code(p.returncode), i
    running = [i for i in range(len(procs)) if i not in done]
    if failed is not None and running and not received and not timed_out:
      out.write(f"[launch] process {failed} failed; stopping the others\n")
      polite = [i for i in running if i not in asked]
      _signal(procs, polite, signal.SIGTERM)
      asked.update(polite)
      kill_at = now + stop_grace
    while handled < len(received):
      sig = received[handled]
      handled += 1
      if handled == 1:
        out.write(
          f"[launch] got {_signame(sig)}: forwarded; waiting up to "
          f"{grace:g}s for the processes to save and exit\n"
        )
        polite = [i for i in running if i not in asked]
        _signal(procs, polite, sig)
        asked.update(polite)
        kill_at = min(kill_at or float("inf"), now + grace)
      elif not killed and running:
        out.write(f"[launch] got {_signame(sig)} again: killing all\n")
        _signal(procs, running, signal.SIGKILL)
        killed = True
    if not running:
      return code or 0
    if kill_at is not None and now >= kill_at and not killed:
      out.write(
        f"[launch] processes {running} still running after the grace "
        "period; killing them\n"
      )
      _signal(procs, running, signal.SIGKILL)
      killed = True
    if not timed_out and now >= deadline:
      out.write(f"[launch] timeout after {timeout:g}s; killing all\n")
      _signal(procs, running, signal.SIGKILL)
      killed = timed_out = True
      code = TIMEOUT_EXIT if code is None else code
    time.sleep(0.05)


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
    "--grace",
    type=float,
    default=120.0,
    help="seconds the processes get to save a checkpoint and exit after a "
    "SIGTERM/SIGINT forwarded from the launcher, before SIGKILL",
  )
  parser.add_argument(
    "--stop_grace",
    type=float,
    default=10.0,
    help="seconds the other processes get after one failed, before SIGKILL",
  )
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
  code = run(cmds, env, args.timeout, args.grace, stop_grace=args.stop_grace)
  try:
    sys.stdout.flush()
  except OSError:  # stdout went away (`| head`): no traceback at exit
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
  except ValueError:  # closed
    pass
  return code


if __name__ == "__main__":
  sys.exit(main())
