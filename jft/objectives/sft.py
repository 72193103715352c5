"""Supervised fine-tuning: loss on completion / assistant tokens only.

Rows are `{"prompt","completion"}` or chat `{"messages": [{"role",
"content"}, ...]}`. `config.sft.template` picks how chats become text:

  auto       the tokenizer's own chat template when it has one (Hugging
             Face checkpoints), else the role table
  tokenizer  the tokenizer's chat template (an error if it has none)
  table      the role table `config.sft.chat_template` (or a JSON file):
             per role a prefix and suffix

With the role table (and for prompt/completion rows) a sequence is
`tok.bos_prefix` + text + eos after each answer; assistant content and that
eos carry loss weight 1, everything else 0, so the model learns to answer
and to stop. With the tokenizer's template the rendered chat is the whole
sequence (the template writes bos itself where the model needs it, as
transformers assumes); each assistant turn's span, found by rendering the
chat incrementally (`jft.data.chat.assistant_spans`), is its content plus
the template's own end-of-turn text (e.g. <|im_end|>, <|eot_id|>,
<end_of_turn>), which is trained instead of an appended eos: no eos is
added, so training sees exactly what the template shows at inference.

Text pieces are tokenized jointly with `tok.encode_segments` (the boundary
by character offsets), so a prompt and its completion are the tokens the
model sees joined. `eval/task_accuracy` comes from greedy generation on
held-out prompts of the built-in tasks.
"""

from __future__ import annotations

import enum
import itertools
import json

import numpy as np

from jft.data import chat, pipeline
from jft.data.jsonl import DataError
from jft.errors import ConfigError
from jft.objectives.clm import CLM

TEMPLATES = ("auto", "tokenizer", "table")
# Rows longer than seq_len + 1: cut prompt tokens from the left, or drop.
TRUNCATION = ("truncate_prompt", "skip")


class Special(enum.Enum):
  """Pieces that stand for tokens rather than text."""

  BOS = "bos"  # tok.bos_prefix
  EOS = "eos"  # tok.eos_id


def load_template(sft_cfg) -> dict[str, tuple[str, str]]:
  """The role table: {role: (prefix, suffix)}."""
  if sft_cfg.template_file:
    with open(sft_cfg.template_file) as f:
      rows = json.load(f)["roles"]
  else:
    rows = sft_cfg.chat_template
  return {role: (pre, suf) for role, pre, suf in rows}


def chat_format(sft_cfg, tok):
  """How chats become text: the role table (a dict), or `tok` itself, whose
  own chat template renders them (per `config.sft.template`)."""
  mode = sft_cfg.template
  if mode not in TEMPLATES:
    raise ConfigError(
      f"config.sft.template: unknown {mode!r}; expected one of {TEMPLATES}"
    )
  if mode == "table" or (mode == "auto" and tok.chat_template is None):
    return load_template(sft_cfg)
  if tok.chat_template is None:
    raise ConfigError(
      f"config.sft.template='tokenizer', but tokenizer {tok!r} has no chat "
      "template; use 'table' (config.sft.chat_template) or 'auto'"
    )
  chat.compile_template(tok.chat_template, repr(tok))  # fail before data
  return tok


def check_messages(msgs, where: str, field: str = "messages") -> None:
  if not isinstance(msgs, list) or not msgs:
    raise DataError(f"{where}: field {field!r} must be a non-empty list")
  for i, m in enumerate(msgs):
    if not isinstance(m, dict) or not isinstance(m.get("content"), str):
      raise DataError(f"{where}: field '{field}[{i}]' needs a string 'content'")


def _require_assistant(msgs, where: str) -> None:
  if not any(m.get("role") == "assistant" for m in msgs):
    raise DataError(f"{where}: field 'messages' has no assistant turn")


def render_fn(tok):
  """`(messages, add_generation_prompt) -> text` with the tokenizer's
  template."""
  return lambda msgs, gen: tok.apply_chat_template(msgs, gen)


def template_segments(msgs, tok, where) -> list[tuple[str, bool]]:
  """(text, trained) pieces of a chat rendered by the tokenizer's template:
  assistant spans (content + end-of-turn text) trained, the rest not."""
  full, spans = chat.assistant_spans(render_fn(tok), msgs, where)
  out, pos = [], 0
  for start, end in spans:
    out += [(full[pos:start], False), (full[start:end], True)]
    pos = end
  return [*out, (full[pos:], False)]


