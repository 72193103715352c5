"""Tests for jft.data.pipeline / jft.data.jsonl (pure numpy, no jax)."""

import collections
import functools
import itertools
import json

import numpy as np
import pytest

from jft.data import pipeline
from jft.data.pipeline import DataError

SEQ_LEN = 8
PAD = 1000  # Not 0, so padding with the wrong value shows.


def _docs(lengths, mask_every=0):
  """Examples whose token ids are all distinct (so pieces are identifiable).

  With `mask_every`, every that-many-th target gets weight 0 (like an SFT
  prompt), so the weight column is not trivially all ones.
  """
  counter = itertools.count(1)
  examples = []
  for n in lengths:
    ids = np.array([next(counter) for _ in range(n + 1)], np.int32)
    mask = np.ones(n + 1, np.float32)
    if mask_every:
      mask[::mask_every] = 0.0
    examples.append(pipeline.causal_example(ids, loss_mask=mask))
  return examples


def _ref_pieces(examples, seq_len):
  """Hand-made reference split: consecutive seq_len windows of each doc."""
  out = []
  for ex in examples:
    n = len(ex["inputs"])
    for s in range(0, n, seq_len):
      out.append(tuple(tuple(ex[k][s : s + seq_len].tolist()) for k in _FIELDS))
  return out


_FIELDS = ("inputs", "targets", "weights")
# Lengths 1..12 plus documents of exactly and over 3x seq_len.
LENGTHS = [5, 1, 7, 8, 3, 12, 24, 26, 2, 9, 4, 6, 11, 15, 16, 17, 3, 3, 1, 10]


def _segments(batches):
  """Yields each (inputs, targets, weights) segment found in the batches."""
  for b in batches:
    for r in range(b["inputs"].shape[0]):
      seg = b["segment_ids"][r]
      for s in np.unique(seg[seg > 0]):
        idx = np.flatnonzero(seg == s)
        yield tuple(tuple(b[k][r, idx].tolist()) for k in _FIELDS)


def _token_multiset(batches):
  """Counter of (target, weight > 0) over non-padding cells."""
  c = collections.Counter()
  for b in batches:
    real = b["segment_ids"] > 0
    weighted = (b["weights"][real] > 0).tolist()
    c.update(zip(b["targets"][real].tolist(), weighted, strict=True))
  return c


def _example_multiset(examples):
  c = collections.Counter()
  for ex in examples:
    weighted = (ex["weights"] > 0).tolist()
    c.update(zip(ex["targets"].tolist(), weighted, strict=True))
  return c


def _check_rows(batch, batch_size, seq_len):
  """Layout rules every batch obeys, checked cell by cell."""
  assert batch["inputs"].dtype == np.int32
  assert batch["targets"].dtype == np.int32
  assert batch["weights"].dtype == np.float32
  assert batch["positions"].dtype == np.int32
  assert batch["segment_ids"].dtype == np.int32
  for v in batch.values():
    assert v.shape == (batch_size, seq_len)
  pad = batch["segment_ids"] == 0
  np.testing.assert_array_equal(batch["weights"][pad], 0.0)
  np.testing.assert_array_equal(batch["inputs"][pad], PAD)
  np.testing.assert_array_equal(batch["targets"][pad], PAD)
  for r in range(batch_size):
    seg = batch["segment_ids"][r]
    ids = [s for s in seg.tolist() if s > 0]
    # Segments are numbered 1, 2, ... in row order.
    distinct = list(dict.fromkeys(ids))
    assert distinct == list(range(1, len(distinct) + 1)), seg
    for s in distinct:
      idx = np.flatnonzero(seg == s)
      np.testing.assert_array_equal(idx, np.arange(idx[0], idx[0] + len(idx)))
      np.testing.assert_array_equal(
        batch["positions"][r, idx], np.arange(len(idx))
      )


def _train(examples, **kw):
  args = dict(seq_len=SEQ_LEN, batch_size=4, seed=0, pad_id=PAD)
  args.update(kw)
  return pipeline.make_train_iter(examples, **args)


# ---------------------------------------------------------------- jsonl ----


def _write(path, lines):
  path.write_text("".join(line + "\n" for line in lines))
  return str(path)


