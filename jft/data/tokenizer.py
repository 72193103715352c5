"""Tokenizers: the interface jft uses, loading, and jft's SentencePiece models
(a picklable wrapper, training, and a small CLI).

Trained models (`train_tokenizer`) have fixed special ids, pad=0, unk=1, bos=2,
eos=3, [MASK]=4 (for MLM), and are lossless: identity normalisation, no
whitespace collapsing, byte fallback for unseen characters, so
decode(encode(s)) == s. There is no dummy prefix: encoding a prompt and its
completion (" answer") separately gives the same ids as encoding them joined,
which SFT/DPO masking relies on. Digits are split into single tokens, so
arithmetic is over digits rather than over arbitrary BPE merges of numbers.

The tokenizer interface (`TextTokenizer`) is what the rest of jft calls;
this SentencePiece `Tokenizer` and, for Hugging Face checkpoints,
`jft.data.hf_tokenizer.HFTokenizer` (tokenizer.json) and
`HFSentencePieceTokenizer` (tokenizer.model) implement it:

  vocab_size      every id, added tokens included
  pad_id          int; bos_id: int | None; eos_id: the primary eos
  eos_ids         every id that ends generation (eos first)
  unk_id          int | None; mask_id raises when there is none
  bos_prefix      ids a sequence starts with ([bos], or [] e.g. for Qwen)
  encode(text)    ids, no special tokens added
  decode(ids)     text, special tokens skipped (numpy arrays accepted)
  id_to_piece(i)
  encode_segments(texts)
                  ids of "".join(texts), split per text; their concatenation
                  is the tokenization sequences are trained on
  chat_template   Jinja source or None; apply_chat_template(messages,
                  add_generation_prompt=False, **kwargs) -> str
  files, save(directory)
                  the tokenizer's own files ({name: bytes}), written
                  atomically, so workdirs and exported checkpoints carry them
  picklable       (grain workers): bytes travel, the backend is rebuilt

`load_tokenizer_dir(path)` (a checkpoint or workdir) and
`load_tokenizer_file(path)` return the right one.

CLI:
  python -m jft.data.tokenizer --input=a.jsonl,b.txt --field=text \
      --vocab_size=512 --output=tok.model
"""

from __future__ import annotations

import io
import itertools
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import sentencepiece as spm
from absl import flags

from jft.data.hf_meta import CONFIG_FILE
from jft.data.hf_tokenizer import (
  JSON_FILE,
  HFSentencePieceTokenizer,
  HFTokenizer,
)
from jft.data.jsonl import DataError, iter_lines, parse_object
from jft.data.tokenizer_util import load_sp, save_files, write_bytes_atomic

__all__ = [
  "MODEL_FILE",
  "TextTokenizer",
  "Tokenizer",
  "load_tokenizer_dir",
  "load_tokenizer_file",
  "train_tokenizer",
  "write_bytes_atomic",
]

MASK_PIECE = "[MASK]"
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MODEL_FILE = "tokenizer.model"
TOKENIZER_FILES = (JSON_FILE, MODEL_FILE)  # in order of preference


class TextTokenizer(Protocol):
  """What jft needs of a tokenizer (see the module docstring)."""

  @property
  def vocab_size(self) -> int: ...
  @property
  def pad_id(self) -> int: ...
  @property
  def bos_id(self) -> int | None: ...
  @property
  def eos_id(self) -> int: ...
  @property
  def eos_ids(self) -> tuple[int, ...]: ...
  @property
  def unk_id(self) -> int | None: ...
  @property
  def mask_id(self) -> int: ...
  @property
  def bos_prefix(self) -> list[int]: ...
  @property
  def chat_template(self) -> str | None: ...
  @property
  def files(self) -> dict[str, bytes]: ...

  def encode(self, text: str) -> list[int]: ...
  def decode(self, ids: Iterable[int]) -> str: ...
  def id_to_piece(self, i: int) -> str: ...
  def encode_segments(self, texts: Sequence[str]) -> list[list[int]]: ...
  def apply_chat_template(
    self,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = False,
    **kwargs,
  ) -> str: ...
  def save(self, directory: str | os.PathLike) -> list[str]: ...


