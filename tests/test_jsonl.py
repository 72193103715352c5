"""Hostile data files: every bad line is a DataError naming file and line.

Regression tests for each way a file can be bad, then property-based fuzzing
(hypothesis) that read_jsonl either returns every record written or raises
DataError, and never any other exception.
"""

import json
import math
import os
import re
import sys
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jft.data import hf_meta, jsonl
from jft.data import tokenizer as tok_lib
from jft.data.jsonl import DataError, read_jsonl
from jft.errors import UserError

BOM = b"\xef\xbb\xbf"
DEEP_ARRAY = "[" * 100_000
DEEP_OBJECT = '{"a":' * 5000 + "1" + "}" * 5000


def _write(tmp_path, data: bytes, name="d.jsonl") -> str:
  path = tmp_path / name
  path.write_bytes(data)
  return str(path)


def _raises_at(path: str, lineno: int, what: str, **kw):
  """read_jsonl(path) raises a DataError naming `path:lineno` and `what`."""
  with pytest.raises(DataError) as e:
    read_jsonl(path, **kw)
  assert f"{path}:{lineno}:" in str(e.value)
  assert what in str(e.value)
  return e.value


def test_data_error_is_a_user_error():
  assert issubclass(DataError, UserError)
  assert issubclass(DataError, ValueError)


# ------------------------------------------------------------- regressions


def test_bom_is_accepted(tmp_path):
  path = _write(tmp_path, BOM + b'{"text": "a"}\n{"text": "b"}\n')
  got = read_jsonl(path, ["text"])
  assert got == [{"text": "a"}, {"text": "b"}]
  assert all("\ufeff" not in k for r in got for k in r)
  assert got[0].where == f"{path}:1"


def test_bom_of_concatenated_files_is_accepted(tmp_path):
  """`cat a.jsonl b.jsonl` of two Windows files: a BOM starts line 2."""
  path = _write(tmp_path, BOM + b'{"text": "a"}\n' + BOM + b'{"text": "b"}\n')
  assert read_jsonl(path, ["text"]) == [{"text": "a"}, {"text": "b"}]


@pytest.mark.parametrize(
  "line",
  [DEEP_ARRAY, DEEP_ARRAY + "]" * 100_000, DEEP_OBJECT],
  ids=["array", "closed_array", "object"],
)
def test_deep_nesting(tmp_path, line):
  path = _write(tmp_path, f'{{"text": "a"}}\n{line}\n'.encode())
  _raises_at(path, 2, "nested too deeply")


def test_invalid_utf8(tmp_path):
  path = _write(tmp_path, b'{"text": "a"}\n\n{"text": "\xff\xfe"}\n')
  _raises_at(path, 3, "not valid UTF-8")


def test_truncated_last_line(tmp_path):
  path = _write(tmp_path, b'{"text": "a"}\n{"text": "b')
  err = _raises_at(path, 2, "invalid JSON")
  assert "cut short" in str(err)


def test_last_line_without_newline_is_fine(tmp_path):
  path = _write(tmp_path, b'{"text": "a"}\r\n{"text": "b"}')
  assert read_jsonl(path, ["text"]) == [{"text": "a"}, {"text": "b"}]


@pytest.mark.parametrize(
  "line, kind",
  [("[1, 2]", "list"), ("5", "int"), ('"s"', "str"), ("null", "NoneType")],
)
def test_non_object_line(tmp_path, line, kind):
  path = _write(tmp_path, f'{{"text": "a"}}\n{line}\n'.encode())
  _raises_at(path, 2, f"expected a JSON object, got {kind}")


@pytest.mark.parametrize(
  "line, what",
  [
    ('{"other": "b"}', "missing required field 'text'"),
    ('{"text": 5}', "field 'text' must be a string, got int"),
    ('{"text": null}', "field 'text' must be a string, got NoneType"),
    ('{"text": ["a"]}', "field 'text' must be a string, got list"),
    ('{"text": NaN}', "field 'text' must be a string, got float"),
    ('{"text": ""}', "field 'text' is empty"),
  ],
)
def test_required_field(tmp_path, line, what):
  path = _write(tmp_path, f'{{"text": "a"}}\n\n{line}\n'.encode())
  _raises_at(path, 3, what, required=["text"])


def test_lone_surrogate_escape(tmp_path):
  """JSON allows "\\ud800"; it is not text and would break tokenizing."""
  path = _write(tmp_path, b'{"text": "a"}\n{"text": "x\\ud800"}\n')
  _raises_at(path, 2, "surrogate")
  ok = _write(tmp_path, b'{"text": "\\ud83d\\ude00 \\\\ud800"}\n', "ok.jsonl")
  assert read_jsonl(ok, ["text"]) == [{"text": "\U0001f600 \\ud800"}]