def test_read_jsonl_ok_skips_blank_lines(tmp_path):
  path = _write(tmp_path / "a.jsonl", ['{"text": "a"}', "", '{"text": "b"}'])
  assert pipeline.read_jsonl(path, ["text"]) == [{"text": "a"}, {"text": "b"}]


def test_read_jsonl_missing_file(tmp_path):
  path = str(tmp_path / "nope.jsonl")
  with pytest.raises(DataError, match=r"nope\.jsonl.*not found"):
    pipeline.read_jsonl(path, ["text"])


def test_read_jsonl_empty_file(tmp_path):
  path = _write(tmp_path / "empty.jsonl", ["", "  "])
  with pytest.raises(DataError, match=r"empty\.jsonl.*no records"):
    pipeline.read_jsonl(path, ["text"])


@pytest.mark.parametrize(
  "lines, lineno, what",
  [
    (['{"text": "a"}', '{"text": "b"}', '{"text": '], 3, "invalid JSON"),
    (['{"text": "a"}', '{"other": "b"}'], 2, "missing required field 'text'"),
    (['{"text": "a"}', '{"text": 5}'], 2, "'text' must be a string"),
    (['{"text": "a"}', '{"text": ""}'], 2, "'text' is empty"),
    (['{"text": "a"}', "[1, 2]"], 2, "expected a JSON object"),
  ],
)
def test_read_jsonl_errors_name_file_and_line(tmp_path, lines, lineno, what):
  path = _write(tmp_path / "bad.jsonl", lines)
  with pytest.raises(DataError) as e:
    pipeline.read_jsonl(path, ["text"])
  assert f"{path}:{lineno}:" in str(e.value)
  assert what in str(e.value)


def test_read_jsonl_files_list_and_glob(tmp_path):
  a = _write(tmp_path / "a.jsonl", ['{"text": "a"}'])
  _write(tmp_path / "b1.jsonl", ['{"text": "b1"}'])
  _write(tmp_path / "b2.jsonl", ['{"text": "b2"}'])
  got = pipeline.read_jsonl_files(f"{a}, {tmp_path}/b*.jsonl", ["text"])
  assert [r["text"] for r in got] == ["a", "b1", "b2"]
  pattern = f"{tmp_path}/zz*.jsonl"
  with pytest.raises(DataError, match="zz\\*.jsonl: glob pattern matched no"):
    pipeline.read_jsonl_files(f"{a},{pattern}", ["text"])


# ------------------------------------------------------------- examples ----


def test_clm_example_and_split():
  encode = lambda s: [ord(c) for c in s]
  ex = pipeline.clm_example("abc", encode, bos_id=1, eos_id=2)
  np.testing.assert_array_equal(ex["inputs"], [1, 97, 98, 99])
  np.testing.assert_array_equal(ex["targets"], [97, 98, 99, 2])
  np.testing.assert_array_equal(ex["weights"], [1, 1, 1, 1])
  assert ex["inputs"].dtype == np.int32 and ex["weights"].dtype == np.float32
  pieces = pipeline.split_example(ex, 3)
  assert [p["targets"].tolist() for p in pieces] == [[97, 98, 99], [2]]
  assert [p["inputs"].tolist() for p in pieces] == [[1, 97, 98], [99]]


def test_causal_example_loss_mask_shifts():
  ex = pipeline.causal_example([5, 6, 7, 8], loss_mask=[0, 0, 1, 1])
  np.testing.assert_array_equal(ex["weights"], [0, 1, 1])


def test_count_tokens():
  b = {"weights": np.array([[1.0, 0.0, 0.5], [0.0, 0.0, 2.0]], np.float32)}
  assert pipeline.count_tokens(b) == 3


# -------------------------------------------------------------- batches ----


@pytest.mark.parametrize("packing", [True, False])
def test_one_epoch_conserves_tokens_and_pieces(packing):
  examples = _docs(LENGTHS, mask_every=3)
  batches = list(_train(examples, num_epochs=1, packing=packing))
  for b in batches:
    _check_rows(b, 4, SEQ_LEN)
  assert _token_multiset(batches) == _example_multiset(examples)
  # Every piece comes back intact: long docs split into seq_len windows.
  assert sorted(_segments(batches)) == sorted(_ref_pieces(examples, SEQ_LEN))
  # The 3x docs gave 3 and 4 pieces.
  assert len(_ref_pieces(_docs([24, 26]), SEQ_LEN)) == 7
  total = sum(pipeline.count_tokens(b) for b in batches)
  assert total == sum(int((e["weights"] > 0).sum()) for e in examples)


