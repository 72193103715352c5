"""What every command-line entry point does with the error a run ends with.

A `jft.errors.UserError` (a bad flag, config key or value, a missing file, a
bad data row) prints one line, `error: MESSAGE`, on stderr and exits with
its code (2; see jft/errors.py); `errors.Preempted` prints its message and
exits 75. Anything else is a bug: its traceback is printed and the exit code
is 1. `--verbose` (or `JFT_VERBOSE=1`) prints the traceback of a user error
too.

    if __name__ == "__main__":
      cli.run_main(main)                       # argparse entry points
      cli.run_absl(main)                       # absl ones (jft.main)

`run_absl` parses absl flags with `parse_flags`, which turns what absl and
`ml_collections.config_flags` raise for a bad `--config...` flag into one
line naming the flag: an unknown key (with the closest keys of the loaded
config), a value of the wrong type, a config file that does not load.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence
from typing import NoReturn

from jft import errors

VERBOSE_ENV = "JFT_VERBOSE"


def verbose_requested(argv: Sequence[str] | None = None) -> bool:
  """`--verbose` (absl or argparse spelling; the last one wins) in `argv`
  (default `sys.argv[1:]`), or `JFT_VERBOSE` set to anything but 0/false.

  Read from the raw arguments, so it holds even when flag parsing fails.
  """
  env = os.environ.get(VERBOSE_ENV, "").strip().lower()
  on = env not in ("", "0", "false", "no", "off")
  for arg in sys.argv[1:] if argv is None else argv:
    if arg == "--":
      break
    name, eq, value = arg.lstrip("-").partition("=")
    if not arg.startswith("-"):
      continue
    if name == "verbose":
      on = not eq or value.strip().lower() in ("1", "true", "t", "yes")
    elif name == "noverbose":
      on = False
  return on


def report(exc: BaseException, *, verbose: bool = False, file=None) -> int:
  """Prints how `exc` ended the run (see the module docstring) on `file`
  (default stderr) and returns the exit code it means."""
  file = sys.stderr if file is None else file
  if isinstance(exc, SystemExit):
    code = exc.code
    if code is None or isinstance(code, int):
      return code or 0
    print(code, file=file)
    return errors.EXIT_INTERNAL
  expected = isinstance(exc, errors.UserError | errors.Preempted)
  if verbose or not expected:
    traceback.print_exception(exc, file=file)
  if expected:
    prefix = "error: " if isinstance(exc, errors.UserError) else ""
    print(f"{prefix}{exc}", file=file)
  file.flush()
  return errors.exit_code(exc)


def run_main(
  fn: Callable[[], object], argv: Sequence[str] | None = None
) -> NoReturn:
  """Exits with `fn()`'s return value (None = 0), or as `report` says for
  the exception it raised. `argv` is where to look for `--verbose`."""
  try:
    result = fn()
  except Exception as exc:
    sys.stdout.flush()
    sys.exit(report(exc, verbose=verbose_requested(argv)))
  sys.exit(result)


def run_absl(main: Callable, argv: Sequence[str] | None = None) -> NoReturn:
  """`absl.app.run(main)` with flags parsed by `parse_flags` and errors
  reported by `run_main`; an `app.UsageError` is a user error."""
  from absl import app

  def guarded(args):
    try:
      return main(args)
    except app.UsageError as e:  # app.run would print the whole usage
      raise errors.UserError(str(e)) from e

  argv = list(sys.argv if argv is None else argv)
  run_main(
    lambda: app.run(guarded, argv=argv, flags_parser=parse_flags), argv[1:]
  )


# ------------------------------------------------------------ config keys


def key_paths(config, prefix: str = "") -> list[str]:
  """Every dotted key of a ConfigDict, nested dicts and their keys alike:
  ['objective', ..., 'optimizer', 'optimizer.lr', ...]."""
  out = []
  for k, v in config.items():
    path = f"{prefix}{k}"
    out.append(path)
    if hasattr(v, "items") and callable(v.items):
      out.extend(key_paths(v, path + "."))
  return out


def _initials(name: str) -> str:
  parts = [p for p in name.split("_") if p]
  return "".join(p[0] for p in parts) if len(parts) > 1 else ""


def _abbreviates(a: str, b: str) -> bool:
  """'learning_rate' ~ 'lr' (either way round)."""
  return a == _initials(b) or b == _initials(a)


def did_you_mean(key: str, keys: Iterable[str], n: int = 3) -> list[str]:
  """The keys of `keys` a mistyped dotted `key` most likely meant.

  In order, the first group that is not empty: a sibling it abbreviates or
  spells out ('optimizer.learning_rate' -> 'optimizer.lr'); keys elsewhere
  with the same last name, or abbreviating it ('lr' -> 'optimizer.lr');
  siblings spelled alike ('lora.rnak' -> 'lora.rank'); any key spelled
  alike ('optimiser.lr' -> 'optimizer.lr').
  """
  keys = [k for k in dict.fromkeys(keys) if k != key]
  parent, _, name = key.rpartition(".")
  split = {k: k.rpartition(".") for k in keys}
  siblings = {s[2]: k for k, s in split.items() if s[0] == parent}
  groups = (
    [siblings[s] for s in siblings if _abbreviates(name, s)],
    [k for k, s in split.items() if s[2] == name or _abbreviates(name, s[2])],
    [siblings[s] for s in difflib.get_close_matches(name, siblings, n, 0.6)],
    difflib.get_close_matches(key, keys, n, 0.6),
  )
  for group in groups:
    if group:
      return group[:n]
  return []


def _quoted_choice(options: Sequence[str]) -> str:
  quoted = [repr(o) for o in options]
  if len(quoted) == 1:
    return quoted[0]
  return ", ".join(quoted[:-1]) + " or " + quoted[-1]


def unknown_key_message(flag: str, key: str, keys: Iterable[str]) -> str:
  """`--config.X: no such config key 'X'; did you mean 'Y'?`."""
  msg = f"--{flag}.{key}: no such config key {key!r}"
  near = did_you_mean(key, keys)
  if near:
    return f"{msg}; did you mean {_quoted_choice(near)}?"
  return f"{msg} (every key is listed in jft/config.py)"


# ------------------------------------------------------------ absl flags


def _config_flags(flag_values) -> list:
  from ml_collections.config_flags import config_flags

  seen = {}
  for flag in flag_values._flags().values():  # absl has no public API
    if config_flags.is_config_flag(flag):
      seen.setdefault(flag.name, flag)
  return list(seen.values())


def _flag_value(argv: Sequence[str], name: str) -> str | None:
  """The value `argv` gives `--name` (`--name=V` or `--name V`), if any."""
  value = None
  for i, arg in enumerate(argv):
    if arg == "--":
      break
    m = re.fullmatch(rf"--?{re.escape(name)}(=(.*))?", arg, re.DOTALL)
    if m:
      if m.group(1) is not None:
        value = m.group(2)
      elif i + 1 < len(argv):
        value = argv[i + 1]
  return value


def _override_keys(argv: Sequence[str], name: str) -> list[str]:
  """Keys of the `--name.KEY[=V]` (or `--noname.KEY`) overrides in argv."""
  out = []
  for arg in argv:
    if arg == "--":
      break
    m = re.match(rf"--?(?:no)?{re.escape(name)}\.([^=]+)", arg)
    if m:
      out.append(m.group(1))
  return list(dict.fromkeys(out))


def _load_error(config) -> BaseException | None:
  """The error of a config file that did not load (config_flags defers it
  to the first use of the config), or None for a loaded config."""
  if type(config).__name__ != "_ErrorConfig":
    return None
  return object.__getattribute__(config, "_error")


def _missing_file_message(name: str, spec: str, error) -> str:
  path = spec.split(":", 1)[0]
  if not path:
    return f"--{name}: give a config file, e.g. --{name}=configs/sft.py"
  if not os.path.exists(path):
    msg = f"--{name}={spec}: no such config file {path!r}"
    folder = os.path.dirname(path) or "."
    if os.path.isdir(folder):
      near = difflib.get_close_matches(
        os.path.basename(path),
        [f for f in os.listdir(folder) if f.endswith(".py")],
        3,
        0.7,
      )
      if near:
        near = [os.path.join(os.path.dirname(path), f) for f in near]
        msg += f"; did you mean {_quoted_choice(near)}?"
    return msg
  last = str(error).strip().splitlines()[-1].strip() if error else ""
  return f"--{name}={spec}: cannot load the config file ({last})"


def _check_config_files(argv: Sequence[str], flag_values) -> None:
  """A UserError for a config flag whose file does not load."""
  for flag in _config_flags(flag_values):
    spec = _flag_value(argv, flag.name)
    if spec is None:
      continue
    config = flag.value if flag.present else None
    if config is None:  # parsing stopped before the flag took its value
      try:
        config = flag.parser.parse(spec)
      except (TypeError, ValueError):
        continue  # get_config raised: parsing reports that itself
    error = _load_error(config)
    if error is not None:
      raise errors.UserError(_missing_file_message(flag.name, spec, error))
    if config is None:
      raise errors.UserError(
        f"--{flag.name}={spec}: its get_config() returned None"
      )


def _unknown_keys(argv: Sequence[str], flag_values) -> str | None:
  """One line per `--config.KEY` override whose KEY the loaded config lacks
  (with the closest keys), or None when every key exists."""
  lines = []
  for flag in _config_flags(flag_values):
    spec = _flag_value(argv, flag.name)
    try:
      if spec is None:
        config = flag.value
      else:
        config = flag.parser.parse(spec)
    except (TypeError, ValueError):
      continue
    if config is None or _load_error(config) is not None:
      continue
    keys = key_paths(config)
    for key in _override_keys(argv, flag.name):
      if re.sub(r"\[[^\]]*\]", "", key) not in keys:
        lines.append(unknown_key_message(flag.name, key, keys))
  if len(lines) > 1:
    return f"{len(lines)} unknown config keys:\n  " + "\n  ".join(lines)
  return lines[0] if lines else None


def _user_error_in_chain(exc: BaseException) -> errors.UserError | None:
  """The first UserError raised in `exc`'s chain (config_flags re-raises a
  config file's error as one of the same type with a traceback inside)."""
  found, seen = None, set()
  while exc is not None and id(exc) not in seen:
    if isinstance(exc, errors.UserError):
      found = exc
    seen.add(id(exc))
    exc = exc.__cause__ or exc.__context__
  return found


