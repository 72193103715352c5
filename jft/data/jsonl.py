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
import re
from collections.abc import Iterator, Sequence
from typing import Any

from jft.errors import UserError

_GLOB_CHARS = frozenset("*?[")
_BOM = "\ufeff"
# A JSON escape of a UTF-16 surrogate; only lines with one need the check.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_TRUNCATED = " (the last line has no newline: is the file cut short?)"


class DataError(UserError, ValueError):
  """A data file is missing or malformed; the message says where."""


class Record(dict):
  """A JSONL record that remembers `where` it came from ('path:line').

  Still a plain dict for every other purpose; objectives use `where` to name
  the file and line when a field's content is wrong.
  """

  where: str = "?"


def decode_utf8(raw: bytes, where: str) -> str:
  """`raw` as UTF-8 text; a bad byte is a DataError naming `where`, not a
  bare UnicodeDecodeError traceback."""
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{where}: not valid UTF-8 ({e})") from None


def parse_json(text: str, where: str, hint: str = "") -> Any:
  """json.loads that fails only with a DataError naming `where`.

  Hostile input must not escape as another exception: deep nesting raises
  RecursionError, a huge integer ValueError. A leading BOM (Windows editors
  write one) is dropped. `hint` is appended to a parse error's message.
  """
  try:
    value = json.loads(text.removeprefix(_BOM))
  except json.JSONDecodeError as e:
    raise DataError(f"{where}: invalid JSON ({e.msg}){hint}") from None
  except RecursionError:
    raise DataError(f"{where}: invalid JSON (nested too deeply)") from None
  except ValueError as e:
    raise DataError(f"{where}: invalid JSON ({e})") from None
  if _SURROGATE_ESCAPE.search(text):
    _check_encodable(value, where)
  return value


def _check_encodable(value: Any, where: str) -> None:
  """Rejects strings with lone surrogates (`"\\ud800"`): JSON allows the
  escape, but encoding the text for a tokenizer would fail much later."""
  try:
    json.dumps(value, ensure_ascii=False).encode("utf-8")
  except (UnicodeEncodeError, RecursionError):
    raise DataError(
      f"{where}: a string holds a lone UTF-16 surrogate escape (\\ud800-"
      "\\udfff), which is not text"
    ) from None


def load_json_bytes(raw: bytes, where: str) -> Any:
  """The JSON value of a whole file's bytes `raw`; DataError naming `where`."""
  return parse_json(decode_utf8(raw, where), where)


def iter_lines(path: str) -> Iterator[tuple[str, str]]:
  """('path:line', text) of each non-blank line of `path`, with its newline.

  Reads bytes so a bad byte is reported with its line number; drops a BOM
  starting the file. An unreadable file is a DataError, not an OSError.
  """
  try:
    with open(path, "rb") as f:
      for lineno, raw in enumerate(f, start=1):
        where = f"{path}:{lineno}"
        line = decode_utf8(raw, where)
        if lineno == 1:
          line = line.removeprefix(_BOM)
        if line.strip():
          yield where, line
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def parse_object(line: str, where: str) -> dict:
  """One JSONL line as a dict; anything else is a DataError naming `where`.

  A parse error on a last line without a newline hints at a cut-off file.
  """
  hint = "" if line.endswith("\n") else _TRUNCATED
  record = parse_json(line, where, hint)
  if not isinstance(record, dict):
    kind = type(record).__name__
    raise DataError(f"{where}: expected a JSON object, got {kind}")
  return record


def check_required(record: dict, required: Sequence[str], where: str) -> None:
  """Each field in `required` must be present and a non-empty string."""
  for field in required:
    if field not in record:
      raise DataError(f"{where}: missing required field {field!r}")
    value = record[field]
    if not isinstance(value, str):
      kind = type(value).__name__
      raise DataError(f"{where}: field {field!r} must be a string, got {kind}")
    if not value:
      raise DataError(f"{where}: field {field!r} is empty")


def read_jsonl(path: str, required: Sequence[str] = ()) -> list[dict]:
  """Reads one JSONL file into a list of dicts; blank lines are skipped.

  Every field in `required` must be present and a non-empty string. Fields
  with other shapes (e.g. SFT `messages` lists) are the caller's to check.
  Any bad line is a DataError naming the file and line; none is dropped.
  """
  if not os.path.isfile(path):
    raise DataError(f"{path}: file not found")
  records = []
  for where, line in iter_lines(path):
    record = Record(parse_object(line, where))
    check_required(record, required, where)
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
