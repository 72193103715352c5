"""Streaming data (config.data.streaming): the lazy JSONL index and reader,
the streamed batch iterator, and a streamed training run."""

import json
import os

import numpy as np
import pytest
from conftest import tiny_config

from jft import errors, train, validate
from jft.data import jsonl, pipeline, sources, stream

# BOM, blank and whitespace-only lines (LF and CRLF; ASCII, \x1c and
# Unicode spaces: U+00A0, U+3000, U+2028), a long line, unicode and a last
# line without its newline: what the eager reader also takes.
AWKWARD = (
  b'\xef\xbb\xbf{"text": "first"}\n'
  b"\n"
  b"   \t\r\n"
  b'{"text": "caf\xc3\xa9 \\u00e9"}\r\n'
  + b'{"text": "'
  + b"long " * 3000
  + b'"}\n'
  + b"\n\xc2\xa0\n\x1c \xe3\x80\x80\xe2\x80\xa8\r\n"
  + b'{"text": "last, no newline"}'
)


def _write(path, data: bytes):
  with open(path, "wb") as f:
    f.write(data)
  return str(path)


@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 22])
def test_index_reads_what_the_eager_reader_reads(tmp_path, chunk):
  path = _write(tmp_path / "a.jsonl", AWKWARD)
  ix = stream.index_file(path, chunk=chunk)
  np.testing.assert_array_equal(ix.linenos, [1, 4, 5, 9])
  src = stream.JsonlSource(path, ("text",))
  src_records = [src[i] for i in range(len(src))]
  eager = jsonl.read_jsonl(path, ("text",))
  assert [dict(r) for r in src_records] == [dict(r) for r in eager]
  assert [r.where for r in src_records] == [r.where for r in eager]
  assert [r.where for r in eager][-1] == f"{path}:9"


def test_source_spans_files_in_order(tmp_path):
  a = _write(tmp_path / "a.jsonl", b'{"text": "a1"}\n{"text": "a2"}\n')
  b = _write(tmp_path / "b.jsonl", b'\n{"text": "b1"}\n')
  src = stream.JsonlSource(f"{a},{b}")
  assert len(src) == 3
  assert [src[i]["text"] for i in range(3)] == ["a1", "a2", "b1"]
  assert src[2].where == f"{b}:2"
  with pytest.raises(IndexError):
    src[3]


@pytest.mark.parametrize(
  "line, message",
  [
    (b'{"text": ', "invalid JSON"),
    (b'["text"]', "expected a JSON object"),
    (b'{"txt": "x"}', "missing required field 'text'"),
    (b'{"text": "\xff"}', "not valid UTF-8"),
  ],
)
def test_a_bad_line_is_named_when_reached(tmp_path, line, message):
  path = _write(tmp_path / "bad.jsonl", b'{"text": "ok"}\n\n' + line + b"\n")
  src = stream.JsonlSource(path, ("text",))  # indexing does not parse
  assert src[0]["text"] == "ok"
  with pytest.raises(jsonl.DataError, match=message) as e:
    src[1]
  assert f"{path}:3" in str(e.value)


def test_many_files_are_read_with_few_open(tmp_path, monkeypatch):
  """More files than the source keeps open: each is opened when read and
  the least recently used closed; `close` closes what is left."""
  monkeypatch.setattr(stream, "_MAX_OPEN", 3)
  paths = []
  for i in range(10):
    paths.append(_write(tmp_path / f"{i}.jsonl", f'{{"i": {i}}}\n'.encode()))
  src = stream.JsonlSource(",".join(paths))
  for _ in range(2):
    assert [src[i]["i"] for i in (0, 5, 9, 1, 5, 8)] == [0, 5, 9, 1, 5, 8]
    assert len(src._open) == 3
  src.close()
  assert not src._open
  assert src[4]["i"] == 4  # reopens


def test_empty_and_missing_files_are_named(tmp_path):
  empty = _write(tmp_path / "empty.jsonl", b"\n  \n")
  with pytest.raises(jsonl.DataError, match="empty.jsonl: no records"):
    stream.JsonlSource(empty)
  with pytest.raises(jsonl.DataError, match="nope.jsonl: file not found"):
    stream.JsonlSource(str(tmp_path / "nope.jsonl"))


def _corpus(tmp_path, n=200, seed=0):
  """Records whose tokens say which record they came from (id, then its
  length in filler tokens), some longer than the rows (split in pieces)."""
  rng = np.random.default_rng(seed)
  lines = [
    json.dumps({"text": f"{i} {int(rng.integers(1, 40))}"}) for i in range(n)
  ]
  return _write(tmp_path / "c.jsonl", ("\n".join(lines) + "\n").encode())


def _to_examples(record):
  i, n = map(int, record["text"].split())
  ids = [1, 1000 + i, *range(3, 3 + n), 2]
  return [pipeline.causal_example(ids)]


LAYOUT = dict(seq_len=16, batch_size=4, seed=5, pad_id=0)


