"""How a loaded model (`jft.load`) scores token sequences, for evaluation.

`python -m jft.evaluate` measures perplexity, preference log-probs and
reward-model scores through these. Rows are tokenized as training
tokenizes them, so a number here means what the run's loss meant:

  lm_sequence          `{"text"}` as CLM (bos + text + eos, every token),
                       `{"prompt","completion"}` / `{"messages"}` as SFT
                       (`sft.segments` + `sft.tokenize`: completion and eos)
  pair_sequences       `{"prompt","chosen","rejected"}` as DPO and the
                       reward model (`dpo.split_pair` + `dpo.pair_ids`)
  completion_sequence  one prompt + answer, as the RL reward model reads a
                       rollout

`sequence_logps` never truncates: a sequence longer than the window is
scored in windows `stride` apart, every token once. `reward_scores` reads a
reward model's score at each sequence's last token; a sequence longer than
the model reads loses tokens from the left (after bos), counted.

Sequences go through the model right-padded to a power-of-two length
(causal attention: padding never reaches a real token) in batches of at
most `batch_tokens` tokens, a power of two of rows, so an evaluation
compiles a handful of shapes.
"""

from __future__ import annotations

import numpy as np

from jft import config as base_config
from jft.data.jsonl import DataError
from jft.objectives import dpo, sft

DEFAULT_WINDOW = 2048  # for models that do not say their context length


def is_reward_model(model) -> bool:
  return model.config.head == "score"


def context_limit(model, window: int = 0) -> int:
  """Tokens a model reads at once: `window` if set, else its
  max_position_embeddings up to DEFAULT_WINDOW (a window's logits are
  [rows, window, vocab] floats: the longest contexts would not fit)."""
  return window or min(
    model.config.max_position_embeddings or DEFAULT_WINDOW, DEFAULT_WINDOW
  )


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
  """(start, end, first) per window of an n-token sequence: its tokens
  [first, end) are scored with context from `start`. Every token but the
  first is scored exactly once."""
  if n <= window:
    return [(0, n, 1)]
  out, first, start = [], 1, 0
  while True:
    end = min(start + window, n)
    out.append((start, end, first))
    if end == n:
      return out
    first, start = end, start + stride


def _pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def padded_batches(seqs, batch_tokens: int, cap: int, pad_id: int):
  """(indices, [rows, L] right-padded ids) covering `seqs`. Lengths are
  padded to a power of two (>= 16, at most `cap`, which must hold every
  sequence); rows to a power of two, or the most with rows * L <=
  batch_tokens (one at least); shortest sequences first: few shapes
  compile."""
  order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
  s = 0
  while s < len(order):
    length = min(max(16, _pow2(len(seqs[order[s]]))), cap)
    most = max(1, batch_tokens // length)
    idx = [i for i in order[s : s + most] if len(seqs[i]) <= length]
    s += len(idx)
    arr = np.full((min(_pow2(len(idx)), most), length), pad_id, np.int32)
    for r, i in enumerate(idx):
      arr[r, : len(seqs[i])] = seqs[i]
    yield idx, arr


def sequence_logps(
  model, seqs, *, window: int, stride: int, batch_tokens: int
) -> tuple[np.ndarray, np.ndarray, int]:
  """(sum of weighted token log-probs [N], weight sums [N], windowed rows)
  of `seqs`, (ids, weights) pairs aligned by token: weights[t] weighs
  predicting ids[t] from ids[:t] (weights[0] is never used)."""
  pieces = []  # (row, ids of the window, weights of its targets)
  windowed = 0
  for i, (ids, w) in enumerate(seqs):
    spans = windows(len(ids), window, stride)
    windowed += len(spans) > 1
    for start, end, first in spans:
      tw = np.zeros(max(end - start - 1, 0), np.float32)
      tw[first - start - 1 :] = w[first:end]
      pieces.append((i, list(ids[start:end]), tw))
  sums = np.zeros(len(seqs), np.float64)
  counts = np.zeros(len(seqs), np.float64)
  chunks = [p[1] for p in pieces]
  pad = model.tokenizer.pad_id
  for idx, arr in padded_batches(chunks, batch_tokens, window, pad):
    lp = model.token_logprobs(arr)  # [B, L-1]
    for r, k in enumerate(idx):
      row, _, tw = pieces[k]
      sums[row] += float(np.sum(lp[r, : len(tw)] * tw, dtype=np.float64))
      counts[row] += float(np.sum(tw))
  return sums, counts, windowed


def reward_scores(
  model, seqs, *, limit: int, batch_tokens: int
) -> tuple[np.ndarray, int]:
  """(a reward model's score at each sequence's last token [N], how many
  sequences lost tokens from the left to fit `limit`, keeping bos)."""
  prefix = list(model.tokenizer.bos_prefix)
  fitted, truncated = [], 0
  for ids in seqs:
    if len(ids) > limit:
      truncated += 1
      keep = len(prefix) if list(ids[: len(prefix)]) == prefix else 0
      ids = list(ids[:keep]) + list(ids[len(ids) - (limit - keep) :])
    fitted.append(ids)
  out = np.zeros(len(seqs), np.float64)
  pad = model.tokenizer.pad_id
  for idx, arr in padded_batches(fitted, batch_tokens, limit, pad):
    s = model.scores(arr)  # [B, L]
    for r, i in enumerate(idx):
      out[i] = s[r, len(fitted[i]) - 1]
  return out, truncated


def lm_sequence(tok, template, row) -> tuple[list[int], list[float]]:
  """(ids, weights) of a perplexity row, as CLM / SFT train on it."""
  where = getattr(row, "where", "?")
  if "text" in row:
    if not isinstance(row["text"], str):
      raise DataError(f"{where}: field 'text' must be a string")
    ids = list(tok.bos_prefix) + tok.encode(row["text"]) + [tok.eos_id]
    return ids, [1.0] * len(ids)
  if "prompt" not in row and "messages" not in row:
    raise DataError(
      f"{where}: a perplexity row needs 'text', 'prompt' and 'completion', "
      "or 'messages'"
    )
  return sft.tokenize(sft.segments(row, template), tok)


def pair_sequences(tok, template, row):
  """((chosen ids, weights), (rejected ids, weights)) of a preference row,
  tokenized as DPO trains on it (the shared prompt weighted 0)."""
  p, c, j = dpo.split_pair(row, template)
  # The tokenizer's template writes bos and end-of-turn itself.
  templated = not isinstance(template, dict) and isinstance(row["chosen"], list)
  prefix = [] if templated else list(tok.bos_prefix)
  eos = [] if templated else [tok.eos_id]
  p_ids, c_ids, j_ids = dpo.pair_ids(tok, p, c, j)
  p_ids = prefix + p_ids
  return tuple(
    (p_ids + x + eos, [0.0] * len(p_ids) + [1.0] * (len(x) + len(eos)))
    for x in (c_ids, j_ids)
  )


def completion_sequence(tok, prompt: str, completion: str) -> list[int]:
  """bos + prompt + completion + eos, split by character offsets: what a
  reward model scores (as the RL reward model reads a rollout)."""
  p_ids, c_ids = tok.encode_segments([prompt, completion])
  return list(tok.bos_prefix) + p_ids + c_ids + [tok.eos_id]


def chat_template(tok):
  return sft.chat_format(base_config.base_config().sft, tok)