@pytest.mark.skipif(
  not hasattr(sys, "get_int_max_str_digits"), reason="no int digit limit"
)
def test_huge_integer(tmp_path):
  digits = sys.get_int_max_str_digits()
  if not digits:
    pytest.skip("int digit limit disabled")
  path = _write(tmp_path, b'{"text": "a", "n": 1' + b"0" * digits + b"}\n")
  _raises_at(path, 1, "invalid JSON")


def test_nan_in_other_fields_is_kept(tmp_path):
  """json.loads accepts NaN/Infinity; required fields are strings, so they
  can only sit in fields their objective checks itself."""
  path = _write(tmp_path, b'{"text": "a", "x": NaN, "y": -Infinity}\n')
  (got,) = read_jsonl(path, ["text"])
  assert math.isnan(got["x"]) and got["y"] == -math.inf


def test_directory_is_not_a_file(tmp_path):
  with pytest.raises(DataError, match="not found"):
    read_jsonl(str(tmp_path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path):
  path = _write(tmp_path, b'{"text": "a"}\n')
  os.chmod(path, 0)
  with pytest.raises(DataError, match="cannot read"):
    read_jsonl(path)


def test_read_jsonl_files_names_the_bad_file(tmp_path):
  good = _write(tmp_path, b'{"text": "a"}\n', "good.jsonl")
  bad = _write(tmp_path, b'{"text": "a"}\n' + DEEP_ARRAY.encode(), "bad.jsonl")
  with pytest.raises(DataError, match=re.escape(f"{bad}:2:")):
    jsonl.read_jsonl_files(f"{good},{bad}", ["text"])


def test_load_json_bytes():
  assert jsonl.load_json_bytes(BOM + b'{"a": 1}', "f.json") == {"a": 1}
  for raw, what in [
    (DEEP_OBJECT.encode(), "nested too deeply"),
    (b'{"a": "\xff"}', "not valid UTF-8"),
    (b'{"a": ', "invalid JSON"),
  ]:
    with pytest.raises(DataError, match=f"^f.json: .*{what}"):
      jsonl.load_json_bytes(raw, "f.json")


# ---------------------------------------------------------- other readers


@pytest.mark.parametrize(
  "data, lineno, what",
  [
    (b'{"text": "a"}\n[1]\n', 2, "expected a JSON object"),
    (b'{"text": "a"}\n{"t": "b"}\n', 2, "missing field 'text'"),
    (b'{"text": "a"}\n\n{"text": 3}\n', 3, "must be a string, got int"),
    (b'{"text": "a"}\n' + DEEP_ARRAY.encode(), 2, "nested too deeply"),
    (b'{"text": "\xff"}\n', 1, "not valid UTF-8"),
  ],
)
def test_tokenizer_corpus_jsonl(tmp_path, data, lineno, what):
  path = _write(tmp_path, data)
  with pytest.raises(DataError) as e:
    list(tok_lib._file_lines(path, "text"))
  assert f"{path}:{lineno}:" in str(e.value) and what in str(e.value)


def test_tokenizer_corpus_text_lines(tmp_path):
  path = _write(tmp_path, BOM + b"one\r\ntwo\rthree\n\n  \nfour", "c.txt")
  assert list(tok_lib._file_lines(path, "text")) == [
    "one",
    "two",
    "three",
    "four",
  ]
  bad = _write(tmp_path, b"one\ntw\xc3o\n", "bad.txt")
  with pytest.raises(DataError, match=re.escape(f"{bad}:2: not valid UTF-8")):
    list(tok_lib._file_lines(bad, None))


def test_train_tokenizer_raises_data_error(tmp_path):
  """SentencePiece wraps its iterator's errors in RuntimeError; the user
  still gets the DataError with file and line."""
  path = _write(tmp_path, b'{"text": "hello world"}\n{"text": 5}\n')
  out = str(tmp_path / "t.model")
  with pytest.raises(DataError, match=re.escape(f"{path}:2:")):
    tok_lib.train_tokenizer(files=[path], output_path=out, vocab_size=40)
  assert not os.path.exists(out)


@pytest.mark.parametrize(
  "raw, what",
  [
    (DEEP_ARRAY.encode(), "nested too deeply"),
    (b'{"eos_token": "\xff"}', "not valid UTF-8"),
    (b'{"eos_token": ', "invalid JSON"),
    (b"[1]", "must hold a JSON object"),
  ],
)
def test_hf_meta_bad_json(raw, what):
  for name in (hf_meta.CONFIG_FILE, hf_meta.GENERATION_FILE):
    with pytest.raises(DataError) as e:
      hf_meta.HFFiles("/m", {name: raw})
    assert os.path.join("/m", name) in str(e.value) and what in str(e.value)


def test_hf_meta_bom_and_bad_template():
  raw = {hf_meta.CONFIG_FILE: BOM + b'{"eos_token": "</s>"}'}
  assert hf_meta.HFFiles("/m", raw).token("eos_token")[0] == "</s>"
  files = hf_meta.HFFiles("/m", {hf_meta.TEMPLATE_FILE: b"{{ x \xff }}"})
  with pytest.raises(DataError, match="chat_template.jinja: not valid UTF-8"):
    files.chat_template()


def test_generate_prompts(tmp_path):
  from jft.generate import _read_prompts

  path = _write(tmp_path, b'{"prompt": "a"}\n{"messages": "hi"}\n')
  with pytest.raises(DataError, match=re.escape(f"{path}:2:")):
    _read_prompts(path)
  path = _write(tmp_path, BOM + b'{"prompt": "a"}\n{"text": "b"}\n', "p.jsonl")
  with pytest.raises(DataError, match=re.escape(f"{path}:2:")):
    _read_prompts(path)


# ----------------------------------------------------------------- fuzzing

FUZZ = settings(max_examples=200, deadline=None, database=None)

# Bytes that mean something to a JSONL reader, so random files get past the
# first character often enough to exercise the parser.
_PIECES = [
  b"{",
  b"}",
  b"[",
  b"]",
  b'"',
  b":",
  b",",
  b"\n",
  b"\r\n",
  b" ",
  b"1",
  b"-1e999",
  b"NaN",
  b"null",
  b'"text"',
  b"\\u",
  b"d800",
  b"\\",
  BOM,
  b"\xff",
  b"\xc3",
  b"\xe2\x80\xa8",
]
jsonish_bytes = st.lists(st.sampled_from(_PIECES), max_size=60).map(b"".join)

leaves = (
  st.none()
  | st.booleans()
  | st.integers()
  | st.floats(allow_nan=False)
  | st.text(max_size=12)
)
json_values = st.recursive(
  leaves,
  lambda kids: (
    st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids)
  ),
  max_leaves=12,
)
objects = st.dictionaries(st.text(max_size=6), json_values, max_size=5)


