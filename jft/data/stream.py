"""JSONL read lazily: an index of where each record starts, then one record
at a time, when the pipeline asks for it.

The eager reader (`jsonl.read_jsonl_files`) parses every record before
training starts. With `config.data.streaming` a run instead indexes its
files (a numpy scan of the bytes for line starts, about 2 s per GB on a
2-core Xeon; 16 bytes per record) and each process parses and tokenizes
only the records of its own shard, as training consumes them: a large
corpus starts training in seconds and host memory holds the index plus what
is in flight.

Records are exactly the eager reader's: the same non-blank lines (blank as
`str.strip` has it; a BOM starting a file is dropped), each a
`jsonl.Record` whose `where` is 'path:line', and a bad line is the same
DataError naming file and line. It is raised when the pipeline reaches that
line, not before training.
"""

from __future__ import annotations

import collections
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
# First bytes of a line that may decode to a character `str.strip` removes
# (what the eager reader calls blank): ASCII whitespace, the separators
# \x1c-\x1f, and any non-ASCII byte (U+0085, U+00A0, U+2028, U+3000, ...).
# A line starting with any other byte has text.
_MAYBE_BLANK = np.zeros(256, bool)
_MAYBE_BLANK[[9, 10, 11, 12, 13, 28, 29, 30, 31, 32]] = True
_MAYBE_BLANK[0x80:] = True
_BOM = b"\xef\xbb\xbf"
_MAX_OPEN = 32  # files a source keeps open at once (per process)


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
  keep = ~_MAYBE_BLANK[arr[np.minimum(starts, len(arr) - 1)]]  # has text
  keep &= starts < ends
  for i in np.flatnonzero(~keep & (starts < ends)):  # decide as eager does
    line = block[starts[i] : ends[i]].decode("utf-8", "replace")
    keep[i] = bool(line.strip())  # a bad byte is kept: reading names it
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


def _read_line(fd: int, offset: int, size: int) -> bytes:
  """The bytes of the line starting at `offset`, its newline included;
  `size` bytes are read first (the distance to the next record), more
  only if the line is longer."""
  parts = []
  while True:
    data = os.pread(fd, size, offset)
    if not data:
      break
    end = data.find(b"\n")
    if end >= 0:
      parts.append(data[: end + 1])
      break
    parts.append(data)
    offset += len(data)
    size = _READ
  return b"".join(parts)


class JsonlSource:
  """The records of the files `spec` names, in order, by index: a grain
  random-access data source (`len`, `source[i]`).

  Files are opened when first read, at most `_MAX_OPEN` at a time (the
  least recently used is closed), and read with `os.pread` under a lock,
  so reader threads share them; a pickled copy or a forked child opens
  its own. `close()` closes them.
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
    self._pid = os.getpid()
    self._open: collections.OrderedDict[int, int] = collections.OrderedDict()
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._offsets)

  def __getitem__(self, i: int) -> Record:
    i = int(i)
    if not 0 <= i < len(self):
      raise IndexError(f"record {i} of {len(self)}")
    file = int(np.searchsorted(self._ends, i, side="right"))
    where = f"{self.paths[file]}:{self._linenos[i]}"
    offset = int(self._offsets[i])
    last = i + 1 == int(self._ends[file])
    size = _READ if last else int(self._offsets[i + 1]) - offset
    with self._lock:
      raw = _read_line(self._fd(file), offset, size)
    record = Record(parse_object(decode_utf8(raw, where), where))
    check_required(record, self.required, where)
    record.where = where
    return record

  def _fd(self, file: int) -> int:
    """An open descriptor of file number `file` (the lock held)."""
    if os.getpid() != self._pid:  # a forked child: the parent's are its own
      self._close_all()
      self._pid = os.getpid()
    fd = self._open.get(file)
    if fd is not None:
      self._open.move_to_end(file)
      return fd
    if len(self._open) >= _MAX_OPEN:
      os.close(self._open.popitem(last=False)[1])
    try:
      fd = os.open(self.paths[file], os.O_RDONLY)
    except OSError as e:
      raise DataError(
        f"{self.paths[file]}: cannot read ({e.strerror or e})"
      ) from None
    self._open[file] = fd
    return fd

  def _close_all(self) -> None:
    while self._open:
      try:
        os.close(self._open.popitem()[1])
      except OSError:
        pass

  def close(self) -> None:
    """Closes the open files (reading again reopens them)."""
    with self._lock:
      self._close_all()

  def __del__(self):
    if getattr(self, "_pid", None) == os.getpid():
      self._close_all()

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_open"], state["_lock"], state["_pid"] = None, None, None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._open = collections.OrderedDict()
    self._lock = threading.Lock()
    self._pid = os.getpid()

  def __repr__(self) -> str:
    return f"JsonlSource({len(self)} records in {len(self.paths)} files)"
