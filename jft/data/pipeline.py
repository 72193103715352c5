"""Host-side data pipeline: examples -> pieces -> packed rows -> batches.

Contract the trainer and objectives rely on:

* An *example* is a dict of equal-length 1-D numpy arrays: `inputs` int32,
  `targets` int32, `weights` float32 (loss weight per target, 0 = no loss),
  plus optional extra per-token int/float fields that are carried along.
  Inputs/targets are shifted per document *before* packing, so no target is
  lost at a row boundary.
* A *batch* is a dict of `[B, T]` arrays: the example fields plus `positions`
  (from 0 for each document or document piece) and `segment_ids` (1, 2, ...
  per document within a row; 0 = padding, where inputs/targets are `pad_id`
  and weights 0).
* Documents longer than `seq_len` are split into pieces, never truncated or
  dropped; a finite run pads its last batch with all-padding rows instead of
  dropping data (`count_train_batches` says how many batches that is).

The train iterator is built with grain so that its position is a small JSON
state (`get_state` / `set_state`) the trainer checkpoints and resumes from.
Each process reads a disjoint shard (`shard_index::shard_count`); turning
local batches into global jax arrays is the trainer's job.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import grain
import numpy as np

from jft.data.jsonl import DataError, read_jsonl, read_jsonl_files

__all__ = [
  "DataError",
  "causal_example",
  "clm_example",
  "count_tokens",
  "count_train_batches",
  "make_eval_batches",
  "make_stream_iter",
  "make_train_iter",
  "padding_batch",
  "read_jsonl",
  "read_jsonl_files",
  "split_example",
]

Example = dict[str, np.ndarray]
Batch = dict[str, np.ndarray]

_REQUIRED = ("inputs", "targets", "weights")
_TOKEN_KEYS = ("inputs", "targets")  # Padded with pad_id, the rest with 0.
_BATCH_ONLY = ("positions", "segment_ids")
_MAX_SEED = 2**32


def causal_example(
  ids: Sequence[int], loss_mask: Sequence[float] | None = None
) -> Example:
  """Next-token example from a full token sequence (bos/eos included).

  `loss_mask[i]` is the loss weight of predicting `ids[i]`, so SFT can zero
  the prompt: weights are `loss_mask[1:]` (the first token is never a target).
  """
  ids = np.asarray(ids, dtype=np.int32)
  if ids.ndim != 1 or len(ids) < 2:
    raise ValueError(f"need a 1-D sequence of >= 2 ids, got {ids.shape}")
  if loss_mask is None:
    weights = np.ones(len(ids) - 1, np.float32)
  else:
    mask = np.asarray(loss_mask, dtype=np.float32)
    if mask.shape != ids.shape:
      raise ValueError(f"loss_mask {mask.shape} != ids {ids.shape}")
    weights = mask[1:]
  return {"inputs": ids[:-1], "targets": ids[1:], "weights": weights}


def clm_example(
  text: str,
  encode: Callable[[str], Sequence[int]],
  bos_id: int | Sequence[int] | None,
  eos_id: int | None,
) -> Example:
  """Language-modelling example: `[bos] + encode(text) + [eos]`, all weighted.

  `bos_id` is an id, a prefix of ids (a tokenizer's `bos_prefix`, empty for
  models without bos, e.g. Qwen) or None; `eos_id` an id or None.
  """
  ids = list(encode(text))
  if isinstance(bos_id, int):
    ids = [bos_id, *ids]
  elif bos_id is not None:
    ids = [*bos_id, *ids]
  if eos_id is not None:
    ids = [*ids, eos_id]
  return causal_example(ids)


def _check_example(example: Example) -> Example:
  """Validates an example and casts the contract fields to their dtypes."""
  missing = [k for k in _REQUIRED if k not in example]
  if missing:
    raise ValueError(f"example lacks fields {missing}; has {list(example)}")
  out = {k: np.asarray(v) for k, v in example.items()}
  out["inputs"] = out["inputs"].astype(np.int32, copy=False)
  out["targets"] = out["targets"].astype(np.int32, copy=False)
  out["weights"] = out["weights"].astype(np.float32, copy=False)
  shapes = {k: v.shape for k, v in out.items()}
  if any(len(s) != 1 for s in shapes.values()) or len(set(shapes.values())) > 1:
    raise ValueError(f"example fields must be 1-D of equal length: {shapes}")
  for k in _BATCH_ONLY:
    if k in out:
      raise ValueError(f"example field {k!r} is reserved for batches")
  return out


def split_example(example: Example, seq_len: int) -> list[Example]:
  """Cuts an example into consecutive pieces of at most `seq_len` tokens.

  Every target lands in exactly one piece; an empty example gives no pieces.
  """
  if seq_len <= 0:
    raise ValueError(f"seq_len must be positive, got {seq_len}")
  example = _check_example(example)
  length = len(example["inputs"])
  return [
    {k: v[start : start + seq_len] for k, v in example.items()}
    for start in range(0, length, seq_len)
  ]


def count_tokens(batch: Batch) -> int:
  """Number of targets that carry loss (weight > 0)."""
  return int(np.count_nonzero(batch["weights"] > 0))


def _pad_values(example: Example, pad_id: int) -> dict[str, int | float]:
  """Fill value per field: pad_id for token fields, 0 for the rest."""
  return {
    k: (pad_id if k in _TOKEN_KEYS else np.zeros((), v.dtype).item())
    for k, v in example.items()
  }


def _pieces(examples: Sequence[Example], seq_len: int) -> list[Example]:
  """All examples split to <= seq_len, checked to share one set of fields."""
  pieces = []
  keys = None
  for i, example in enumerate(examples):
    if keys is None:
      keys = set(example)
    elif set(example) != keys:
      raise ValueError(
        f"example {i} has fields {sorted(example)}, expected {sorted(keys)}"
      )
    pieces.extend(split_example(example, seq_len))
  if not pieces:
    raise DataError("no examples (or only empty ones) to build batches from")
  return pieces


def _padding_row(
  proto: Example, seq_len: int, pad_values: dict[str, int | float]
) -> Example:
  """An all-padding row shaped like the rows built from `proto`."""
  row = {
    k: np.full(seq_len, pad_values[k], dtype=v.dtype) for k, v in proto.items()
  }
  row["positions"] = np.zeros(seq_len, np.int32)
  row["segment_ids"] = np.zeros(seq_len, np.int32)
  return row


def _unpacked_row(
  example: Example, seq_len: int, pad_values: dict[str, int | float]
) -> Example:
  """One example per row, right-padded (packing=False)."""
  n = len(example["inputs"])
  row = _padding_row(example, seq_len, pad_values)
  for k, v in example.items():
    row[k][:n] = v
  row["positions"][:n] = np.arange(n, dtype=np.int32)
  row["segment_ids"][:n] = 1
  return row


def _from_packed(packed: dict[str, np.ndarray], keys: Sequence[str]) -> Example:
  """Renames grain's packer output to the batch contract.

  grain emits `<field>`, `<field>_segment_ids`, `<field>_positions` for every
  packed field; they agree across fields here (all fields share one length),
  so one `segment_ids`/`positions` pair is kept. grain already uses 1-based
  segment ids with 0 for padding and positions restarting at 0 per segment.
  """
  row = {k: packed[k] for k in keys}
  row["segment_ids"] = packed["inputs_segment_ids"]
  row["positions"] = packed["inputs_positions"]
  return row


def _stack_and_pad(
  rows: Sequence[Example], *, batch_size: int, padding_row: Example
) -> Batch:
  """Stacks rows into a batch, filling a short final batch with padding."""
  rows = list(rows) + [padding_row] * (batch_size - len(rows))
  return {k: np.stack([r[k] for r in rows]) for k in padding_row}


def _rows(
  examples: Sequence[Example],
  *,
  seq_len: int,
  batch_size: int,
  seed: int,
  pad_id: int,
  shuffle: bool,
  num_epochs: int | None,
  shard_index: int,
  shard_count: int,
  packing: bool,
  num_packing_bins: int | None,
) -> tuple[grain.IterDataset, Example]:
  """(the grain graph of rows, an all-padding row): `_build_dataset`'s
  graph before batching."""
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"bad shard {shard_index} of {shard_count}")
  pieces = _pieces(examples, seq_len)
  proto = pieces[0]
  keys = list(proto)
  pad_values = _pad_values(proto, pad_id)

  ds = grain.MapDataset.source(pieces)[shard_index::shard_count]
  if len(ds) == 0:
    raise DataError(
      f"shard {shard_index} of {shard_count} is empty: only "
      f"{len(pieces)} sequences for {shard_count} processes"
    )
  if shuffle:
    # grain reseeds this shuffle per epoch (seed + epoch) under repeat.
    ds = ds.shuffle(seed=seed % _MAX_SEED)
  ds = ds.repeat(num_epochs)
  if not packing:
    ds = ds.map(
      functools.partial(_unpacked_row, seq_len=seq_len, pad_values=pad_values)
    )
  # Data lives in memory: threads would only contend for the GIL.
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0))
  if packing:
    ds = _pack(
      ds, keys, pad_values, seq_len, batch_size, seed, shuffle, num_packing_bins
    )
  return ds, _padding_row(proto, seq_len, pad_values)


def _pack(
  ds: grain.IterDataset,
  keys: Sequence[str],
  pad_values: dict[str, int | float],
  seq_len: int,
  batch_size: int,
  seed: int,
  shuffle: bool,
  num_packing_bins: int | None,
) -> grain.IterDataset:
  """Pieces packed into rows of the batch contract."""
  # Best-fit: ~0.5-1% less padding than first-fit on mixed lengths. Pieces
  # are <= seq_len already, so the packer never has to truncate.
  ds = grain.experimental.BestFitPackIterDataset(
    ds,
    length_struct={k: seq_len for k in keys},
    num_packing_bins=num_packing_bins or batch_size,
    seed=seed % _MAX_SEED,
    shuffle_bins=shuffle,
    padding_struct=pad_values,
  )
  return ds.map(functools.partial(_from_packed, keys=keys))


def _batched(ds, batch_size: int, padding_row: Example) -> grain.IterDataset:
  """Rows -> batches; a short last batch is filled with `padding_row`."""
  batch_fn = functools.partial(
    _stack_and_pad, batch_size=batch_size, padding_row=padding_row
  )
  return ds.batch(batch_size, batch_fn=batch_fn)


def _build_dataset(examples: Sequence[Example], **kw) -> grain.IterDataset:
  """The grain graph shared by the train iterator and eval batches
  (keyword arguments as `_rows`')."""
  ds, padding_row = _rows(examples, **kw)
  batch_size = kw["batch_size"]
  return _batched(ds, batch_size, padding_row)


def make_train_iter(
  examples: Sequence[Example],
  *,
  seq_len: int,
  batch_size: int,
  seed: int,
  pad_id: int,
  shuffle: bool = True,
  num_epochs: int | None = None,
  shard_index: int = 0,
  shard_count: int = 1,
  packing: bool = True,
  num_packing_bins: int | None = None,
) -> grain.DatasetIterator:
  """Iterator of this process's `[batch_size, seq_len]` training batches.

  Args:
    examples: examples as in the module docstring; long ones are split.
    seq_len: row length T.
    batch_size: rows per batch on this process (per-process batch size).
    seed: seeds the per-epoch shuffle and the packer's bin order.
    pad_id: token id for padding inputs/targets.
    shuffle: shuffle pieces (differently each epoch).
    num_epochs: passes over the data; None repeats forever.
    shard_index: this process's index (jax.process_index()).
    shard_count: number of processes (jax.process_count()).
    packing: pack several pieces per row; False puts one per row.
    num_packing_bins: rows the packer fills at once (default batch_size);
      more bins pack tighter at the cost of mixing neighbouring data.

  Returns:
    A grain DatasetIterator; its `get_state()` is JSON-serialisable and
    `set_state()` on a fresh iterator resumes exactly.
  """
  ds = _build_dataset(
    examples,
    seq_len=seq_len,
    batch_size=batch_size,
    seed=seed,
    pad_id=pad_id,
    shuffle=shuffle,
    num_epochs=num_epochs,
    shard_index=shard_index,
    shard_count=shard_count,
    packing=packing,
    num_packing_bins=num_packing_bins,
  )
  return iter(ds)


def count_train_batches(
  examples: Sequence[Example],
  *,
  seq_len: int,
  batch_size: int,
  seed: int,
  num_epochs: int,
  shuffle: bool = True,
  shard_index: int = 0,
  shard_count: int = 1,
  packing: bool = True,
  num_packing_bins: int | None = None,
) -> int:
  """How many batches `make_train_iter` yields with the same arguments and
  a finite `num_epochs`: this shard's rows over all epochs / `batch_size`,
  rounded up (the last, partial batch is padded, never dropped).

  Unpacked, a row is one piece, so this is arithmetic. Packed, the row
  count depends on what the packer fits together (so on the shuffle), so
  the packer runs over every epoch once, without batching: a host-side
  pass over the data, like the run's own reading of it.
  """
  if num_epochs is None or num_epochs < 1:
    raise ValueError(f"need a finite num_epochs >= 1, got {num_epochs}")
  if not packing:
    pieces = _pieces(examples, seq_len)[shard_index::shard_count]
    return -(-len(pieces) * num_epochs // batch_size)
  rows, _ = _rows(
    examples,
    seq_len=seq_len,
    batch_size=batch_size,
    seed=seed,
    pad_id=0,  # values do not change how many rows there are
    shuffle=shuffle,
    num_epochs=num_epochs,
    shard_index=shard_index,
    shard_count=shard_count,
    packing=True,
    num_packing_bins=num_packing_bins,
  )
  return -(-sum(1 for _ in rows) // batch_size)


def padding_batch(
  examples: Sequence[Example], *, seq_len: int, batch_size: int, pad_id: int
) -> Batch:
  """An all-padding batch shaped like the train batches of `examples`
  (weights 0, segment ids 0): what a process whose shard has run out feeds
  while the others finish theirs."""
  for example in examples:
    pieces = split_example(example, seq_len)
    if pieces:
      proto = pieces[0]
      row = _padding_row(proto, seq_len, _pad_values(proto, pad_id))
      return _stack_and_pad([], batch_size=batch_size, padding_row=row)
  raise DataError("no examples (or only empty ones) to build batches from")


def make_eval_batches(
  examples: Sequence[Example],
  *,
  seq_len: int,
  batch_size: int,
  pad_id: int,
  packing: bool = True,
) -> list[Batch]:
  """Every example exactly once, in order, the last batch padded.

  Deterministic so eval losses are comparable across steps and runs.
  """
  ds = _build_dataset(
    examples,
    seq_len=seq_len,
    batch_size=batch_size,
    seed=0,
    pad_id=pad_id,
    shuffle=False,
    num_epochs=1,
    shard_index=0,
    shard_count=1,
    packing=packing,
    num_packing_bins=None,
  )
  return list(ds)


class _Flatten(grain.experimental.FlatMapTransform):
  """A record's list of pieces -> the pieces, one at a time."""

  max_fan_out = 1  # read by map datasets only; these lists are any length

  def flat_map(self, element):
    return element


def _record_pieces(record, to_examples, seq_len: int, keys) -> list[Example]:
  """The pieces of one record's examples; fields checked against `keys`."""
  out = []
  for example in to_examples(record):
    if keys is not None and set(example) != set(keys):
      where = getattr(record, "where", "?")
      raise DataError(
        f"{where}: the example has fields {sorted(example)}, expected "
        f"{sorted(keys)}"
      )
    out.extend(split_example(example, seq_len))
  return out


def make_stream_iter(
  source,
  to_examples: Callable[[dict], Sequence[Example]],
  *,
  seq_len: int,
  batch_size: int,
  seed: int,
  pad_id: int,
  shuffle: bool = True,
  shard_index: int = 0,
  shard_count: int = 1,
  packing: bool = True,
  num_packing_bins: int | None = None,
  read_threads: int = 1,
) -> tuple[grain.DatasetIterator, Batch]:
  """(iterator of this process's batches, an all-padding batch) over
  records read and made into examples only when the iterator reaches them.

  `source` is a random-access sequence of records (`stream.JsonlSource`);
  `to_examples(record)` makes one record's examples (the objective's
  `make_examples([record])`). This process takes records
  `shard_index::shard_count`, shuffled per epoch (an index permutation:
  nothing is read to shuffle), repeated forever; rows and batches are
  `make_train_iter`'s. `read_threads` threads read and tokenize ahead of
  the consumer (0: on the consumer's thread). The iterator's state is a
  small JSON dict, as `make_train_iter`'s.
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"bad shard {shard_index} of {shard_count}")
  ds = grain.MapDataset.source(source)[shard_index::shard_count]
  if len(ds) == 0:
    raise DataError(
      f"shard {shard_index} of {shard_count} is empty: only "
      f"{len(source)} records for {shard_count} processes"
    )
  proto = None
  for record in ds:  # the first record with any tokens sets the fields
    pieces = _record_pieces(record, to_examples, seq_len, None)
    if pieces:
      proto = pieces[0]
      break
  if proto is None:
    raise DataError("no examples (or only empty ones) to build batches from")
  keys = list(proto)
  pad_values = _pad_values(proto, pad_id)
  if shuffle:
    ds = ds.shuffle(seed=seed % _MAX_SEED)
  ds = ds.repeat(None).map(
    functools.partial(
      _record_pieces, to_examples=to_examples, seq_len=seq_len, keys=keys
    )
  )
  ds = ds.to_iter_dataset(
    grain.ReadOptions(
      num_threads=read_threads, prefetch_buffer_size=max(64, 8 * batch_size)
    )
  )
  ds = grain.experimental.FlatMapIterDataset(ds, _Flatten())
  if packing:
    ds = _pack(
      ds, keys, pad_values, seq_len, batch_size, seed, shuffle, num_packing_bins
    )
  else:
    ds = ds.map(
      functools.partial(_unpacked_row, seq_len=seq_len, pad_values=pad_values)
    )
  padding_row = _padding_row(proto, seq_len, pad_values)
  padding = _stack_and_pad([], batch_size=batch_size, padding_row=padding_row)
  return iter(_batched(ds, batch_size, padding_row)), padding
