"""Hugging Face tokenizers behind jft's tokenizer interface.

`HFTokenizer` runs a checkpoint's `tokenizer.json` with the `tokenizers`
library (transformers is not needed at runtime) and reads the files beside
it (`jft.data.hf_meta`) the way transformers does:

* Special tokens: `bos_token`, `eos_token`, `pad_token`, `unk_token` (and
  `mask_token`) from `tokenizer_config.json` (strings or AddedToken dicts
  `{"content": ...}`), else `special_tokens_map.json`, else the ids in
  `generation_config.json` (`eos_token_id`, `bos_token_id`, `pad_token_id`).
  An explicit `"bos_token": null` means no bos (Qwen). Named special tokens
  that tokenizer.json lists only as plain vocabulary are made special, as
  transformers does, so text containing them encodes to one id and decoding
  skips them.
* `eos_ids`: the eos, then `generation_config.json`'s `eos_token_id` list
  (Llama 3 instruct's <|eot_id|>, Gemma's <end_of_turn>).
* No pad token: pad = eos (what users expect; TRL does the same). This is
  safe in jft because loss masks come from per-token weights and segment
  ids, never from comparing ids with pad.
* `bos_prefix`: `add_bos_token` in tokenizer_config.json when it is set,
  else whatever tokenizer.json's post-processor adds before the text.
* The chat template: `chat_template.jinja`, else tokenizer_config.json's
  `chat_template` (a string, or a list of {"name", "template"} of which
  "default" is used), rendered by `jft.data.chat.render`.
* `decode` equals transformers' `decode(ids, skip_special_tokens=True)`.

tokenizer.json is used as written: transformers 5's model-specific classes
(e.g. LlamaTokenizer) rebuild the pre-tokenizer from the vocabulary, which
jft does not copy; parity is with `PreTrainedTokenizerFast`.

`HFSentencePieceTokenizer` serves checkpoints that ship only a SentencePiece
`tokenizer.model`: the same files give its special tokens (pad = eos when
there is none; `add_bos_token`, default True as for Llama and Gemma), and
special-token text is matched before SentencePiece sees the rest.

`jft.data.tokenizer.load_tokenizer_dir` / `load_tokenizer_file` pick the
right class: jft's own strict `Tokenizer` for a `tokenizer.model` with no
tokenizer_config.json beside it (a jft workdir), these classes otherwise.
"""

from __future__ import annotations

import bisect
import itertools
import os
import re
from collections.abc import Iterable

import sentencepiece as spm
import tokenizers

from jft.data.hf_meta import HFBase, HFFiles
from jft.data.tokenizer_util import load_sp

JSON_FILE = "tokenizer.json"
MODEL_FILE = "tokenizer.model"
# transformers applies clean_up_tokenization_spaces only to non-BPE models.
CLEANUP = (
  (" .", "."),
  (" ?", "?"),
  (" !", "!"),
  (" ,", ","),
  (" ' ", "'"),
  (" n't", "n't"),
  (" 'm", "'m"),
  (" 's", "'s"),
  (" 've", "'ve"),
  (" 're", "'re"),
)


def _int_ids(ids: Iterable[int]) -> list[int]:
  return [int(i) for i in ids]


