"""`launch/local.py` failure, signal and pipe handling, with tiny children.

No jax and no training: the children are `python -c` one-liners or a small
module (CHILD) started through the launcher's command line. Each test takes
a second or two; a hang fails on a subprocess timeout instead of blocking,
and every test kills what it started.
"""

import importlib.util
import io
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL = os.path.join(ROOT, "launch", "local.py")
PY = sys.executable


def _load():
  spec = importlib.util.spec_from_file_location("launch_local", LOCAL)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


local = _load()

# Started as `python -m child ARGS --coordinator_address=.. --process_id=I`.
# Writes its pid to DIR/pidI at once, to DIR/readyI once its handlers are
# in place, to DIR/sigS-I when signal S arrives (then exits 75 in mode
# "save" and carries on in mode "ignore");
# mode "spam" prints 10 MB and exits 0 (DIR/doneI); otherwise it sleeps.
CHILD = """
import os, signal, sys, time
opts = dict(a[2:].split("=", 1) for a in sys.argv[1:] if "=" in a)
mode, d, i = opts["mode"], opts["dir"], opts["process_id"]

def mark(name):
  with open(os.path.join(d, name + i), "w") as f:
    f.write(str(os.getpid()))

mark("pid")

def on_signal(sig, frame):
  mark(f"sig{sig}-")
  try:
    print(f"got {sig}", flush=True)
  except OSError:
    pass
  if mode == "save":
    sys.exit(75)

if mode in ("save", "ignore"):
  signal.signal(signal.SIGTERM, on_signal)
  signal.signal(signal.SIGINT, on_signal)
if mode == "spam":
  for _ in range(100_000):
    print("x" * 99)
  mark("done")
  sys.exit(0)
mark("ready")
time.sleep(60)
"""


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False
  except OSError:  # no /proc: ask the kernel
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return False
    return True


def _wait_for(pred, timeout=15.0):
  until = time.monotonic() + timeout
  while not pred():
    if time.monotonic() > until:
      return False
    time.sleep(0.02)
  return True


class Launch:
  """`python launch/local.py --module=child` in a temporary directory."""

  def __init__(self, tmp_path):
    self.dir = tmp_path
    (tmp_path / "child.py").write_text(CHILD)
    self.procs, self.files = [], []

  def start(self, mode, *flags, n=2, **popen):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
      p for p in (str(self.dir), env.get("PYTHONPATH")) if p
    )
    cmd = [PY, LOCAL, f"--num_processes={n}", "--module=child", *flags]
    cmd += ["--", f"--mode={mode}", f"--dir={self.dir}"]
    if "stdout" not in popen:
      popen["stdout"] = open(self.dir / "out.txt", "w")
      self.files.append(popen["stdout"])
    popen.setdefault("stderr", subprocess.STDOUT)
    p = subprocess.Popen(cmd, env=env, **popen)
    self.procs.append(p)
    return p

  def marks(self, name, n=2):
    return [self.dir / f"{name}{i}" for i in range(n)]

  def ready(self, n=2):
    assert _wait_for(lambda: all(m.exists() for m in self.marks("ready", n)))

  def child_pids(self):
    pids = []
    for m in self.dir.iterdir():
      if m.name.startswith(("pid", "ready", "sig", "done")):
        try:
          pids.append(int(m.read_text()))
        except ValueError:  # being written
          pass
    return set(pids)

  def output(self):
    return (self.dir / "out.txt").read_text()

  def cleanup(self):
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    for f in self.files:
      f.close()
    for pid in self.child_pids():
      try:  # only our own children (pids can be reused)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
          if str(self.dir).encode() not in f.read():
            continue
        os.killpg(pid, signal.SIGKILL)
      except OSError:
        pass


@pytest.fixture
def launch(tmp_path):
  lx = Launch(tmp_path)
  try:
    yield lx
  finally:
    lx.cleanup()


def _no_children_left(lx):
  assert _wait_for(lambda: not any(map(_alive, lx.child_pids())), 10)


# ------------------------------------------------------- run() directly


def test_failure_of_a_later_process_stops_the_others_at_once():
  """(a) Process 1 fails while process 0 sleeps: exit 3, no waiting."""
  out = io.StringIO()
  start = time.monotonic()
  code = local.run(
    [
      [PY, "-c", "import time; time.sleep(30)"],
      [PY, "-c", "import sys, time; time.sleep(0.5); sys.exit(3)"],
    ],
    dict(os.environ),
    timeout=60,
    out=out,
  )
  elapsed = time.monotonic() - start
  text = out.getvalue()
  assert code == 3, text
  assert elapsed < 10, elapsed  # not the sleep, nor a heartbeat timeout
  assert "[launch] process 1 exited with 3" in text
  assert "process 1 failed; stopping the others" in text
  assert "process 0 was killed by SIGTERM" in text