class Tokenizer:
  """A SentencePiece model held as serialized bytes, so it pickles cheaply.

  The C++ processor is not picklable; it is rebuilt lazily after unpickling
  (e.g. in grain worker processes).
  """

  def __init__(self, model_proto: bytes, name: str = "<in-memory model>"):
    self._proto = bytes(model_proto)
    self._name = name
    self._sp_cache: spm.SentencePieceProcessor | None = None
    self._validate()

  @classmethod
  def load(cls, path: str | os.PathLike) -> Tokenizer:
    path = os.fspath(path)
    if not os.path.exists(path):
      raise FileNotFoundError(f"Tokenizer model file not found: {path!r}.")
    with open(path, "rb") as f:
      return cls(f.read(), name=path)

  @property
  def model_proto(self) -> bytes:
    """The serialized model (what a `.model` file holds)."""
    return self._proto

  # -- pickling: bytes travel, the processor is rebuilt on first use.
  def __getstate__(self) -> dict:
    return {"proto": self._proto, "name": self._name}

  def __setstate__(self, state: dict) -> None:
    self._proto = state["proto"]
    self._name = state["name"]
    self._sp_cache = None

  @property
  def _sp(self) -> spm.SentencePieceProcessor:
    if self._sp_cache is None:
      self._sp_cache = load_sp(self._proto, self._name)
    return self._sp_cache

  def _validate(self) -> None:
    ids = {"pad_id": self.pad_id, "bos_id": self.bos_id, "eos_id": self.eos_id}
    for key, value in ids.items():
      if value < 0:
        raise ValueError(
          f"Tokenizer {self._name!r} has no {key[:-3]} token ({key}="
          f"{value}); jft needs pad, bos and eos. Train one with "
          "jft.data.tokenizer.train_tokenizer, or, for a Hugging Face "
          "checkpoint's tokenizer.model, load its directory (with "
          "tokenizer_config.json) by jft.data.tokenizer.load_tokenizer_dir."
        )
    if self.pad_id == self.eos_id:
      raise ValueError(
        f"Tokenizer {self._name!r} has pad_id == eos_id == {self.pad_id}; "
        "jft masks padding by id, so pad must differ from eos."
      )

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  @property
  def mask_id(self) -> int:
    i = self._sp.piece_to_id(MASK_PIECE)
    if self._sp.id_to_piece(i) != MASK_PIECE:  # Unknown pieces map to unk.
      raise ValueError(
        f"Tokenizer {self._name!r} has no mask token {MASK_PIECE!r}, which "
        "MLM needs. Train one with jft.data.tokenizer.train_tokenizer (it "
        f"always reserves {MASK_PIECE}), or pass "
        f"user_defined_symbols=['{MASK_PIECE}'] to SentencePiece."
      )
    return i

  def encode(self, text: str) -> list[int]:
    """Ids of `text`, without bos/eos (callers add them where they belong)."""
    return self._sp.encode(text, out_type=int)

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`, skipping pad/bos/eos (accepts numpy arrays too)."""
    special = {self.pad_id, self.bos_id, self.eos_id}
    return self._sp.decode([int(i) for i in ids if int(i) not in special])

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  @property
  def name(self) -> str:
    return self._name

  @property
  def eos_ids(self) -> tuple[int, ...]:
    return (self.eos_id,)

  @property
  def bos_prefix(self) -> list[int]:
    return [self.bos_id]

  def encode_segments(self, texts: Sequence[str]) -> list[list[int]]:
    """Ids of each text, encoded apart.

    jft's models have no dummy prefix and split digits, so a prompt and its
    completion tokenize the same apart as joined (tests/test_tokenizer.py
    checks it on the built-in suite); encoding apart is also how a prompt is
    encoded for generation.
    """
    return [self.encode(t) for t in texts]

  @property
  def chat_template(self) -> None:
    return None

  def apply_chat_template(self, messages, add_generation_prompt=False, **kw):
    raise ValueError(
      f"Tokenizer {self._name!r} has no chat template; jft's own models use "
      "the role table config.sft.chat_template (config.sft.template='table')."
    )

  @property
  def files(self) -> dict[str, bytes]:
    return {MODEL_FILE: self._proto}

  def save(self, directory: str | os.PathLike) -> list[str]:
    """Writes `tokenizer.model` into `directory` (atomically)."""
    return save_files(self.files, directory)

  def __repr__(self) -> str:
    return f"Tokenizer({self._name!r}, vocab_size={self.vocab_size})"


# ------------------------------------------------------------------ training


def _file_lines(path: str, field: str | None) -> Iterator[str]:
  """Texts of a file: `field` of each JSONL record, else each non-empty line.

  A bad byte, line or record is a DataError naming the file and line.
  """
  jsonl = field is not None and path.endswith(".jsonl")
  for where, line in iter_lines(path):
    if jsonl:
      yield _field_text(parse_object(line, where), field, where)
    else:  # universal newlines, as text-mode reading splits them
      text = line.replace("\r\n", "\n").replace("\r", "\n")
      yield from (t for t in text.split("\n") if t.strip())


def _field_text(record: dict, field: str, where: str) -> str:
  """`record[field]`, which SentencePiece needs to be a string."""
  if field not in record:
    raise DataError(f"{where}: missing field {field!r}")
  value = record[field]
  if not isinstance(value, str):
    kind = type(value).__name__
    raise DataError(f"{where}: field {field!r} must be a string, got {kind}")
  return value


def _keep_error(texts: Iterator[str], caught: list) -> Iterator[str]:
  """Yields `texts`, noting a DataError in `caught` before re-raising it:
  SentencePiece turns its iterator's exceptions into a RuntimeError."""
  try:
    yield from texts
  except DataError as e:
    caught.append(e)
    raise


def train_tokenizer(
  texts: Iterable[str] | None = None,
  *,
  files: Sequence[str] = (),
  output_path: str,
  vocab_size: int = 512,
  model_type: str = "bpe",
  user_defined_symbols: Sequence[str] = (),
  field: str = "text",
) -> Tokenizer:
  """Train a SentencePiece model on `texts` and/or `files`; write it atomically.

  Files ending in `.jsonl` contribute their `field`; other files their lines.
  Training is deterministic (one thread, no input sampling or shuffling), so
  the same input gives a byte-identical model. `vocab_size` is an upper bound
  (`hard_vocab_limit=False`): a small corpus yields a smaller vocabulary rather
  than an error. With byte fallback, 256 byte pieces count towards it.
  """
  texts = iter(()) if texts is None else iter(texts)
  file_texts = (t for path in files for t in _file_lines(path, field))
  symbols = [MASK_PIECE] + [s for s in user_defined_symbols if s != MASK_PIECE]
  buf = io.BytesIO()
  caught: list[DataError] = []
  try:
    spm.SentencePieceTrainer.train(
      sentence_iterator=_keep_error(itertools.chain(texts, file_texts), caught),
      model_writer=buf,
      model_type=model_type,
      vocab_size=vocab_size,
      hard_vocab_limit=False,
      pad_id=PAD_ID,
      unk_id=UNK_ID,
      bos_id=BOS_ID,
      eos_id=EOS_ID,
      user_defined_symbols=symbols,
      split_digits=True,
      byte_fallback=True,
      character_coverage=1.0,
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      # Determinism: one thread, every sentence, in input order.
      num_threads=1,
      input_sentence_size=0,
      shuffle_input_sentence=False,
      minloglevel=2,
    )
  except RuntimeError:
    if caught:  # SentencePiece wrapped it; the user needs file and line
      raise caught[0] from None
    raise
  proto = buf.getvalue()
  tok = Tokenizer(proto, name=output_path)
  write_bytes_atomic(output_path, proto)
  return tok


# ------------------------------------------------------------------ loading


def load_tokenizer_dir(path: str | os.PathLike) -> TextTokenizer:
  """The tokenizer of a checkpoint or workdir directory.

  tokenizer.json (`HFTokenizer`) is preferred; else tokenizer.model: as a
  Hugging Face checkpoint's (`HFSentencePieceTokenizer`) when
  tokenizer_config.json is beside it, else as jft's own (`Tokenizer`,
  strict). Raises FileNotFoundError naming the directory and the files
  looked for.
  """
  path = os.fspath(path)
  for name in TOKENIZER_FILES:
    file = os.path.join(path, name)
    if os.path.isfile(file):
      return load_tokenizer_file(file)
  looked = ", ".join(TOKENIZER_FILES)
  raise FileNotFoundError(
    f"No tokenizer in {path!r}: looked for {looked}"
    + ("" if os.path.isdir(path) else " (the directory does not exist)")
  )


def load_tokenizer_file(path: str | os.PathLike) -> TextTokenizer:
  """A tokenizer from one file: a `.json` (tokenizer.json) or a `.model`
  (SentencePiece); the HF JSON files beside it are read as in
  `load_tokenizer_dir`. A directory is passed to `load_tokenizer_dir`."""
  path = os.fspath(path)
  if os.path.isdir(path):
    return load_tokenizer_dir(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Tokenizer file not found: {path!r}.")
  if path.endswith(".json"):
    return HFTokenizer.load(path)
  directory = os.path.dirname(path) or "."
  if os.path.isfile(os.path.join(directory, CONFIG_FILE)):
    return HFSentencePieceTokenizer.load(path)
  return Tokenizer.load(path)


# ----------------------------------------------------------------------- CLI


def _make_flags() -> flags.FlagValues:
  # Private FlagValues: importing this module must not register global flags
  # that could clash with jft.main's.
  fv = flags.FlagValues()
  flags.DEFINE_list(
    "input", None, "Comma-separated input files.", flag_values=fv
  )
  flags.DEFINE_string(
    "field", "text", "Field of .jsonl records.", flag_values=fv
  )
  flags.DEFINE_integer("vocab_size", 512, "Max vocab size.", flag_values=fv)
  flags.DEFINE_string(
    "model_type", "bpe", "bpe|unigram|char|word.", flag_values=fv
  )
  flags.DEFINE_string("output", None, "Output .model path.", flag_values=fv)
  flags.mark_flags_as_required(["input", "output"], flag_values=fv)
  return fv


def main(argv: Sequence[str]) -> Tokenizer:
  """Parse `argv` (argv[0] is the program name) and train a tokenizer."""
  fv = _make_flags()
  if "--help" in argv or "-h" in argv:
    print(fv.get_help())
    sys.exit(0)
  try:
    fv(list(argv))
  except flags.Error as e:
    sys.exit(f"{e}\nFlags:\n{fv.get_help()}")
  tok = train_tokenizer(
    files=fv.input,
    field=fv.field,
    output_path=fv.output,
    vocab_size=fv.vocab_size,
    model_type=fv.model_type,
  )
  print(f"Wrote {fv.output}: vocab_size={tok.vocab_size}")
  return tok


if __name__ == "__main__":
  from jft import cli

  cli.run_main(lambda: main(sys.argv))