def _root_error(exc: BaseException) -> BaseException:
  seen = set()
  while id(exc) not in seen:
    seen.add(id(exc))
    nxt = exc.__cause__ or exc.__context__
    if nxt is None:
      break
    exc = nxt
  return exc


def _flag_error_message(exc, flag_values) -> str:
  """absl's 'flag --NAME=VALUE: reason' said for a person."""
  text = str(exc)
  m = re.fullmatch(r"flag --([^=\s]+)=(.*?): (.*)", text, re.DOTALL)
  if not m:
    return text
  name, value, reason = m.groups()
  if "must have a value other than None" in reason:
    return f"--{name} is required"
  config_names = {f.name for f in _config_flags(flag_values)}
  head = name.split(".", 1)[0]
  if head in config_names and "." in name:
    kind = ""
    try:
      kind = flag_values[name].flag_type()
    except (KeyError, AttributeError):
      pass
    key = name.split(".", 1)[1]
    want = ""
    if kind == "bool":
      reason = "true or false"
    if kind:
      want = f" takes {'an' if kind[0] in 'aeiou' else 'a'} {kind}"
    return f"--{name}={value}: config.{key}{want} ({reason})"
  return f"--{name}={value}: {reason}"


def parse_flags(argv: Sequence[str], flag_values=None) -> list[str]:
  """`flag_values(argv)` (default absl's FLAGS), with every error a user can
  make on the command line raised as one-line `errors.UserError`/
  `ConfigError`: unknown flags, unknown `--config.KEY`s (naming the closest
  keys), values of the wrong type, config files that do not load. Usable as
  `app.run(main, flags_parser=parse_flags)`.
  """
  from absl import flags

  flag_values = flags.FLAGS if flag_values is None else flag_values
  argv = list(argv)
  try:
    rest = flag_values(argv)
  except (flags.Error, AttributeError, KeyError, OSError) as exc:
    user = _user_error_in_chain(exc)
    if user is not None:  # e.g. a ConfigError from a config's get_config
      raise user from None
    if "Error whilst parsing config file" in str(exc):
      root = _root_error(exc)  # a bug in the config file: its traceback
      raise root.with_traceback(root.__traceback__) from None
    _check_config_files(argv[1:], flag_values)
    unknown = _unknown_keys(argv[1:], flag_values)
    if unknown:
      raise errors.ConfigError(unknown) from exc
    if isinstance(exc, flags.Error):
      raise errors.UserError(_flag_error_message(exc, flag_values)) from exc
    raise
  _check_config_files(argv[1:], flag_values)
  return rest
