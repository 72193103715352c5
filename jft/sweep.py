"""Grid sweeps: every point of a grid is its own `python -m jft.main` run.

  python -m jft.sweep --config=configs/lora.py \\
    --grid=optimizer.lr=1e-4,3e-4,1e-3 --grid=lora.rank=4,8,16 \\
    [--config.KEY=VALUE ...] [--parallel=N] [--workdir=DIR]

Each `--grid=KEY=V1,V2,...` is one axis; the points are their cartesian
product (the first axis varies slowest). Point `lr=1e-4,rank=8` runs

  python -m jft.main --config=CONFIG --workdir=DIR/lr=1e-4,rank=8 \\
    [--config.KEY=VALUE ...] --config.optimizer.lr=1e-4 --config.lora.rank=8

with its output in DIR/NAME/run.log (a point is named by the last part of
each key, the whole key where two would clash, and the values as typed).
Points run one after another, or `--parallel=N` at once. Without
`--workdir`, DIR is runs/sweep-CONFIG-YYYYmmdd-HHMMSS (printed).

Checked before anything runs: every grid key exists (with the closest keys
when not, as for `--config.KEY`), is not also a `--config.KEY` flag and
names a value, not a group; every value parses as `--config.KEY=VALUE`
would (the same types); every point's config passes `jft.validate`. Values
are split at commas, so a value cannot hold one.

Resumable: rerun the same command. A point that finished with the same
command (DIR/NAME/point.json) is skipped; any other point runs again, and
`jft.main` resumes its workdir from the latest checkpoint (a run that had
finished says so and exits 0, e.g. after `--config.total_steps` grew it
trains on). Points that train the same uncached `run:` stage never start
together: the first trains it, the others then reuse it.

Outputs in DIR, rewritten as each point ends: results.csv (one row per
point: its values, status, exit code, last step, wall time over all
attempts, final train/loss, final and best value of every eval/ metric) and
results.md (the headline columns); at the end, curves.png (every point's
curves overlaid, `jft.plot.curves`) and against_KEY.png per axis (final
metrics against that key, a line per value of the other keys,
`jft.plot.against`). Each point also writes its own DIR/NAME/curves.png.
With `--config.wandb.enabled=True` the points' W&B runs are named after the
points and grouped by DIR's name (unless `wandb.group` is given).

Exit code: 0 every point finished; 1 a point failed (results.csv has its
exit code; the other points still ran); 2 a bad flag, key or value (nothing
ran); 75 interrupted: the first SIGTERM/SIGINT is passed on as SIGTERM to
the running points, which save a checkpoint and stop (a second one stops
them at once); rerun the same command to resume.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from absl import flags
from ml_collections import config_flags

from jft import cli, errors, init, plot, results
from jft.validate import violations

POINT_FILE = "point.json"
LOG_FILE = "run.log"
PROG = "python -m jft.sweep"
EXIT_FAILED = 1
_say = functools.partial(print, flush=True)  # progress lines, unbuffered


def define_flags(flag_values=flags.FLAGS, argv=None) -> None:
  """The sweep's flags, for the command line `argv` (default sys.argv;
  config_flags reads it for the `--config.KEY` flags). Only `__main__`
  defines them in absl's global FLAGS: jft.main defines flags of the same
  names there."""
  config_flags.DEFINE_config_file(
    "config",
    None,
    "Experiment config file, as for jft.main.",
    flag_values=flag_values,
    lock_config=True,
    sys_argv=argv,
  )
  flags.DEFINE_multi_string(
    "grid",
    [],
    "KEY=V1,V2,...: one axis of the grid (repeat for more axes).",
    flag_values=flag_values,
  )
  flags.DEFINE_integer(
    "parallel", 1, "Points run at once.", lower_bound=1, flag_values=flag_values
  )
  flags.DEFINE_string(
    "workdir", None, "The sweep's directory.", flag_values=flag_values
  )
  flags.DEFINE_bool(
    "verbose",
    False,
    "Tracebacks with user errors (passed on to every point).",
    flag_values=flag_values,
  )


# ------------------------------------------------------------ the grid


@dataclasses.dataclass(frozen=True)
class Axis:
  key: str  # dotted config key
  raws: tuple[str, ...]  # its values, as typed
  spec: str  # the --grid flag's value


def parse_grid(specs: Sequence[str]) -> list[Axis]:
  """`['optimizer.lr=1e-4,3e-4', ...]` -> axes; bad specs are UserErrors."""
  axes = []
  for spec in specs:
    key, eq, values = spec.partition("=")
    key = key.strip()
    if not eq or not key:
      raise errors.UserError(
        f"--grid={spec}: give KEY=V1,V2,... (e.g. --grid=optimizer.lr=1e-4,"
        "3e-4)"
      )
    raws = tuple(v.strip() for v in values.split(","))
    repeated = sorted({v for v in raws if raws.count(v) > 1})
    if repeated:
      raise errors.UserError(f"--grid={spec}: {repeated[0]!r} is repeated")
    if any(a.key == key for a in axes):
      raise errors.UserError(f"--grid={spec}: {key} has two --grid flags")
    axes.append(Axis(key, raws, spec))
  return axes


def check_keys(axes: Sequence[Axis], config, overridden: Sequence[str]):
  """Raises one ConfigError naming every grid key that `config` lacks
  (with the closest keys), names a group, or a --config flag also sets."""
  keys = cli.key_paths(config)
  lines = []
  for axis in axes:
    if axis.key not in keys:
      msg = f"--grid={axis.spec}: no such config key {axis.key!r}"
      near = cli.did_you_mean(axis.key, keys)
      if near:
        msg += "; did you mean " + " or ".join(repr(k) for k in near) + "?"
      lines.append(msg)
    elif hasattr(init.get_key(config, axis.key), "items"):
      lines.append(
        f"--grid={axis.spec}: config.{axis.key} is a group of keys; grid "
        "one of its keys"
      )
    elif axis.key in overridden:
      lines.append(
        f"--grid={axis.spec}: --config.{axis.key} is given too; drop one"
      )
  if len(lines) > 1:
    raise errors.ConfigError(
      f"{len(lines)} bad grid keys:\n  " + "\n  ".join(lines)
    )
  if lines:
    raise errors.ConfigError(lines[0])


def _safe(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9._+=,-]", "_", text)


def short_names(keys: Sequence[str]) -> dict[str, str]:
  """Each key's last part, or the whole key where last parts clash."""
  last = [k.rpartition(".")[2] for k in keys]
  return {
    k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)
  }