@pytest.mark.parametrize("packing", [True, False])
def test_stream_batches_equal_the_eager_ones(tmp_path, packing):
  """In file order (no shuffle), one process: the streamed batches are the
  eager pipeline's, pieces of split records included, up to where the
  eager one-epoch iterator ends."""
  path = _corpus(tmp_path)
  src = stream.JsonlSource(path)
  it, padding = pipeline.make_stream_iter(
    src, _to_examples, shuffle=False, packing=packing, **LAYOUT
  )
  examples = [e for i in range(len(src)) for e in _to_examples(src[i])]
  eager = list(
    pipeline.make_train_iter(
      examples, shuffle=False, packing=packing, num_epochs=1, **LAYOUT
    )
  )
  assert len(eager) > 10
  for n, want in enumerate(eager[:-1]):  # the last one is padded at the end
    got = next(it)
    assert sorted(got) == sorted(want)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=f"{n} {k}")
  assert not padding["weights"].any() and not padding["segment_ids"].any()
  assert padding["inputs"].shape == (4, 16)


def _record_ids(batch):
  inputs = batch["inputs"]
  return set(inputs[(inputs >= 1000)].tolist())


def test_shards_are_disjoint_and_cover_every_record(tmp_path):
  path = _corpus(tmp_path, n=101)
  src = stream.JsonlSource(path)
  seen = []
  for shard in range(2):
    it, _ = pipeline.make_stream_iter(
      src,
      _to_examples,
      shuffle=True,
      shard_index=shard,
      shard_count=2,
      **LAYOUT,
    )
    ids = set()
    for _ in range(60):  # well past one epoch of this shard
      ids |= _record_ids(next(it))
    seen.append(ids)
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(1000, 1101))
  assert len(seen[0]) == 51  # records 0, 2, 4, ...


@pytest.mark.parametrize("threads", [0, 2])
def test_stream_state_resumes_exactly(tmp_path, threads):
  path = _corpus(tmp_path)
  src = stream.JsonlSource(path)

  def make():
    return pipeline.make_stream_iter(
      src, _to_examples, shuffle=True, read_threads=threads, **LAYOUT
    )[0]

  it = make()
  for _ in range(7):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # as checkpointed
  want = [next(it) for _ in range(30)]  # across an epoch boundary
  resumed = make()
  resumed.set_state(state)
  for a, b in zip(want, (next(resumed) for _ in range(30)), strict=True):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("threads", [0, 2])
def test_a_bad_record_stops_the_stream_naming_it(tmp_path, threads):
  """Read in the reader threads too, the error is the DataError itself."""
  lines = [json.dumps({"text": f"{i} 3"}) for i in range(20)] + ['{"text": 7}']
  path = _write(tmp_path / "c.jsonl", ("\n".join(lines) + "\n").encode())
  it, _ = pipeline.make_stream_iter(
    stream.JsonlSource(path, ("text",)),
    _to_examples,
    shuffle=False,
    read_threads=threads,
    **LAYOUT,
  )
  with pytest.raises(jsonl.DataError, match=f"{path}:21: field 'text'"):
    for _ in range(50):
      next(it)


def test_tokenizer_corpus_stops_at_its_limit(tmp_path, capsys):
  text = "x" * 1000
  lines = [json.dumps({"text": text}) for _ in range(3000)]  # ~3 MB
  path = _write(tmp_path / "c.jsonl", ("\n".join(lines) + "\n").encode())
  got = list(sources.corpus_texts(path, limit_mb=1))
  assert len(got) == 2**20 // 1000 + 1
  assert "first 1 MB" in capsys.readouterr().out
  assert len(list(sources.corpus_texts(path))) == 3000


def _errors(config):
  with pytest.raises(errors.ConfigError) as e:
    validate.validate(config)
  return str(e.value)


def test_config_refuses_streaming_where_it_cannot_work(suite_dir):
  msg = _errors(tiny_config(suite_dir, "dpo", **{"data.streaming": True}))
  assert "config.data.streaming" in msg and "clm, mlm" in msg
  msg = _errors(
    tiny_config(suite_dir, **{"data.streaming": True, "data.num_epochs": 1})
  )
  assert "config.data.streaming" in msg and "total_steps" in msg


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_streamed_run_trains_on_the_eager_data_and_resumes(
  suite_dir, tmp_path, capsys
):
  """Unshuffled, a streamed run sees the eager run's batches, so its losses
  are the same; stopped after step 2 and resumed, it still is."""
  kw = {"data.shuffle": False, "total_steps": 4, "eval_every": 0}
  kw["checkpoint_every"] = 2
  eager = str(tmp_path / "eager")
  train.run(tiny_config(suite_dir, **kw), eager)
  streamed = str(tmp_path / "streamed")
  config = tiny_config(suite_dir, **kw, **{"data.streaming": True})
  train.run(config, streamed, stop_after=2)
  capsys.readouterr()
  train.run(config, streamed)
  assert "Resuming" in capsys.readouterr().out
  a, b = _losses(eager), _losses(streamed)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4]
  for s in a:
    np.testing.assert_allclose(b[s], a[s], rtol=1e-6, err_msg=f"step {s}")
