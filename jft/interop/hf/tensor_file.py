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
    """`tensor[index]` (a tuple of slices, one per leading dim at most),
    reading only the rows of the first dim the slice covers."""
    dtype, shape, offset = self._header[name]
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    if not shape:
      rows = range(1)
    else:
      rows = range(shape[0])[index[0]]
    if len(shape) and rows.step != 1:
      raise ValueError("strided reads are not supported")
    row = int(np.prod(shape[1:])) * dtype.itemsize
    first = rows.start if len(rows) else 0
    nbytes = row * len(rows)
    buf = os.pread(self._fd, nbytes, offset + first * row) if nbytes else b""
    if len(buf) != nbytes:
      raise ValueError(f"{self.path}: tensor {name!r} is truncated")
    arr = np.frombuffer(buf, dtype).reshape((len(rows), *shape[1:]))
    if not shape:
      return arr.reshape(())
    return arr[(slice(None), *index[1:])]

  def close(self) -> None:
    os.close(self._fd)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