def point_values(axes: Sequence[Axis]) -> list[dict[str, str]]:
  """The cartesian product as {key: raw value}, first axis slowest."""
  return [
    dict(zip([a.key for a in axes], combo, strict=True))
    for combo in itertools.product(*(a.raws for a in axes))
  ]


def point_name(raws: Mapping[str, str]) -> str:
  """`lr=1e-4,rank=8`: a directory name (characters other than letters,
  digits and `._+=,-` become `_`)."""
  short = short_names(list(raws))
  return _safe(",".join(f"{short[k]}={v}" for k, v in raws.items()))


# ------------------------------------------------------------ configs


def passthrough(argv: Sequence[str], flag_values) -> list[str]:
  """The `--config.KEY[=VALUE]` / `--noconfig.KEY` arguments of `argv`, as
  given (a `--config.KEY VALUE` pair stays a pair), for every point."""
  out, i = [], 0
  while i < len(argv):
    arg = argv[i]
    if arg == "--":
      break
    m = re.match(r"--?(no)?config\.([^=]+)(=.*)?$", arg, re.DOTALL)
    if m:
      out.append(arg)
      name = f"config.{m.group(2)}"
      two = not m.group(1) and m.group(3) is None
      if two and name in flag_values and i + 1 < len(argv):
        if flag_values[name].flag_type() != "bool":
          out.append(argv[i + 1])
          i += 1
    i += 1
  return out


def override_keys(args: Sequence[str]) -> list[str]:
  keys = []
  for arg in args:
    m = re.match(r"--?(?:no)?config\.([^=]+)", arg)
    if m:
      keys.append(m.group(1))
  return keys


def load_config(spec: str, args: Sequence[str]):
  """The config `--config=spec args...` gives, parsed as jft.main parses
  it (`cli.parse_flags`: the same types and one-line errors)."""
  argv = [PROG, f"--config={spec}", *args]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file(
    "config", None, "", flag_values=fv, lock_config=True, sys_argv=argv
  )
  cli.parse_flags(argv, fv)
  return fv.config


def _flag(key: str, raw: str) -> str:
  return f"--config.{key}={raw}"


def typed_values(
  spec: str, args: Sequence[str], axes: Sequence[Axis]
) -> dict[str, dict[str, Any]]:
  """{key: {raw: value}}: each grid value parsed as its --config flag would
  be; one ConfigError lists every value that does not parse."""
  out, bad = {}, []
  for axis in axes:
    out[axis.key] = {}
    for raw in axis.raws:
      try:
        config = load_config(spec, [*args, _flag(axis.key, raw)])
      except errors.UserError as e:
        bad.append(f"--grid={axis.spec}: value {raw!r}: {e}")
        continue
      out[axis.key][raw] = init.get_key(config, axis.key)
  if len(bad) > 1:
    raise errors.ConfigError(
      f"{len(bad)} bad grid values:\n  " + "\n  ".join(bad)
    )
  if bad:
    raise errors.ConfigError(bad[0])
  return out