def test_packing_puts_several_docs_per_row():
  examples = _docs(LENGTHS)
  packed = list(_train(examples, num_epochs=1))
  unpacked = list(_train(examples, num_epochs=1, packing=False))
  assert len(packed) < len(unpacked)
  assert max(b["segment_ids"].max() for b in packed) > 1


def test_last_partial_batch_is_padding_rows():
  # 5 pieces, unpacked, batch 4: second batch has 1 real row + 3 padding.
  examples = _docs([3, 3, 3, 3, 3])
  batches = list(_train(examples, num_epochs=1, packing=False, shuffle=False))
  assert len(batches) == 2
  np.testing.assert_array_equal(batches[1]["segment_ids"][1:], 0)
  np.testing.assert_array_equal(batches[1]["weights"][1:], 0.0)
  np.testing.assert_array_equal(batches[1]["inputs"][1:], PAD)


@pytest.mark.parametrize(
  "kw",
  [
    {"num_epochs": 1, "packing": False},
    {"num_epochs": 3, "packing": False, "shard_index": 1, "shard_count": 3},
    {"num_epochs": 1},
    {"num_epochs": 2, "shard_index": 0, "shard_count": 2, "seed": 5},
    {"num_epochs": 2, "batch_size": 3, "num_packing_bins": 5},
  ],
)
def test_count_train_batches_is_what_the_iterator_yields(kw):
  examples = _docs(LENGTHS)
  args = dict(seq_len=SEQ_LEN, batch_size=4, seed=0) | kw
  assert pipeline.count_train_batches(examples, **args) == len(
    list(_train(examples, **kw))
  )


def test_count_train_batches_by_hand():
  # 5 one-piece docs + one of 3 pieces (20 tokens, seq_len 8) = 8 pieces;
  # unpacked, 2 epochs = 16 rows; batch 5: 3 full batches and 1 padded.
  examples = _docs([3, 3, 3, 3, 3, 20])
  count = functools.partial(
    pipeline.count_train_batches, examples, seq_len=SEQ_LEN, seed=0
  )
  assert count(batch_size=5, num_epochs=2, packing=False) == 4
  # Process 1 of 3 reads pieces 1, 4, 7: 3 rows an epoch.
  assert (
    count(
      batch_size=2, num_epochs=2, packing=False, shard_index=1, shard_count=3
    )
    == 3
  )
  # Packed: 2 epochs of 35 tokens fill at least ceil(70 / 8) = 9 rows.
  assert count(batch_size=1, num_epochs=2) >= 9
  pad = pipeline.padding_batch(
    examples, seq_len=SEQ_LEN, batch_size=3, pad_id=PAD
  )
  real = next(_train(examples, batch_size=3))
  assert pad.keys() == real.keys()
  for k, v in pad.items():
    assert v.shape == real[k].shape and v.dtype == real[k].dtype, k
  np.testing.assert_array_equal(pad["inputs"], PAD)
  np.testing.assert_array_equal(pad["weights"], 0)
  np.testing.assert_array_equal(pad["segment_ids"], 0)


def test_two_epochs_see_everything_twice():
  examples = _docs(LENGTHS)
  batches = list(_train(examples, num_epochs=2))
  want = _example_multiset(examples)
  assert _token_multiset(batches) == want + want


def test_shuffle_is_seeded():
  examples = _docs(LENGTHS)
  take = lambda it: [next(it) for _ in range(6)]
  a, b = take(_train(examples, seed=3)), take(_train(examples, seed=3))
  c = take(_train(examples, seed=4))
  for x, y in zip(a, b, strict=True):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  differs = lambda xs, ys: any(
    not np.array_equal(x["inputs"], y["inputs"])
    for x, y in zip(xs, ys, strict=True)
  )
  assert differs(a, c)
  # Unshuffled order differs from shuffled order too.
  assert differs(a, take(_train(examples, seed=3, shuffle=False)))