class HFTokenizer(HFBase):
  """A `tokenizer.json` tokenizer (see the module docstring)."""

  def __init__(self, tokenizer_json: bytes, meta: HFFiles, name: str):
    self._json = bytes(tokenizer_json)
    self._meta = meta
    self._name = name
    self._backend_cache: tokenizers.Tokenizer | None = None
    self._resolve_ids()

  @classmethod
  def load(cls, path: str | os.PathLike) -> HFTokenizer:
    """From a tokenizer.json path; the HF files beside it are read too."""
    path = os.fspath(path)
    with open(path, "rb") as f:
      data = f.read()
    return cls(data, HFFiles.read(os.path.dirname(path) or "."), path)

  @property
  def _backend(self) -> tokenizers.Tokenizer:
    if self._backend_cache is None:
      self._backend_cache = _build_backend(self._json, self._meta, self._name)
    return self._backend_cache

  def _backend_file(self) -> dict[str, bytes]:
    return {JSON_FILE: self._json}

  def _token_id(self, text: str) -> int | None:
    i = self._backend.token_to_id(text)
    return self._meta.added_id(text) if i is None else i

  def _spans(self, text: str):
    enc = self._backend.encode(text, add_special_tokens=False)
    return enc.ids, enc.offsets

  def _probe_prefix(self) -> list[int]:
    """What the post-processor puts before the text when adding specials."""
    plain = self._backend.encode("Hello", add_special_tokens=False).ids
    full = self._backend.encode("Hello", add_special_tokens=True).ids
    for k in range(len(full) - len(plain) + 1):
      if full[k : k + len(plain)] == plain:
        return full[:k]
    return []

  @property
  def vocab_size(self) -> int:
    b = self._backend
    top = max(b.get_added_tokens_decoder(), default=-1)  # ids may skip
    return max(b.get_vocab_size(with_added_tokens=True), top + 1)

  def encode(self, text: str) -> list[int]:
    """Ids of `text`, no special tokens added (special-token text matches)."""
    return self._backend.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids` skipping special tokens, as transformers decodes."""
    text = self._backend.decode(_int_ids(ids), skip_special_tokens=True)
    cleanup = self._meta.config.get("clean_up_tokenization_spaces", False)
    if cleanup and type(self._backend.model).__name__ != "BPE":
      for a, b in CLEANUP:
        text = text.replace(a, b)
    return text

  def id_to_piece(self, i: int) -> str:
    return self._backend.id_to_token(int(i))


def _build_backend(data: bytes, meta: HFFiles, name: str):
  try:
    tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
  except Exception as e:  # the Rust errors carry no common Python type
    raise ValueError(f"{name} is not a valid tokenizer.json: {e}") from None
  tok.no_truncation()  # jft splits long documents itself
  tok.no_padding()
  have = {t.content for t in tok.get_added_tokens_decoder().values()}
  missing = [
    t
    for t in meta.special_texts
    if t not in have and tok.token_to_id(t) is not None
  ]
  if missing:
    new = tokenizers.AddedToken
    tok.add_special_tokens(
      [new(t, special=True, normalized=False) for t in missing]
    )
  return tok


class HFSentencePieceTokenizer(HFBase):
  """A Hugging Face checkpoint's SentencePiece `tokenizer.model`, with its
  special tokens from the HF files rather than jft's fixed ids."""

  def __init__(self, model_proto: bytes, meta: HFFiles, name: str):
    self._proto = bytes(model_proto)
    self._meta = meta
    self._name = name
    self._backend_cache: spm.SentencePieceProcessor | None = None
    self._special_re: re.Pattern | None = None  # set with the backend
    self._resolve_ids()

  @classmethod
  def load(cls, path: str | os.PathLike) -> HFSentencePieceTokenizer:
    path = os.fspath(path)
    with open(path, "rb") as f:
      data = f.read()
    return cls(data, HFFiles.read(os.path.dirname(path) or "."), path)

  @property
  def _backend(self) -> spm.SentencePieceProcessor:
    if self._backend_cache is None:
      sp = load_sp(self._proto, self._name)
      ids = {t: self._sp_id(sp, t) for t in self._meta.special_texts}
      known = [t for t, i in ids.items() if i is not None]
      specials = sorted(known, key=len, reverse=True)  # longest match first
      self._special_re = (
        re.compile("|".join(map(re.escape, specials))) if specials else None
      )
      self._backend_cache = sp
    return self._backend_cache

  @staticmethod
  def _sp_id(sp, text: str) -> int | None:
    i = sp.piece_to_id(text)
    return i if sp.id_to_piece(i) == text else None  # unknown -> unk

  def _backend_file(self) -> dict[str, bytes]:
    return {MODEL_FILE: self._proto}

  def _token_id(self, text: str) -> int | None:
    i = self._sp_id(self._backend, text)
    return self._meta.added_id(text) if i is None else i

  def _probe_prefix(self) -> list[int]:
    return [self._bos] if self._bos is not None else []  # add_bos default

  @property
  def vocab_size(self) -> int:
    return self._backend.get_piece_size()

  def _spans(self, text: str):
    """Ids and character spans; special-token text becomes its one id."""
    sp = self._backend
    ids, spans, pos = [], [], 0
    matches = self._special_re.finditer(text) if self._special_re else ()
    for m in itertools.chain(matches, [None]):
      end = m.start() if m else len(text)
      if end > pos:
        piece_ids, piece_spans = _sp_spans(sp, text[pos:end])
        ids += piece_ids
        spans += [(pos + a, pos + b) for a, b in piece_spans]
      if m:
        ids.append(self._sp_id(sp, m.group()))
        spans.append(m.span())
        pos = m.end()
    return ids, spans

  def encode(self, text: str) -> list[int]:
    return self._spans(text)[0]

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`, skipping control and special tokens."""
    sp = self._backend
    skip = {self._pad, self._eos, *self._eos_ids}
    skip |= {self._bos} if self._bos is not None else set()
    skip |= {self._sp_id(sp, t) for t in self._meta.special_texts}
    return sp.decode([i for i in _int_ids(ids) if i not in skip])

  def id_to_piece(self, i: int) -> str:
    return self._backend.id_to_piece(int(i))


def _sp_spans(sp, text: str) -> tuple[list[int], list[tuple[int, int]]]:
  """SentencePiece ids of `text` with each piece's character span."""
  try:
    pieces = sp.encode(text, out_type="proto").pieces  # sentencepiece >= 0.2.1
  except (ValueError, TypeError):
    pieces = sp.encode(text, out_type="immutable_proto").pieces
  # SentencePiece reports byte offsets; map them to characters.
  sizes = (len(c.encode()) for c in text)
  starts = list(itertools.accumulate(sizes, initial=0))

  def char(b: int) -> int:
    return bisect.bisect_left(starts, b)

  return [p.id for p in pieces], [(char(p.begin), char(p.end)) for p in pieces]