def _read(data: bytes, **kw):
  """(path, records or the DataError) for `data` written to a temp file;
  any other exception fails the test."""
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "f.jsonl")
    with open(path, "wb") as f:
      f.write(data)
    try:
      records = read_jsonl(path, **kw)
    except DataError as e:
      assert str(e).startswith(f"{path}"), e
      return path, e
  assert isinstance(records, list) and records
  assert all(isinstance(r, dict) for r in records)
  assert all(r.where.startswith(f"{path}:") for r in records)
  return path, records


@FUZZ
@given(st.binary(max_size=200) | jsonish_bytes)
def test_fuzz_random_bytes(data):
  _read(data)
  _read(data, required=["text"])


def _serialise(values, bom, ascii_only, crlf, blank_every):
  """JSONL bytes of `values`, and the 1-based line number of each value."""
  lines, numbers = [], []
  for i, v in enumerate(values):
    if blank_every and i % blank_every == 1:
      lines.append("  ")
    lines.append(json.dumps(v, ensure_ascii=ascii_only))
    numbers.append(len(lines))
  end = "\r\n" if crlf else "\n"
  data = "".join(line + end for line in lines).encode("utf-8")
  return (BOM if bom else b"") + data, numbers


@FUZZ
@given(
  st.lists(objects | json_values, min_size=1, max_size=6),
  st.booleans(),
  st.booleans(),
  st.booleans(),
  st.integers(0, 3),
)
def test_fuzz_json_values(values, bom, ascii_only, crlf, blank_every):
  """Unbroken files: every object comes back, equal and in order, or the
  first non-object line is named."""
  data, numbers = _serialise(values, bom, ascii_only, crlf, blank_every)
  path, got = _read(data)
  pairs = zip(values, numbers, strict=True)
  bad = [n for v, n in pairs if not isinstance(v, dict)]
  if bad:
    assert isinstance(got, DataError)
    assert f"{path}:{bad[0]}: expected a JSON object" in str(got)
  else:
    assert got == values
    assert [r.where for r in got] == [f"{path}:{n}" for n in numbers]


@FUZZ
@given(st.lists(objects, min_size=1, max_size=6), st.data())
def test_fuzz_broken_line(values, data):
  """One line cut short or given a stray byte: records or DataError."""
  raw, _ = _serialise(
    values, data.draw(st.booleans()), data.draw(st.booleans()), False, 0
  )
  lines = raw.split(b"\n")[:-1]
  i = data.draw(st.integers(0, len(lines) - 1))
  cut = data.draw(st.integers(0, len(lines[i])))
  if data.draw(st.booleans()):
    lines[i] = lines[i][:cut]
  else:
    lines[i] = lines[i][:cut] + data.draw(st.sampled_from(_PIECES))
  last = i == len(lines) - 1 and data.draw(st.booleans())
  tail = b"" if last else b"\n"  # a cut-off final line has no newline
  _read(b"\n".join(lines) + tail)
