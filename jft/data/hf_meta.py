"""What a Hugging Face tokenizer's JSON files say beside its vocabulary.

`HFFiles` holds tokenizer_config.json, special_tokens_map.json,
generation_config.json and chat_template.jinja (bytes, so they pickle and
are saved unchanged) and reads special tokens, eos ids and the chat template
from them as transformers does. `HFBase` is what both Hugging Face tokenizer
classes (`jft.data.hf_tokenizer`) build on it: special ids, `bos_prefix`,
offsets-based `encode_segments`, the chat template, saving and pickling.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from jft.data import chat
from jft.data.jsonl import DataError, decode_utf8, load_json_bytes
from jft.data.tokenizer_util import group_ids, save_files, split_by_offsets

CONFIG_FILE = "tokenizer_config.json"
SPECIAL_MAP_FILE = "special_tokens_map.json"
GENERATION_FILE = "generation_config.json"
TEMPLATE_FILE = "chat_template.jinja"
META_FILES = (CONFIG_FILE, SPECIAL_MAP_FILE, GENERATION_FILE, TEMPLATE_FILE)
# transformers' named special tokens (SPECIAL_TOKENS_ATTRIBUTES).
NAMED_TOKENS = (
  "bos_token",
  "eos_token",
  "unk_token",
  "sep_token",
  "pad_token",
  "cls_token",
  "mask_token",
)


def _content(value) -> str | None:
  """A token's text: a string, or an AddedToken dict's `content`."""
  if isinstance(value, str):
    return value
  if isinstance(value, Mapping) and isinstance(value.get("content"), str):
    return value["content"]
  return None


class HFFiles:
  """The JSON (and Jinja) files beside a Hugging Face tokenizer.

  Holds their bytes, so they pickle and are saved unchanged, and their
  parsed content. `directory` is only for messages.
  """

  def __init__(self, directory: str, raw: Mapping[str, bytes]):
    self.directory = directory
    self.raw = {k: bytes(v) for k, v in raw.items() if k in META_FILES}
    self.config = self._json(CONFIG_FILE)
    self.special_map = self._json(SPECIAL_MAP_FILE)
    self.generation = self._json(GENERATION_FILE)
    self.template_tokens = self._template_tokens()
    self.special_texts = self._special_texts()

  @classmethod
  def read(cls, directory: str) -> HFFiles:
    raw = {}
    for name in META_FILES:
      path = os.path.join(directory, name)
      if os.path.isfile(path):
        with open(path, "rb") as f:
          raw[name] = f.read()
    return cls(directory, raw)

  def path(self, name: str) -> str:
    return os.path.join(self.directory, name)

  def _json(self, name: str) -> dict:
    """A JSON file's object; a malformed file is a DataError naming it."""
    if name not in self.raw:
      return {}
    value = load_json_bytes(self.raw[name], self.path(name))
    if not isinstance(value, dict):
      raise DataError(f"{self.path(name)} must hold a JSON object")
    return value

  def token(self, key: str) -> tuple[str | None, str | None]:
    """(text of special token `key`, the file naming it), or (None, None).

    tokenizer_config.json wins over special_tokens_map.json; an explicit
    null there counts as naming it (None, CONFIG_FILE).
    """
    files = (CONFIG_FILE, self.config), (SPECIAL_MAP_FILE, self.special_map)
    for name, d in files:
      if key in d:
        return _content(d[key]), name
    return None, None

  def _template_tokens(self) -> dict[str, str]:
    """The special tokens a chat template sees, as transformers passes them:
    the named ones, other `*_token` strings of tokenizer_config.json (e.g.
    Gemma 3's `boi_token`) and a dict `extra_special_tokens`."""
    out = {}
    for key in NAMED_TOKENS:
      text, _ = self.token(key)
      if text is not None:
        out[key] = text
    for d in (self.special_map, self.config):
      for key, value in d.items():
        if key.endswith("_token") and key not in NAMED_TOKENS:
          if _content(value) is not None:
            out[key] = _content(value)
      extra = d.get("extra_special_tokens")
      if isinstance(extra, Mapping):
        out.update({k: _content(v) for k, v in extra.items() if _content(v)})
    return out

  def _special_texts(self) -> list[str]:
    """Every special token's text: named, extra, and added-as-special."""
    out = list(self.template_tokens.values())
    for d in (self.config, self.special_map):
      for key in ("additional_special_tokens", "extra_special_tokens"):
        if isinstance(d.get(key), list):
          out += [t for t in map(_content, d[key]) if t]
    decoder = self.config.get("added_tokens_decoder")
    if isinstance(decoder, Mapping):
      for v in decoder.values():
        if isinstance(v, Mapping) and v.get("special") and _content(v):
          out.append(_content(v))
    return list(dict.fromkeys(out))

  def added_id(self, text: str) -> int | None:
    """Id of `text` in tokenizer_config.json's `added_tokens_decoder`."""
    decoder = self.config.get("added_tokens_decoder")
    if isinstance(decoder, Mapping):
      for k, v in decoder.items():
        if _content(v) == text and str(k).isdecimal():
          return int(k)
    return None

  def generation_ids(self, key: str) -> list[int]:
    value = self.generation.get(key)
    values = value if isinstance(value, list) else [value]
    return [int(v) for v in values if isinstance(v, int)]

  def chat_template(self, tools: bool = False) -> tuple[str | None, str]:
    """(template source or None, the file it comes from).

    chat_template.jinja wins over tokenizer_config.json's `chat_template`;
    of a list of named templates, "default" is used, or "tool_use" when
    the caller passes tools and there is one (as transformers chooses).
    """
    if TEMPLATE_FILE in self.raw:
      where = self.path(TEMPLATE_FILE)
      return decode_utf8(self.raw[TEMPLATE_FILE], where), where
    value = self.config.get("chat_template")
    where = self.path(CONFIG_FILE)
    if isinstance(value, list):
      named = {
        t.get("name"): t.get("template") for t in value if isinstance(t, dict)
      }
      value = named.get(
        "tool_use" if tools and "tool_use" in named else "default"
      )
    return (value if isinstance(value, str) else None), where


