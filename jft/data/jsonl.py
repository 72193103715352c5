"""JSONL reading with errors that point at the offending file and line.

Users bring data in the Hugging Face TRL conventions (`{"text"}`,
`{"prompt", "completion"}`, `{"prompt", "chosen", "rejected"}`, ...). A bad
record should stop the run before training with a message a user can act on,
so every error names the file and the 1-based line number.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence

_GLOB_CHARS = frozenset("*?[")


class DataError(ValueError):
  """A data file is missing or malformed; the message says where."""


class Record(dict):
  """A JSONL record that remembers `where` it came from ('path:line').

  Still a plain dict for every other purpose; objectives use `where` to name
  the file and line when a field's content is wrong.
  """

  where: str = "?"


def read_jsonl(path: str, required: Sequence[str] = ()) -> list[dict]:
  """Reads one JSONL file into a list of dicts; blank lines are skipped.

  Every field in `required` must be present and a non-empty string. Fields
  with other shapes (e.g. SFT `messages` lists) are the caller's to check.
  """
  if not os.path.isfile(path):
    raise DataError(f"{path}: file not found")
  records = []
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      where = f"{path}:{lineno}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise DataError(f"{where}: not valid UTF-8 ({e})") from None
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg})") from None
      if not isinstance(record, dict):
        kind = type(record).__name__
        raise DataError(f"{where}: expected a JSON object, got {kind}")
      for field in required:
        if field not in record:
          raise DataError(f"{where}: missing required field {field!r}")
        value = record[field]
        if not isinstance(value, str):
          kind = type(value).__name__
          raise DataError(
            f"{where}: field {field!r} must be a string, got {kind}"
          )
        if not value:
          raise DataError(f"{where}: field {field!r} is empty")
      record = Record(record)
      record.where = where
      records.append(record)
  if not records:
    raise DataError(f"{path}: no records (file is empty)")
  return records


def expand_paths(spec: str) -> list[str]:
  """Expands a comma-separated list of paths and globs, in the given order.

  Glob matches are sorted so every process sees the same file order. A glob
  matching nothing is an error: a silently empty dataset is worse.
  """
  parts = [p.strip() for p in spec.split(",") if p.strip()]
  if not parts:
    raise DataError(f"no data files given (spec={spec!r})")
  paths = []
  for part in parts:
    if _GLOB_CHARS & set(part):
      matches = sorted(glob.glob(os.path.expanduser(part)))
      if not matches:
        raise DataError(f"{part}: glob pattern matched no files")
      paths.extend(matches)
    else:
      paths.append(os.path.expanduser(part))
  return paths


def read_jsonl_files(spec: str, required: Sequence[str] = ()) -> list[dict]:
  """Reads and concatenates every file named by `spec` (see expand_paths)."""
  records = []
  for path in expand_paths(spec):
    records.extend(read_jsonl(path, required))
  return records
