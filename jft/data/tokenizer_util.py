"""Small pieces jft's tokenizers share: token offsets -> segments, loading a
SentencePiece model from bytes, and atomic file writes (also used for the
built-in suite's files)."""

from __future__ import annotations

import bisect
import os
import tempfile
from collections.abc import Mapping, Sequence

import sentencepiece as spm


def split_by_offsets(
  spans: Sequence[tuple[int, int]], bounds: Sequence[int]
) -> list[int]:
  """Segment index of each token, from its [start, end) offsets.

  `bounds` are the segments' end offsets (cumulative lengths, in the units
  of `spans`). A token that spans a boundary belongs to the segment holding
  its last character, so a completion's first token is always trained; a
  token that covers no character (a dummy prefix, a byte-fallback piece)
  goes with the next one that does. Indices never decrease, so grouping by
  them keeps the tokens in order: the groups concatenate to the encoding.
  """
  out, last = [0] * len(spans), len(bounds) - 1
  following = last
  for i in range(len(spans) - 1, -1, -1):  # right to left: "the next one"
    start, end = spans[i]
    if end > start:
      following = min(bisect.bisect_left(bounds, end), last)
    out[i] = following
  for i in range(1, len(out)):
    out[i] = max(out[i], out[i - 1])
  return out


def group_ids(
  ids: Sequence[int], segment: Sequence[int], n: int
) -> list[list[int]]:
  """`ids` grouped into `n` lists by their (non-decreasing) segment index."""
  out: list[list[int]] = [[] for _ in range(n)]
  for i, s in zip(ids, segment, strict=True):
    out[s].append(int(i))
  return out


def save_files(files: Mapping[str, bytes], directory: str | os.PathLike):
  """Writes each file atomically into `directory`; returns the paths."""
  paths = []
  for name, data in files.items():
    path = os.path.join(os.fspath(directory), name)
    write_bytes_atomic(path, data)
    paths.append(path)
  return paths


def write_bytes_atomic(path: str, data: bytes) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def load_sp(proto: bytes, name: str) -> spm.SentencePieceProcessor:
  """A SentencePiece processor from a serialized model; errors name it."""
  sp = spm.SentencePieceProcessor()
  try:
    sp.LoadFromSerializedProto(proto)
  except RuntimeError as e:
    raise ValueError(
      f"{name!r} is not a valid SentencePiece model: {e}"
    ) from None
  return sp