@dataclasses.dataclass
class Point:
  name: str
  raws: dict[str, str]  # key -> value as typed on the command line
  values: dict[str, Any]  # key -> value as the config holds it
  workdir: str
  args: list[str]  # jft.main's arguments: what a finished point matches
  command: list[str]  # what runs: python -m jft.main ARGS
  stages: tuple[str, ...] = ()  # `run:` stage workdirs it trains or reads


@dataclasses.dataclass
class Plan:
  workdir: str
  axes: list[Axis]
  points: list[Point]
  parallel: int


def default_workdir(spec: str) -> str:
  name = os.path.splitext(os.path.basename(spec.split(":")[0]))[0]
  return os.path.join("runs", f"sweep-{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def plan(argv: Sequence[str], flag_values=None) -> Plan:
  """Parses the sweep's command line (`argv[0]` is the program) and checks
  every point's config; raises a UserError before anything runs."""
  argv = list(argv)
  if flag_values is None:
    flag_values = flags.FlagValues()
    define_flags(flag_values, argv)
  if not flag_values.is_parsed():
    cli.parse_flags(argv, flag_values)
  fv = flag_values
  if fv["config"].value is None:
    raise errors.UserError("--config is required")
  spec = fv["config"].config_filename
  axes = parse_grid(fv.grid)
  if not axes:
    raise errors.UserError(
      "give at least one --grid=KEY=V1,V2,... (e.g. --grid=optimizer.lr="
      "1e-4,3e-4)"
    )
  args = passthrough(argv[1:], fv)
  if fv.verbose:
    args.append("--verbose")
  overridden = override_keys(args)
  check_keys(axes, fv.config, overridden)
  typed = typed_values(spec, args, axes)
  workdir = fv.workdir or default_workdir(spec)
  grid_keys = {a.key for a in axes}
  if (
    fv.config.get("wandb", {}).get("enabled")
    and not fv.config.wandb.group
    and not {"wandb.group", "wandb.enabled"} & grid_keys
    and "wandb.group" not in overridden
  ):  # the points' W&B runs, grouped by sweep
    group = os.path.basename(os.path.abspath(workdir))
    args.append(_flag("wandb.group", group))
  points, bad, names = [], {}, set()  # bad: violation -> its points
  for raws in point_values(axes):
    name = point_name(raws)
    while name in names:  # values that differ only in odd characters
      name += "_"
    names.add(name)
    pdir = os.path.join(workdir, name)
    grid_args = [_flag(k, v) for k, v in raws.items()]
    config = load_config(spec, [*args, *grid_args])
    for v in violations(config):
      bad.setdefault(v, []).append(name)
    stages, _ = init.plan_stages(config)
    main_args = [f"--config={spec}", f"--workdir={pdir}", *args, *grid_args]
    points.append(
      Point(
        name=name,
        raws=dict(raws),
        values={k: typed[k][v] for k, v in raws.items()},
        workdir=pdir,
        args=main_args,
        command=[sys.executable, "-m", "jft.main", *main_args],
        stages=tuple(w for _, w, _ in stages),
      )
    )
  lines = [
    v if len(where) == len(points) else f"{', '.join(where)}: {v}"
    for v, where in bad.items()
  ]
  if len(lines) > 1:
    raise errors.ConfigError(
      f"{len(lines)} config values are invalid:\n  " + "\n  ".join(lines)
    )
  if lines:
    raise errors.ConfigError(lines[0])
  return Plan(workdir, axes, points, fv.parallel)


# ------------------------------------------------------------ results


@dataclasses.dataclass
class Record:
  """A point's outcome, kept in DIR/NAME/point.json between attempts."""

  status: str = "pending"  # pending | running | done | failed | interrupted
  exit_code: int | None = None
  wall_s: float = 0.0  # over every attempt
  attempts: int = 0
  args: list[str] = dataclasses.field(default_factory=list)

  @classmethod
  def load(cls, workdir: str) -> Record | None:
    path = os.path.join(workdir, POINT_FILE)
    try:
      with open(path) as f:
        d = json.load(f)
    except (OSError, ValueError):
      return None
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in fields})

  def save(self, workdir: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, POINT_FILE)
    with open(path + ".tmp", "w") as f:
      json.dump(dataclasses.asdict(self), f, indent=2)
    os.replace(path + ".tmp", path)


