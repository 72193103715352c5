"""JSONL read lazily: an index of where each record starts, then one record
at a time, when the pipeline asks for it.

The eager reader (`jsonl.read_jsonl_files`) parses every record before
training starts. With `config.data.streaming` a run instead indexes its
files (a numpy scan of the bytes for line starts, about a second per GB;
16 bytes per record) and each process parses and tokenizes only the records
of its own shard, as training consumes them: a large corpus starts training
in seconds and host memory holds the index plus what is in flight.

Records are exactly the eager reader's: the same non-blank lines (a line of
ASCII whitespace is blank; a BOM starting a file is dropped), each a
`jsonl.Record` whose `where` is 'path:line', and a bad line is the same
DataError naming file and line. It is raised when the pipeline reaches that
line, not before training.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Sequence

import numpy as np

from jft.data.jsonl import (
  DataError,
  Record,
  check_required,
  decode_utf8,
  expand_paths,
  parse_object,
)

# Objectives whose `make_examples` takes each record on its own (no counts
# or pairing across the data set), so records can be made into examples one
# at a time.
OBJECTIVES = ("clm", "mlm")
_CHUNK = 1 << 22  # bytes scanned at a time: bounds the index's scratch
_READ = 1 << 16  # bytes read at a time when fetching one record
_BLANK = np.zeros(256, bool)  # ASCII whitespace, by byte value
_BLANK[[9, 10, 11, 12, 13, 32]] = True
_WHITESPACE = bytes([9, 10, 11, 12, 13, 32])
_BOM = b"\xef\xbb\xbf"


@dataclasses.dataclass(frozen=True)
class FileIndex:
  """Where the records of one file start."""

  path: str
  offsets: np.ndarray  # int64 byte offset of each non-blank line
  linenos: np.ndarray  # int64 1-based line number of each


def _block_lines(
  block: bytes, base: int, first_line: int
) -> tuple[np.ndarray, np.ndarray]:
  """(offsets, line numbers) of the non-blank lines in `block`, a run of
  whole lines starting at file offset `base` with line `first_line`."""
  arr = np.frombuffer(block, np.uint8)
  newlines = np.flatnonzero(arr == 10)
  starts = np.concatenate([[0], newlines + 1])
  ends = np.concatenate([newlines, [len(arr)]])
  if starts[-1] == len(arr):  # the block ends with a newline
    starts, ends = starts[:-1], ends[:-1]
  keep = ~_BLANK[arr[np.minimum(starts, len(arr) - 1)]]  # starts with text
  keep &= starts < ends
  for i in np.flatnonzero(~keep & (starts < ends)):  # starts with whitespace
    keep[i] = bool(block[starts[i] : ends[i]].strip(_WHITESPACE))
  lines = first_line + np.arange(len(starts), dtype=np.int64)
  return base + starts[keep].astype(np.int64), lines[keep]


def index_file(path: str, chunk: int = _CHUNK) -> FileIndex:
  """The non-blank lines of `path`, scanned `chunk` bytes at a time (a
  longer line is carried over until its newline)."""
  if not os.path.isfile(path):
    raise DataError(f"{path}: file not found")
  offsets, linenos = [], []
  try:
    with open(path, "rb") as f:
      base = len(_BOM) if f.read(len(_BOM)) == _BOM else 0
      f.seek(base)
      line, carry = 1, b""
      while True:
        data = f.read(chunk)
        buf = carry + data
        if not data:  # the end: what is left is a last line without newline
          cut = len(buf)
        else:
          cut = buf.rfind(b"\n") + 1
        if cut:
          o, n = _block_lines(buf[:cut], base, line)
          offsets.append(o)
          linenos.append(n)
          line += buf.count(b"\n", 0, cut)
          base += cut
        carry = buf[cut:]
        if not data:
          break
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
  return FileIndex(
    path,
    np.concatenate(offsets) if offsets else np.zeros(0, np.int64),
    np.concatenate(linenos) if linenos else np.zeros(0, np.int64),
  )


def _read_line(fd: int, offset: int) -> bytes:
  """The bytes of the line starting at `offset`, its newline included."""
  parts = []
  while True:
    data = os.pread(fd, _READ, offset)
    if not data:
      break
    end = data.find(b"\n")
    if end >= 0:
      parts.append(data[: end + 1])
      break
    parts.append(data)
    offset += len(data)
  return b"".join(parts)


class JsonlSource:
  """The records of the files `spec` names, in order, by index: a grain
  random-access data source (`len`, `source[i]`).

  Each process opens the files once (`os.pread`, so reader threads share
  the descriptors); a pickled copy (a worker process) opens its own.
  """

  def __init__(self, spec: str, required: Sequence[str] = ()):
    self.required = tuple(required)
    self.paths = expand_paths(spec)
    indexes = [index_file(p) for p in self.paths]
    for ix in indexes:
      if not len(ix.offsets):
        raise DataError(f"{ix.path}: no records (file is empty)")
    self._offsets = np.concatenate([ix.offsets for ix in indexes])
    self._linenos = np.concatenate([ix.linenos for ix in indexes])
    self._ends = np.cumsum([len(ix.offsets) for ix in indexes])
    self._fds: dict[int, list[int]] = {}
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._offsets)

  def __getitem__(self, i: int) -> Record:
    i = int(i)
    if not 0 <= i < len(self):
      raise IndexError(f"record {i} of {len(self)}")
    file = int(np.searchsorted(self._ends, i, side="right"))
    where = f"{self.paths[file]}:{self._linenos[i]}"
    raw = _read_line(self._fd(file), int(self._offsets[i]))
    record = Record(parse_object(decode_utf8(raw, where), where))
    check_required(record, self.required, where)
    record.where = where
    return record

  def _fd(self, file: int) -> int:
    pid = os.getpid()
    with self._lock:
      fds = self._fds.get(pid)
      if fds is None:
        try:
          fds = [os.open(p, os.O_RDONLY) for p in self.paths]
        except OSError as e:
          raise DataError(f"cannot reopen data file ({e})") from None
        self._fds = {pid: fds}
      return fds[file]

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_fds"], state["_lock"] = {}, None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __repr__(self) -> str:
    return f"JsonlSource({len(self)} records in {len(self.paths)} files)"
