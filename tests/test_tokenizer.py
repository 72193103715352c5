"""Tests for jft.data.tokenizer: ids, losslessness, determinism, errors, CLI."""

import io
import json
import pickle

import numpy as np
import pytest
import sentencepiece as spm

from jft.data import tasks
from jft.data import tokenizer as tokenizer_lib


def _task_strings(n_per_task=100):
  out = []
  for task in tasks.TASKS:
    for ex in tasks.generate(task, n_per_task, seed=0, split="train"):
      out += [ex["prompt"] + ex["completion"], ex["prompt"], ex["completion"]]
  return out


@pytest.fixture(scope="module")
def strings():
  return _task_strings()


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory, strings):
  path = str(tmp_path_factory.mktemp("tok") / "tok.model")
  tokenizer_lib.train_tokenizer(strings, output_path=path, vocab_size=512)
  return path


@pytest.fixture(scope="module")
def tok(tok_path):
  return tokenizer_lib.Tokenizer.load(tok_path)


def test_special_ids(tok):
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
  assert tok.mask_id == 4
  assert tok.id_to_piece(4) == "[MASK]"
  assert 256 < tok.vocab_size <= 512  # 256 byte pieces + specials + merges.


def test_digits_are_single_tokens(tok):
  for d in "0123456789":
    ids = tok.encode(d)
    assert len(ids) == 1 and tok.id_to_piece(ids[0]) == d
  pieces = [tok.id_to_piece(i) for i in tok.encode("add: 907 + 12 =")]
  digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
  assert [p.lstrip("\u2581") for p in digit_pieces] == list("90712")


def test_round_trip(tok, strings):
  extra = ["  two  spaces\tand\nnewline", " lead", "trail ", "é 中 🙂", ""]
  for s in strings + extra:
    assert tok.decode(tok.encode(s)) == s, s


def test_encode_has_no_bos_eos_and_decode_skips_specials(tok):
  ids = tok.encode("copy: a b =")
  assert tok.bos_id not in ids and tok.eos_id not in ids
  padded = [tok.bos_id] + ids + [tok.eos_id, tok.pad_id, tok.pad_id]
  assert tok.decode(np.asarray(padded)) == "copy: a b ="


def test_separate_encoding_matches_joint(tok):
  """No dummy prefix: prompt ids + completion ids == ids of the whole text."""
  for task in tasks.TASKS:
    for ex in tasks.generate(task, 50, seed=1, split="eval"):
      joint = tok.encode(ex["prompt"] + ex["completion"])
      assert tok.encode(ex["prompt"]) + tok.encode(ex["completion"]) == joint


def test_training_is_deterministic(tmp_path, strings, tok_path):
  other = tmp_path / "again.model"
  tokenizer_lib.train_tokenizer(
    iter(strings), output_path=str(other), vocab_size=512
  )
  with open(tok_path, "rb") as f:
    assert other.read_bytes() == f.read()


def test_train_from_files_matches_in_memory(tmp_path, strings, tok_path):
  half = len(strings) // 2
  jsonl = tmp_path / "a.jsonl"
  jsonl.write_text(
    "".join(json.dumps({"text": s}) + "\n" for s in strings[:half])
  )
  txt = tmp_path / "b.txt"
  txt.write_text("".join(s + "\n" for s in strings[half:]))
  out = tmp_path / "f.model"
  tokenizer_lib.train_tokenizer(
    files=[str(jsonl), str(txt)], output_path=str(out), vocab_size=512
  )
  with open(tok_path, "rb") as f:
    assert out.read_bytes() == f.read()


def test_load_missing_file(tmp_path):
  path = str(tmp_path / "nope.model")
  with pytest.raises(FileNotFoundError, match="nope.model"):
    tokenizer_lib.Tokenizer.load(path)


def test_load_non_model_file(tmp_path):
  path = tmp_path / "junk.model"
  path.write_bytes(b"this is not a sentencepiece model")
  with pytest.raises(ValueError, match="junk.model.*not a valid SentencePiece"):
    tokenizer_lib.Tokenizer.load(str(path))


def _raw_spm(tmp_path, name, **kwargs):
  """A model trained by SentencePiece directly, outside jft's conventions."""
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(_task_strings(20)),
    model_writer=buf,
    vocab_size=60,
    hard_vocab_limit=False,
    num_threads=1,
    minloglevel=2,
    **kwargs,
  )
  path = tmp_path / name
  path.write_bytes(buf.getvalue())
  return str(path)


def test_no_mask_piece_raises_clear_error(tmp_path):
  path = _raw_spm(
    tmp_path, "nomask.model", pad_id=0, unk_id=1, bos_id=2, eos_id=3
  )
  tok = tokenizer_lib.Tokenizer.load(path)
  assert (tok.pad_id, tok.eos_id) == (0, 3)
  with pytest.raises(ValueError, match=r"no mask token.*train_tokenizer"):
    _ = tok.mask_id


def test_missing_pad_rejected(tmp_path):
  path = _raw_spm(tmp_path, "nopad.model")  # SentencePiece default: pad=-1.
  with pytest.raises(ValueError, match=r"nopad.model.*pad_id=-1"):
    tokenizer_lib.Tokenizer.load(path)


def test_pad_equal_eos_rejected(tmp_path, tok_path):
  # SentencePiece's trainer refuses pad == eos, so edit a model's proto.
  model_pb2 = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
  proto = model_pb2.ModelProto()
  with open(tok_path, "rb") as f:
    proto.ParseFromString(f.read())
  proto.trainer_spec.pad_piece = "</s>"
  path = tmp_path / "padeos.model"
  path.write_bytes(proto.SerializeToString())
  with pytest.raises(ValueError, match=r"padeos.model.*pad_id == eos_id == 3"):
    tokenizer_lib.Tokenizer.load(str(path))


def test_pickle_round_trip(tok, strings):
  clone = pickle.loads(pickle.dumps(tok))
  assert clone._sp_cache is None  # Rebuilt lazily, not pickled.
  assert clone.vocab_size == tok.vocab_size and clone.mask_id == tok.mask_id
  for s in strings[:50]:
    assert clone.encode(s) == tok.encode(s)


def test_cli(tmp_path, strings, tok_path):
  jsonl = tmp_path / "in.jsonl"
  jsonl.write_text("".join(json.dumps({"t": s}) + "\n" for s in strings))
  out = tmp_path / "cli.model"
  tok = tokenizer_lib.main(
    [
      "prog",
      f"--input={jsonl}",
      "--field=t",
      "--vocab_size=512",
      f"--output={out}",
    ]
  )
  assert tok.mask_id == 4
  with open(tok_path, "rb") as f:  # Same texts -> the same model.
    assert out.read_bytes() == f.read()


def test_cli_requires_output(tmp_path):
  with pytest.raises(SystemExit):
    tokenizer_lib.main(["prog", "--input=x.txt"])