def test_epochs_are_shuffled_differently():
  examples = _docs([3] * 12)  # One piece per doc, unpacked: order visible.
  batches = list(_train(examples, num_epochs=2, packing=False, batch_size=12))
  first, second = (b["targets"][:, 0].tolist() for b in batches)
  assert sorted(first) == sorted(second) and first != second


@pytest.mark.parametrize("packing", [True, False])
def test_shards_are_disjoint_and_cover_the_epoch(packing):
  examples = _docs(LENGTHS, mask_every=2)
  kw = dict(num_epochs=1, packing=packing)
  full = list(_train(examples, **kw))
  shards = [
    list(_train(examples, shard_index=i, shard_count=2, **kw)) for i in (0, 1)
  ]
  pieces = [collections.Counter(_segments(s)) for s in shards]
  assert sum(pieces[0].values()) > 0 and sum(pieces[1].values()) > 0
  assert not set(pieces[0]) & set(pieces[1])
  assert pieces[0] + pieces[1] == collections.Counter(_segments(full))
  tokens = [_token_multiset(s) for s in shards]
  assert not set(tokens[0]) & set(tokens[1])  # Token ids are unique per doc.
  assert tokens[0] + tokens[1] == _token_multiset(full)


@pytest.mark.parametrize(
  "kw",
  [
    {},
    {"packing": False},
    # 3 packing bins for 2-row batches: the state falls mid packed batch.
    {"batch_size": 2, "num_packing_bins": 3},
    # Finite epochs, a shard, and crossing an epoch boundary.
    {"num_epochs": 5, "batch_size": 2, "shard_index": 1, "shard_count": 2},
  ],
)
def test_state_round_trip(kw):
  examples = _docs(LENGTHS)
  it = _train(examples, seed=7, **kw)
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(5)]
  fresh = _train(examples, seed=7, **kw)
  fresh.set_state(state)
  for x, y in zip(want, (next(fresh) for _ in range(5)), strict=True):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("packing", [True, False])
def test_eval_batches_cover_each_example_once(packing):
  examples = _docs(LENGTHS, mask_every=3)
  batches = pipeline.make_eval_batches(
    examples, seq_len=SEQ_LEN, batch_size=3, pad_id=PAD, packing=packing
  )
  for b in batches:
    _check_rows(b, 3, SEQ_LEN)
  assert sorted(_segments(batches)) == sorted(_ref_pieces(examples, SEQ_LEN))
  assert _token_multiset(batches) == _example_multiset(examples)
  again = pipeline.make_eval_batches(
    examples, seq_len=SEQ_LEN, batch_size=3, pad_id=PAD, packing=packing
  )
  assert len(again) == len(batches)
  for x, y in zip(batches, again, strict=True):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_unpacked_eval_is_one_piece_per_row_in_order():
  examples = _docs([3, 5, 1, 8, 2])
  batches = pipeline.make_eval_batches(
    examples, seq_len=SEQ_LEN, batch_size=2, pad_id=PAD, packing=False
  )
  rows = [{k: v[r] for k, v in b.items()} for b in batches for r in range(2)]
  assert len(rows) == 6  # 5 examples + 1 padding row.
  for row, ex in zip(rows, examples, strict=False):
    n = len(ex["inputs"])
    np.testing.assert_array_equal(row["segment_ids"], [1] * n + [0] * (8 - n))
    np.testing.assert_array_equal(row["positions"][:n], np.arange(n))
    for k in _FIELDS:
      np.testing.assert_array_equal(row[k][:n], ex[k])
  np.testing.assert_array_equal(rows[-1]["segment_ids"], 0)


def test_errors():
  with pytest.raises(DataError, match="no examples"):
    list(_train([], num_epochs=1))
  with pytest.raises(DataError, match="shard 1 of 2 is empty"):
    _train(_docs([3]), shard_index=1, shard_count=2)
  with pytest.raises(ValueError, match="equal length"):
    bad = {"inputs": [1, 2], "targets": [1], "weights": [1.0]}
    pipeline.split_example(bad, 4)