def test_children_ignoring_sigterm_are_killed_after_stop_grace(tmp_path):
  """(c) After a failure, SIGTERM, then SIGKILL after `stop_grace`."""
  ready = tmp_path / "ready"
  stubborn = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    f"open({str(ready)!r}, 'w').close(); time.sleep(30)"
  )
  fail = (
    "import os, sys, time\n"
    f"while not os.path.exists({str(ready)!r}): time.sleep(0.02)\n"
    "sys.exit(3)"
  )
  out = io.StringIO()
  start = time.monotonic()
  code = local.run(
    [[PY, "-c", stubborn], [PY, "-c", fail]],
    dict(os.environ),
    timeout=60,
    out=out,
    stop_grace=1,
  )
  elapsed = time.monotonic() - start
  text = out.getvalue()
  assert code == 3, text
  assert 1 <= elapsed < 10, elapsed
  assert "process 0 was killed by SIGKILL" in text
  assert "still running after the grace period" in text


def test_first_failure_by_time_wins_and_output_is_prefixed():
  out = io.StringIO()
  code = local.run(
    [
      [PY, "-c", "import sys, time; time.sleep(2); sys.exit(5)"],
      [PY, "-c", "import sys; print('bye'); sys.exit(4)"],
    ],
    dict(os.environ),
    timeout=60,
    out=out,
  )
  assert code == 4, out.getvalue()  # process 1 failed first
  assert "[p1] bye\n" in out.getvalue()


# ------------------------------------------- the launcher's command line


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_is_forwarded_and_preempted_code_returned(launch, sig):
  """(b) SIGTERM/SIGINT to the launcher reach every child; exit 75."""
  p = launch.start("save", "--grace=20")
  launch.ready()
  p.send_signal(sig)
  assert p.wait(timeout=20) == local.PREEMPTED_EXIT == 75, launch.output()
  assert all(m.exists() for m in launch.marks(f"sig{int(sig)}-"))
  text = launch.output()
  assert f"[p0] got {int(sig)}" in text and f"[p1] got {int(sig)}" in text
  assert f"got {sig.name}: forwarded" in text
  _no_children_left(launch)


def test_children_that_ignore_a_forwarded_signal_are_killed(launch):
  """(c) Children keep running after the signal: SIGKILL after --grace."""
  p = launch.start("ignore", "--grace=1")
  launch.ready()
  start = time.monotonic()
  p.send_signal(signal.SIGTERM)
  assert p.wait(timeout=20) == 128 + signal.SIGKILL, launch.output()
  assert time.monotonic() - start < 10
  assert all(m.exists() for m in launch.marks("sig15-"))  # they got it
  assert "was killed by SIGKILL" in launch.output()
  _no_children_left(launch)


def test_second_signal_kills_at_once(launch):
  p = launch.start("ignore", "--grace=60")
  launch.ready()
  p.send_signal(signal.SIGINT)
  assert _wait_for(lambda: all(m.exists() for m in launch.marks("sig2-")))
  start = time.monotonic()
  p.send_signal(signal.SIGTERM)
  assert p.wait(timeout=20) == 128 + signal.SIGKILL, launch.output()
  assert time.monotonic() - start < 10  # not the 60 s grace
  assert "got SIGTERM again: killing all" in launch.output()
  _no_children_left(launch)


def test_closed_stdout_blocks_nobody(launch):
  """(d) `launcher | head -c 1` while the children print 10 MB each."""
  p = launch.start("spam", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  head = subprocess.Popen(
    ["head", "-c", "1"], stdin=p.stdout, stdout=subprocess.DEVNULL
  )
  launch.procs.append(head)
  p.stdout.close()  # head alone reads it now, one byte, then exits
  try:
    _, err = p.communicate(timeout=60)
  finally:
    head.wait(timeout=10)
  assert p.returncode == 0, err
  assert b"Traceback" not in err and b"Exception ignored" not in err, err
  assert all(m.exists() for m in launch.marks("done"))  # printed everything
  _no_children_left(launch)


def test_timeout_kills_everything_and_exits_124(launch):
  """(e) --timeout: every child is killed, exit 124."""
  p = launch.start("sleep", "--timeout=1")
  assert p.wait(timeout=20) == local.TIMEOUT_EXIT == 124, launch.output()
  assert "timeout after 1s; killing all" in launch.output()
  _no_children_left(launch)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl")
def test_children_get_sigterm_when_the_launcher_is_killed(launch):
  p = launch.start("save")
  launch.ready()
  p.kill()  # SIGKILL: no handler runs in the launcher
  p.wait(timeout=10)
  sigterm = launch.marks("sig15-")
  assert _wait_for(lambda: all(m.exists() for m in sigterm), 10)
  _no_children_left(launch)