class HFBase:
  """What HFTokenizer and HFSentencePieceTokenizer share: special ids from
  the HF files, offsets-based segments, the chat template, saving, pickling.

  Subclasses provide `_backend_file` ({name: bytes}), `_token_id(text)`,
  `_spans(text) -> (ids, [(start, end)] character offsets)`, `_probe_prefix`
  and the encode/decode/vocabulary members.
  """

  _name: str
  _meta: HFFiles

  def _resolve_ids(self) -> None:
    m, vocab = self._meta, self.vocab_size

    def lookup(key: str, strict: bool = True) -> tuple[int | None, bool]:
      """(id, whether the files name it); a named token missing from the
      vocabulary raises for bos/eos and counts as absent otherwise (as
      transformers would add it as a new id the model has no embedding
      for)."""
      text, where = m.token(key)
      if text is None:
        return None, where is not None
      i = self._token_id(text)
      if i is None and strict:
        raise ValueError(
          f"{m.path(where)} names {key} {text!r}, which is not in the "
          f"vocabulary of {self._name}"
        )
      return i, i is not None

    def checked(ids: list[int], key: str) -> list[int]:
      bad = [i for i in ids if not 0 <= i < vocab]
      if bad:
        raise ValueError(
          f"{m.path(GENERATION_FILE)}: {key} {bad} outside the vocabulary "
          f"(size {vocab}) of {self._name}"
        )
      return ids

    gen_eos = checked(m.generation_ids("eos_token_id"), "eos_token_id")
    eos, _ = lookup("eos_token")
    if eos is None and not gen_eos:
      looked = ", ".join(
        m.path(n) for n in (CONFIG_FILE, SPECIAL_MAP_FILE, GENERATION_FILE)
      )
      raise ValueError(
        f"{self._name}: no eos token; looked for eos_token in {looked}. "
        "jft needs one to end sequences."
      )
    self._eos = eos if eos is not None else gen_eos[0]
    self._eos_ids = tuple(dict.fromkeys([self._eos, *gen_eos]))
    bos, named = lookup("bos_token")
    if bos is None and not named:
      gen = checked(m.generation_ids("bos_token_id"), "bos_token_id")
      bos = gen[0] if gen else None
    self._bos = bos
    pad, _ = lookup("pad_token", strict=False)
    if pad is None:
      gen = checked(m.generation_ids("pad_token_id"), "pad_token_id")
      pad = gen[0] if gen else self._eos
    self._pad = pad
    self._unk, _ = lookup("unk_token", strict=False)
    self._mask, _ = lookup("mask_token", strict=False)
    add_bos = m.config.get("add_bos_token")
    if isinstance(add_bos, bool):
      self._prefix = [self._bos] if add_bos and self._bos is not None else []
    else:
      self._prefix = self._probe_prefix()

  # -- pickling: bytes travel, the backend is rebuilt on first use.
  def __getstate__(self) -> dict:
    return {**self.__dict__, "_backend_cache": None}

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)

  @property
  def name(self) -> str:
    return self._name

  @property
  def pad_id(self) -> int:
    return self._pad

  @property
  def bos_id(self) -> int | None:
    return self._bos

  @property
  def eos_id(self) -> int:
    return self._eos

  @property
  def eos_ids(self) -> tuple[int, ...]:
    return self._eos_ids

  @property
  def unk_id(self) -> int | None:
    return self._unk

  @property
  def mask_id(self) -> int:
    if self._mask is None:
      raise ValueError(
        f"Tokenizer {self._name!r} has no mask token (mask_token in "
        f"{CONFIG_FILE}), which MLM needs."
      )
    return self._mask

  @property
  def bos_prefix(self) -> list[int]:
    return list(self._prefix)

  def encode_segments(self, texts: Sequence[str]) -> list[list[int]]:
    """Ids of "".join(texts), tokenized once and split by character offsets
    (see `split_by_offsets`): prompt and completion need not tokenize the
    same apart as joined, and the concatenation is what the model sees."""
    texts = list(texts)
    if not texts:
      return []
    ids, spans = self._spans("".join(texts))
    bounds = list(itertools.accumulate(len(t) for t in texts))
    return group_ids(ids, split_by_offsets(spans, bounds), len(texts))

  @property
  def chat_template(self) -> str | None:
    return self._meta.chat_template()[0]

  def apply_chat_template(
    self,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = False,
    **kwargs,
  ) -> str:
    """The chat as text, exactly as transformers' `apply_chat_template(...,
    tokenize=False)` renders it; tokenize it with `encode` (no specials
    added: the template writes bos itself where the model needs it)."""
    source, where = self._meta.chat_template(kwargs.get("tools") is not None)
    if source is None:
      raise ValueError(
        f"Tokenizer {self._name!r} has no chat template (no {TEMPLATE_FILE} "
        f"and no chat_template in {self._meta.path(CONFIG_FILE)})"
      )
    return chat.render(
      source,
      messages,
      name=where,
      special_tokens=self._meta.template_tokens,
      add_generation_prompt=add_generation_prompt,
      **kwargs,
    )

  @property
  def files(self) -> dict[str, bytes]:
    """The tokenizer's own files: the tokenizer file and its HF JSON files
    as loaded (generation_config.json aside, see `save`), or, where there
    were none, a minimal tokenizer_config.json / special_tokens_map.json."""
    out = {**self._backend_file(), **self._meta.raw}
    out.pop(GENERATION_FILE, None)
    named = {"bos_token": self._bos, "eos_token": self._eos}
    named["unk_token"] = self._unk
    tokens = {k: self.id_to_piece(i) for k, i in named.items() if i is not None}
    if SPECIAL_MAP_FILE not in out:
      out[SPECIAL_MAP_FILE] = _json_bytes(tokens)
    if CONFIG_FILE not in out:
      config = {"tokenizer_class": "PreTrainedTokenizerFast", **tokens}
      out[CONFIG_FILE] = _json_bytes(config)
    return out

  def save(self, directory: str | os.PathLike) -> list[str]:
    """Writes `files` into `directory`, each atomically; returns the paths.

    generation_config.json belongs to the model, but `eos_ids` come from it:
    the one loaded is written too when `directory` has none (a workdir),
    and never over one already there (a model export's own).
    """
    files = self.files
    gen = os.path.join(os.fspath(directory), GENERATION_FILE)
    if GENERATION_FILE in self._meta.raw and not os.path.exists(gen):
      files[GENERATION_FILE] = self._meta.raw[GENERATION_FILE]
    return save_files(files, directory)

  def __repr__(self) -> str:
    kind = type(self).__name__
    return f"{kind}({self._name!r}, vocab_size={self.vocab_size})"


def _json_bytes(d: dict) -> bytes:
  return (json.dumps(d, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