def result_rows(
  sweep: Plan, records: Mapping[str, Record]
) -> list[dict[str, Any]]:
  """One row per point for `results.write_tables`: name, grid values,
  status, exit code, last step, wall time, workdir, then
  `results.summarize`'s metrics."""
  rows = []
  for p in sweep.points:
    r = records.get(p.name) or Record()
    row = {"name": p.name, **p.values}
    row.update(
      status=r.status,
      exit_code=r.exit_code,
      wall_s=round(r.wall_s, 1) if r.attempts else None,
      workdir=p.workdir,
    )
    metrics = results.summarize(os.path.join(p.workdir, plot.METRICS_FILE))
    row["steps"] = metrics.pop("steps", None)
    row.update(metrics)
    rows.append(row)
  return rows


def write_results(sweep: Plan, rows: Sequence[Mapping]) -> tuple[str, str]:
  return results.write_tables(
    sweep.workdir,
    rows,
    [a.key for a in sweep.axes],
    shown={p.name: p.raws for p in sweep.points},
  )


# ------------------------------------------------------------ running


class _Signals:
  """While running: the first SIGTERM/SIGINT asks running points to save
  and stop (SIGTERM to each one's process group) and starts no new ones;
  a second is passed on as SIGINT, which stops them at once."""

  def __init__(self, running: Callable[[], Sequence[subprocess.Popen]], say):
    self.running, self.say, self.received = running, say, 0
    self._old = {}

  def __enter__(self) -> _Signals:
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._old[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, old in self._old.items():
      signal.signal(sig, old)

  def _handle(self, signum, frame) -> None:
    self.received += 1
    name = signal.Signals(signum).name
    if self.received == 1:
      self.say(
        f"{name}: running points save a checkpoint and stop; no new point "
        "starts (again to stop them at once; rerun the command to resume)"
      )
    forward = signal.SIGTERM if self.received == 1 else signal.SIGINT
    for proc in self.running():
      try:
        os.killpg(proc.pid, forward)
      except OSError:
        pass


def _die_with_parent() -> Callable[[], None] | None:
  """A `preexec_fn`: the point gets SIGTERM when the sweep dies, even by
  SIGKILL (Linux; None elsewhere). prctl is looked up before the fork, so
  the child only calls it (as launch/local.py does)."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    prctl = ctypes.CDLL(None, use_errno=True).prctl
  except (OSError, AttributeError):
    return None
  parent, sigterm = os.getpid(), int(signal.SIGTERM)

  def preexec() -> None:
    prctl(1, sigterm)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the sweep died before prctl
      os.kill(os.getpid(), sigterm)

  return preexec


def _last_error(log_path: str) -> str:
  """The log's last `error: ...` line, else its last non-empty line."""
  try:
    with open(log_path, errors="replace") as f:
      lines = [ln.strip() for ln in f.read()[-20000:].splitlines()]
  except OSError:
    return ""
  lines = [ln for ln in lines if ln]
  for ln in reversed(lines):
    if ln.startswith("error:"):
      return ln
  return lines[-1] if lines else ""


# A point killed by the signal the sweep passed on, before it could catch it.
_KILLED_BY_US = (128 + signal.SIGTERM, 128 + signal.SIGINT)


def _exit_code(rc: int) -> int:
  return rc if rc >= 0 else 128 - rc  # killed by signal S: 128 + S


def _headline(p: Point) -> str:
  m = results.summarize(os.path.join(p.workdir, plot.METRICS_FILE))
  keys = ("train/loss", *results.HEADLINE)
  shown = [f"{k} {m[k]:.4f}" for k in keys if k in m]
  return "  ".join(shown)


def _same_run(a: Sequence[str], b: Sequence[str]) -> bool:
  """Whether two jft.main argument lists train the same run."""
  return [x for x in a if x != "--verbose"] == [
    x for x in b if x != "--verbose"
  ]


def run_points(
  sweep: Plan,
  records: dict[str, Record],
  say: Callable = _say,
  on_change: Callable[[], None] = lambda: None,
  poll_s: float = 0.2,
) -> bool:
  """Runs the points `records` does not mark done with the same arguments,
  `sweep.parallel` at once, updating `records` (and point.json) as each
  ends and calling `on_change` then. Returns False if a signal stopped it.
  """
  n = len(sweep.points)
  index = {p.name: i + 1 for i, p in enumerate(sweep.points)}
  pending = []
  for p in sweep.points:
    r = records[p.name]
    if r.status == "done" and _same_run(r.args, p.args):
      say(f"[{index[p.name]}/{n}] {p.name}: finished earlier, skipped")
    else:
      pending.append(p)
  running: dict[subprocess.Popen, tuple[Point, float, Any]] = {}
  warm: set[str] = set()  # stage workdirs a finished point has made

  def startable(p: Point) -> bool:
    busy = {w for q, _, _ in running.values() for w in q.stages}
    return all(w in warm or w not in busy for w in p.stages)

  with _Signals(lambda: list(running), say) as signals:
    while (pending and not signals.received) or running:
      while pending and not signals.received and len(running) < sweep.parallel:
        p = next((q for q in pending if startable(q)), None)
        if p is None:
          break
        pending.remove(p)
        os.makedirs(p.workdir, exist_ok=True)
        log_path = os.path.join(p.workdir, LOG_FILE)
        log = open(log_path, "ab")
        log.write(f"\n$ {' '.join(p.command)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
          p.command,
          stdout=log,
          stderr=subprocess.STDOUT,
          stdin=subprocess.DEVNULL,
          env=dict(os.environ, PYTHONUNBUFFERED="1"),
          start_new_session=True,  # signals reach it from the sweep only
          preexec_fn=_die_with_parent(),
        )
        running[proc] = (p, time.time(), log)
        if signals.received:  # a signal came while it was starting
          os.killpg(proc.pid, signal.SIGTERM)
        r = records[p.name]
        r.status, r.args = "running", list(p.args)
        r.attempts += 1
        r.save(p.workdir)
        say(f"[{index[p.name]}/{n}] {p.name}: running (log: {log_path})")
      time.sleep(poll_s)
      for proc in [q for q in running if q.poll() is not None]:
        p, t0, log = running.pop(proc)
        log.close()
        code = _exit_code(proc.returncode)
        r = records[p.name]
        r.wall_s += time.time() - t0
        r.exit_code = code
        took = results.duration(r.wall_s)
        if code == 0:
          r.status = "done"
          warm.update(p.stages)
          say(f"[{index[p.name]}/{n}] {p.name}: done ({took})  {_headline(p)}")
        elif code == errors.EXIT_PREEMPTED or (
          signals.received and code in _KILLED_BY_US
        ):
          r.status = "interrupted"
          say(f"[{index[p.name]}/{n}] {p.name}: interrupted (exit {code})")
        else:
          r.status = "failed"
          why = _last_error(os.path.join(p.workdir, LOG_FILE))
          say(f"[{index[p.name]}/{n}] {p.name}: FAILED (exit {code}): {why}")
        r.save(p.workdir)
        on_change()
  return not signals.received


def run(argv: Sequence[str], flag_values=None, say: Callable = _say) -> int:
  """The whole sweep (see the module docstring); returns its exit code."""
  return execute(plan(argv, flag_values), say)


def execute(sweep: Plan, say: Callable = _say) -> int:
  """Runs a planned sweep, writes its results and plots; the exit code."""
  os.makedirs(sweep.workdir, exist_ok=True)
  shape = " x ".join(f"{len(a.raws)} {a.key}" for a in sweep.axes)
  say(f"sweep: {len(sweep.points)} points ({shape}) in {sweep.workdir}")
  records = {}
  for p in sweep.points:
    r = Record.load(p.workdir) or Record()
    if r.status == "running":  # the sweep that ran it died
      r.status = "interrupted"
    records[p.name] = r

  def update():
    write_results(sweep, result_rows(sweep, records))

  update()
  finished = run_points(sweep, records, say=say, on_change=update)
  rows = result_rows(sweep, records)
  csv_path, md_path = write_results(sweep, rows)
  plots = results.write_plots(
    sweep.workdir, rows, [a.key for a in sweep.axes], say=say
  )
  with open(md_path) as f:
    say(f.read().rstrip())
  say(f"results: {csv_path}, {md_path}")
  if plots:
    say("plots: " + ", ".join(plots))
  failed = [p.name for p in sweep.points if records[p.name].status == "failed"]
  if not finished:
    say("interrupted: rerun the same command to resume")
    return errors.EXIT_PREEMPTED
  if failed:
    say(
      f"{len(failed)} of {len(sweep.points)} points failed: {', '.join(failed)}"
    )
    return EXIT_FAILED
  return 0


def main(argv: Sequence[str]) -> int:
  del argv  # parsed by cli.run_absl; plan() reads the raw arguments
  return run(sys.argv, flags.FLAGS)


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["config"])
  cli.run_absl(main)
