"""Decoding: greedy for evaluation, sampling for on-policy DPO pairs.

A fixed [B, max_len] buffer is re-run through the model each step (no KV
cache): simple, one compile per shape, and cheap at the sizes jft evaluates
on a CPU. Prompts are right-padded; row b writes its next token at its own
cursor, and segment id 0 keeps padding invisible to attention.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def pick(logits: jax.Array, key, temperature: float) -> jax.Array:
  """Next token from [B, V] logits: argmax, or a softmax(logits / T) draw.

  Sampling is Gumbel-max: argmax(logits / T + Gumbel noise) is distributed
  as softmax(logits / T), with no cumulative sums or sorting.
  """
  if temperature > 0:
    gumbel = jax.random.gumbel(key, logits.shape, jnp.float32)
    logits = logits.astype(jnp.float32) / temperature + gumbel
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def make_decoder(
  apply_fn,
  *,
  max_new: int,
  eos_id: int,
  pad_id: int,
  vocab_size: int,
  temperature: float = 0.0,
):
  """Returns jitted `gen(params, tokens [B, L], lengths [B], key)`.

  The result is [B, max_new]; tokens after a row's eos are `pad_id`. Only
  ids below `vocab_size` (the tokenizer's; the model's embedding may be
  padded beyond it) are chosen. `temperature=0` is greedy and ignores `key`.
  """

  def gen(params, tokens, lengths, key):
    b, length = tokens.shape
    idx = jnp.arange(length, dtype=jnp.int32)[None, :]  # [1, L]
    positions = jnp.broadcast_to(idx, (b, length))
    seg = (idx < lengths[:, None]).astype(jnp.int32)  # [B, L]
    out = jnp.full((b, max_new), pad_id, jnp.int32)
    done = jnp.zeros((b,), bool)

    def body(i, carry):
      toks, seg, cur, done, out = carry
      logits = apply_fn(params, toks, positions, seg)  # [B, L, V]
      last = jnp.take_along_axis(logits, (cur - 1)[:, None, None], axis=1)
      last = last[:, 0, :vocab_size]  # [B, V_tok]
      step_key = None if temperature <= 0 else jax.random.fold_in(key, i)
      nxt = pick(last, step_key, temperature)  # [B]
      nxt = jnp.where(done, pad_id, nxt)
      out = out.at[:, i].set(nxt)
      at = idx == cur[:, None]  # [B, L]
      toks = jnp.where(at, nxt[:, None], toks)
      seg = jnp.where(at & ~done[:, None], 1, seg)
      done = done | (nxt == eos_id)
      cur = jnp.minimum(cur + 1, length - 1)
      return toks, seg, cur, done, out

    carry = (tokens, seg, lengths.astype(jnp.int32), done, out)
    return jax.lax.fori_loop(0, max_new, body, carry)[-1]

  return jax.jit(gen)


def decode(
  gen,
  params,
  prompts: Sequence[Sequence[int]],
  *,
  max_new: int,
  pad_id: int,
  key=None,
  batch_size: int = 128,
  bucket: int = 16,
) -> list[list[int]]:
  """Runs `gen` over token-id prompts in fixed-shape batches (few compiles).

  Sampling decoders need `key`; batch i draws with `fold_in(key, i)`.
  """
  longest = max(len(p) for p in prompts)
  length = -(-(longest + max_new) // bucket) * bucket
  outs = []
  for start in range(0, len(prompts), batch_size):
    chunk = list(prompts[start : start + batch_size])
    n = len(chunk)
    chunk += [chunk[0]] * (batch_size - n)  # fixed batch shape
    toks = np.full((batch_size, length), pad_id, np.int32)
    for i, p in enumerate(chunk):
      toks[i, : len(p)] = p
    lengths = np.array([len(p) for p in chunk], np.int32)
    k = None if key is None else jax.random.fold_in(key, start // batch_size)
    got = np.asarray(jax.device_get(gen(params, toks, lengths, k)))[:n]
    outs.extend(got.tolist())
  return outs


def make_text_decoder(
  apply_fn, tokenizer, *, max_new: int, temperature: float = 0.0
):
  """`answer(params, prompts, key=None, batch_size=128) -> texts`.

  Prompts are strings (bos is prepended); each answer is the decoded text
  before eos. Task accuracy and on-policy mining both decode this way.
  """
  gen = make_decoder(
    apply_fn,
    max_new=max_new,
    eos_id=tokenizer.eos_id,
    pad_id=tokenizer.pad_id,
    vocab_size=tokenizer.vocab_size,
    temperature=temperature,
  )

  def answer(params, prompts, key=None, batch_size=128):
    ids = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]
    outs = decode(
      gen,
      params,
      ids,
      max_new=max_new,
      pad_id=tokenizer.pad_id,
      key=key,
      batch_size=batch_size,
    )
    eos = tokenizer.eos_id
    return [tokenizer.decode(strip_after_eos(o, eos)) for o in outs]

  return answer


def strip_after_eos(ids: Sequence[int], eos_id: int) -> list[int]:
  ids = list(ids)
  return ids[: ids.index(eos_id)] if eos_id in ids else ids