def segments(record, template) -> list[tuple[str | Special, bool]]:
  """(piece, trained) of one row: text, or a Special token; errors name
  file, line and field. `template` is what `chat_format` returned."""
  where = getattr(record, "where", "?")
  if "messages" in record:
    msgs = record["messages"]
    check_messages(msgs, where)
    if not isinstance(template, dict):
      _require_assistant(msgs, where)
      return template_segments(msgs, template, where)
    out = [(Special.BOS, False)]
    for i, m in enumerate(msgs):
      role = m.get("role")
      if role not in template:
        raise DataError(
          f"{where}: field 'messages[{i}].role' is {role!r}; the chat "
          f"template knows {sorted(template)}"
        )
      pre, suf = template[role]
      trained = role == "assistant"
      out += [(pre, False), (m["content"], trained), (suf, False)]
      if trained:
        out.append((Special.EOS, True))
    _require_assistant(msgs, where)
    return out
  for field in ("prompt", "completion"):
    if not isinstance(record.get(field), str):
      raise DataError(
        f"{where}: missing or non-string field {field!r} (SFT rows need "
        "'prompt' and 'completion', or 'messages')"
      )
  if not record["completion"]:
    raise DataError(f"{where}: field 'completion' is empty")
  return [
    (Special.BOS, False),
    (record["prompt"], False),
    (record["completion"], True),
    (Special.EOS, True),
  ]


def tokenize(pieces, tok) -> tuple[list[int], list[float]]:
  """Pieces -> ids and per-token trained mask. Consecutive text pieces are
  tokenized jointly (`tok.encode_segments`), so boundaries follow offsets."""
  ids, mask, run = [], [], []

  def flush():
    texts = [text for text, _ in run]
    for (_, trained), part in zip(run, tok.encode_segments(texts), strict=True):
      ids.extend(part)
      mask.extend([1.0 if trained else 0.0] * len(part))
    run.clear()

  for piece, trained in pieces:
    if isinstance(piece, str):
      run.append((piece, trained))
      continue
    flush()
    part = tok.bos_prefix if piece is Special.BOS else [tok.eos_id]
    ids.extend(part)
    mask.extend([1.0 if trained else 0.0] * len(part))
  flush()
  return ids, mask


def turns_end_in_stop(ids, mask, eos_ids) -> bool:
  """Whether each run of trained tokens (an answer) holds an id that ends
  generation, so the model learns to stop after it."""
  stop = set(eos_ids)
  runs = itertools.groupby(zip(ids, mask, strict=True), key=lambda x: x[1] > 0)
  return all(any(i in stop for i, _ in run) for trained, run in runs if trained)


def kept_prefix(ids, tok) -> int:
  """How many leading ids truncation keeps: the bos prefix, when present."""
  prefix = tok.bos_prefix
  return len(prefix) if list(ids[: len(prefix)]) == prefix else 0


def fit(ids, mask, max_len: int, policy: str, keep: int = 1):
  """Applies the truncation policy; returns (ids, mask, status).

  'truncate_prompt' drops prompt tokens from the left, after the first
  `keep` (the bos prefix).
  """
  if len(ids) <= max_len:
    return ids, mask, "ok"
  if policy == "truncate_prompt":
    first = mask.index(1.0)
    cut = len(ids) - max_len
    if cut <= first - keep:
      return (
        ids[:keep] + ids[keep + cut :],
        mask[:keep] + mask[keep + cut :],
        "truncated",
      )
    return None, None, "skipped"
  if policy == "skip":
    return None, None, "skipped"
  raise ConfigError(
    f"config.sft.truncation: unknown {policy!r}; expected one of {TRUNCATION}"
  )


class SFT(CLM):
  """Token-weighted CE on trained tokens; same loss as CLM."""

  name = "sft"
  fields = ()
  builtin_split = "sft"
  evaluators = ("task_accuracy",)

  def __init__(self, config, tokenizer):
    super().__init__(config, tokenizer)
    self.template = chat_format(config.sft, tokenizer)
    self.data_stats: dict[str, float] = {}

  def make_examples(self, records, split: str = "train"):
    tok, seq = self.tokenizer, self.config.seq_len
    out, counts = [], {"truncated": 0, "skipped": 0}
    no_stop = 0
    for r in records:
      ids, mask = tokenize(segments(r, self.template), tok)
      no_stop += not turns_end_in_stop(ids, mask, tok.eos_ids)
      ids, mask, status = fit(
        ids, mask, seq + 1, self.config.sft.truncation, kept_prefix(ids, tok)
      )
      if status != "ok":
        counts[status] += 1
      if ids is not None:
        out.append(pipeline.causal_example(ids, np.asarray(mask, np.float32)))
    for k, v in counts.items():
      self.data_stats[f"data/{split}_{k}"] = v
    self.data_stats[f"data/{split}_examples"] = len(out)
    if counts["skipped"] or counts["truncated"]:
      print(
        f"sft {split}: {counts['truncated']} of {len(records)} rows had "
        f"their prompt truncated and {counts['skipped']} were skipped "
        f"(longer than seq_len + 1 = {seq + 1} tokens)"
      )
    if no_stop:
      stops = [tok.id_to_piece(i) for i in tok.eos_ids]
      print(
        f"sft {split}: warning: in {no_stop} rows an answer's trained tokens "
        f"contain none of the tokens that end generation {stops} (the chat "
        "template's end of turn is not an eos of this tokenizer), so the "
        "model will not learn to stop there; add it to eos_token_id in "
        "generation_config.json"
      )
    if not out:
      raise DataError(f"sft {split}: every row was skipped (seq_len={seq})")
    return out
