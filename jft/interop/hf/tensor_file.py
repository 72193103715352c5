"""Reading slices of tensors from a `.safetensors` file with plain reads.

The format is an 8-byte little-endian header size, a JSON header (name ->
dtype, shape, byte offsets) and the raw row-major data. Reading the rows a
slice needs with `os.pread` (rather than memory-mapping the file) keeps the
file's pages out of this process's resident memory, so loading a checkpoint
costs the arrays it builds and nothing more.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

DTYPES = {
  "F64": np.dtype(np.float64),
  "F32": np.dtype(np.float32),
  "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "I64": np.dtype(np.int64),
  "I32": np.dtype(np.int32),
  "I16": np.dtype(np.int16),
  "I8": np.dtype(np.int8),
  "U8": np.dtype(np.uint8),
  "BOOL": np.dtype(np.bool_),
}
_MAX_HEADER = 100 * 2**20


class TensorFile:
  """One open safetensors file: `keys()`, `shape(name)`, `read(name, idx)`."""

  def __init__(self, path: str):
    self.path = path
    self._fd = os.open(path, os.O_RDONLY)
    try:
      self._header = self._read_header()
    except BaseException:
      os.close(self._fd)
      raise

  def _read_header(self) -> dict:
    size = os.fstat(self._fd).st_size
    raw = os.pread(self._fd, 8, 0)
    if len(raw) < 8:
      raise ValueError(f"{self.path}: not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", raw)
    if n > min(_MAX_HEADER, size - 8):
      raise ValueError(f"{self.path}: not a safetensors file (bad header)")
    try:
      header = json.loads(os.pread(self._fd, n, 8))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(
        f"{self.path}: unreadable safetensors header ({e})"
      ) from None
    header.pop("__metadata__", None)
    base = 8 + n
    out = {}
    for name, info in header.items():
      dtype = DTYPES.get(info.get("dtype"))
      if dtype is None:
        raise ValueError(
          f"{self.path}: tensor {name!r} has dtype {info.get('dtype')!r}, "
          f"which jft does not read ({sorted(DTYPES)})"
        )
      start, end = info["data_offsets"]
      shape = tuple(int(d) for d in info["shape"])
      if end - start != int(np.prod(shape)) * dtype.itemsize or (
        base + end > size
      ):
        raise ValueError(
          f"{self.path}: tensor {name!r} runs past the end of the file "
          "(truncated or corrupt)"
        )
      out[name] = (dtype, shape, base + start)
    return out

  def keys(self) -> list[str]:
    return list(self._header)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._header[name][1]

  def read(self, name: str, index: tuple = ()) -> np.ndarray:
    """`tensor[index]` (a tuple of contiguous slices), reading from disk
    only the rows of the first dim the slice covers and, for a 2-D tensor
    whose columns are sliced to less than half a row (an FSDP shard of an
    HF [out, in] kernel), only those columns of each row."""
    dtype, shape, offset = self._header[name]
    if not shape:
      return self._pread(offset, dtype.itemsize, name).view(dtype).reshape(())
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    ranges = [range(n)[i] for n, i in zip(shape, index, strict=True)]
    if any(r.step != 1 for r in ranges):
      raise ValueError("strided reads are not supported")
    rows = ranges[0]
    row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
    if len(shape) == 2 and 0 < 2 * len(ranges[1]) < shape[1]:
      cols = ranges[1]
      out = np.empty((len(rows), len(cols)), dtype)
      width = len(cols) * dtype.itemsize
      for j, r in enumerate(rows):
        start = offset + r * row_bytes + cols.start * dtype.itemsize
        out[j] = self._pread(start, width, name).view(dtype)
      return out
    first = rows.start if len(rows) else 0
    raw = self._pread(offset + first * row_bytes, row_bytes * len(rows), name)
    arr = raw.view(dtype).reshape((len(rows), *shape[1:]))
    return arr[(slice(None), *index[1:])]

  def _pread(self, start: int, nbytes: int, name: str) -> np.ndarray:
    """Exactly `nbytes` from `start` as uint8 (the OS returns at most ~2 GB
    a call, so large reads loop)."""
    out = np.empty(nbytes, np.uint8)
    view, done = memoryview(out), 0
    while done < nbytes:
      n = os.preadv(self._fd, [view[done:]], start + done)
      if n <= 0:
        raise ValueError(f"{self.path}: tensor {name!r} is truncated")
      done += n
    return out

  def close(self) -> None:
    os.close(self._fd)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
