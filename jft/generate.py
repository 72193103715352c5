"""Decoding with a KV cache: greedy, temperature, top-k, top-p.

A batch of prompts is left-padded to a common length (rounded up to a
bucket, so few shapes compile), run once through the model to fill the
cache (prefill), then decoded one token per step inside one jitted
`lax.while_loop`, which stops as soon as every row has produced an eos id.
Padding has segment id 0, so it is invisible to attention; positions count
real tokens only (as Hugging Face's generate does with left padding).

Rows that finish keep emitting `pad_id`. Stop strings end a row at the
token that completes them (checked on the decoded text afterwards).

`make_nocache_decoder` re-runs the whole sequence for every new token: the
plain reference the tests compare the cache against, and the baseline of
`bench/decode.py`.

CLI: `python -m jft.generate --init=RUN_DIR|hf:DIR --prompt=TEXT` (or
`--prompts=FILE.jsonl`, rows with "prompt" or chat "messages"), with
`--chat` to apply the tokenizer's chat template; prints or writes
(`--out=FILE.jsonl`) the completions.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jft import sharding
from jft.models import transformer

_NEG = -1e30


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is chosen; `temperature=0` is greedy.

  Applied in Hugging Face's order: temperature, then top-k, then top-p.
  """

  temperature: float = 0.0
  top_k: int = 0  # 0 = off
  top_p: float = 1.0  # 1 = off

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


GREEDY = Sampling()


def filter_logits(logits: jax.Array, s: Sampling) -> jax.Array:
  """[B, V] float32 logits / T with tokens outside top-k / top-p at -inf."""
  logits = logits.astype(jnp.float32) / s.temperature
  if s.top_k and s.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, s.top_k)[0][..., -1:]  # [B, 1]
    logits = jnp.where(logits < kth, _NEG, logits)
  if s.top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)  # [B, V] most likely first
    probs = jax.nn.softmax(jnp.take_along_axis(logits, order, -1), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of likelier tokens
    keep_sorted = before < s.top_p  # the smallest set reaching top_p
    keep = (
      jnp.zeros_like(keep_sorted)
      .at[jnp.arange(logits.shape[0])[:, None], order]
      .set(keep_sorted)
    )
    logits = jnp.where(keep, logits, _NEG)
  return logits


def sample(logits: jax.Array, key, s: Sampling = GREEDY) -> jax.Array:
  """Next token [B] from [B, V] logits: argmax, or a draw from the filtered
  softmax by Gumbel-max (argmax of logits + Gumbel noise)."""
  if s.temperature <= 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits, s)
  gumbel = jax.random.gumbel(key, logits.shape, jnp.float32)
  return jnp.argmax(logits + gumbel, axis=-1).astype(jnp.int32)


def left_pad(
  prompts: Sequence[Sequence[int]], length: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(tokens, segment_ids, positions), each [B, length], prompts at the
  right edge; positions count from 0 at each row's first real token."""
  b = len(prompts)
  tokens = np.full((b, length), pad_id, np.int32)
  seg = np.zeros((b, length), np.int32)
  pos = np.zeros((b, length), np.int32)
  for i, p in enumerate(prompts):
    n = len(p)
    if n == 0:
      raise ValueError(f"prompt {i} is empty (give at least one token)")
    tokens[i, length - n :] = p
    seg[i, length - n :] = 1
    pos[i, length - n :] = np.arange(n)
  return tokens, seg, pos


def make_generate_fn(
  apply_fn,
  model_cfg: transformer.TransformerConfig,
  *,
  max_new: int,
  eos_ids: Sequence[int],
  pad_id: int,
  vocab_size: int,
  sampling: Sampling = GREEDY,
):
  """Jitted `gen(params, tokens, seg, pos, key) -> [B, max_new]` int32.

  Inputs come from `left_pad`. `apply_fn(params, tokens, positions,
  segment_ids, cache=...)` is the model's forward with a cache. Only ids
  below `vocab_size` (the tokenizer's; the embedding may be padded beyond
  it) are chosen. Compiles once per input shape.
  """
  eos = jnp.asarray(sorted(set(int(e) for e in eos_ids)), jnp.int32)

  def step_logits(logits):  # [B, V_model] -> [B, V_tok]
    return logits[:, :vocab_size]

  def gen(params, tokens, seg, pos, key):
    b, length = tokens.shape
    cache = transformer.init_cache(model_cfg, b, length + max_new)
    out, cache = apply_fn(params, tokens, pos, seg, cache=cache)
    first = step_logits(transformer.logits_of(out)[:, -1])  # [B, V]
    next_pos = pos[:, -1] + 1  # [B]
    out = jnp.full((b, max_new), pad_id, jnp.int32)

    def cond(carry):
      i, _, _, done, _ = carry
      return (i < max_new) & ~jnp.all(done)

    def body(carry):
      i, cache, logits, done, out = carry
      k = None if key is None else jax.random.fold_in(key, i)
      nxt = sample(logits, k, sampling)  # [B]
      nxt = jnp.where(done, pad_id, nxt)
      out = out.at[:, i].set(nxt)
      done = done | jnp.isin(nxt, eos)
      logits, cache = apply_fn(
        params,
        nxt[:, None],
        (next_pos + i)[:, None],
        jnp.ones((b, 1), jnp.int32),
        cache=cache,
      )
      logits = transformer.logits_of(logits)
      return i + 1, cache, step_logits(logits[:, -1]), done, out

    done = jnp.zeros((b,), bool)
    carry = (jnp.zeros((), jnp.int32), cache, first, done, out)
    return jax.lax.while_loop(cond, body, carry)[-1]

  return jax.jit(gen)


def make_nocache_decoder(
  apply_fn,
  *,
  max_new: int,
  eos_id: int,
  pad_id: int,
  vocab_size: int,
  sampling: Sampling = GREEDY,
):
  """The reference without a cache: `gen(params, tokens [B, L], lengths [B],
  key=None) -> [B, max_new]`, right-padded prompts in a fixed buffer re-run
  through the model for every new token (what jft decoded with before the
  cache; `bench/decode.py` times both)."""

  def gen(params, tokens, lengths, key=None):
    b, length = tokens.shape
    idx = jnp.arange(length, dtype=jnp.int32)[None, :]  # [1, L]
    positions = jnp.broadcast_to(idx, (b, length))
    seg = (idx < lengths[:, None]).astype(jnp.int32)  # [B, L]
    out = jnp.full((b, max_new), pad_id, jnp.int32)
    done = jnp.zeros((b,), bool)

    def body(i, carry):
      toks, seg, cur, done, out = carry
      logits = transformer.logits_of(apply_fn(params, toks, positions, seg))
      last = jnp.take_along_axis(logits, (cur - 1)[:, None, None], axis=1)
      k = None if key is None else jax.random.fold_in(key, i)
      nxt = sample(last[:, 0, :vocab_size], k, sampling)
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


def round_up(n: int, bucket: int) -> int:
  return -(-n // bucket) * bucket


class Generator:
  """Batched generation over token-id prompts, with a KV cache.

  `generate(params, prompts, key=None)` returns each prompt's new tokens
  (`max_new` of them, pad after eos). Prompts run in fixed batches of
  `batch_size` rows, left-padded to a multiple of `bucket`, so a whole
  evaluation compiles once or twice. Sampling draws batch i with
  `fold_in(key, i)`; greedy ignores `key`.
  """

  def __init__(
    self,
    apply_fn,
    model_cfg,
    *,
    max_new: int,
    eos_ids: Sequence[int],
    pad_id: int,
    vocab_size: int,
    sampling: Sampling = GREEDY,
    batch_size: int = 64,
    bucket: int = 16,
    mesh=None,
  ):
    if max_new <= 0:
      raise ValueError(f"max_new_tokens must be positive, got {max_new}")
    self.max_new, self.pad_id = max_new, pad_id
    self.batch_size, self.bucket = batch_size, bucket
    self.sampling = sampling
    self.mesh, self.vocab_size = mesh, vocab_size
    self.max_positions = model_cfg.max_position_embeddings
    # Rows per batch are rounded up to a power of two (few shapes compile)
    # and to a multiple of the mesh's batch shards.
    self.shards = 1
    if mesh is not None:
      self.shards = int(np.prod([mesh.shape[a] for a in sharding.BATCH_AXES]))
    self._gen = make_generate_fn(
      apply_fn,
      model_cfg,
      max_new=max_new,
      eos_ids=eos_ids,
      pad_id=pad_id,
      vocab_size=vocab_size,
      sampling=sampling,
    )

  def _rows(self, n: int) -> int:
    rows = 1 << (min(self.batch_size, n) - 1).bit_length()  # power of two
    return round_up(rows, self.shards)

  def _check(self, prompts) -> None:
    """Ids the model cannot embed raise (the embedding lookup would clamp
    them silently); running past the model's positions warns."""
    for i, p in enumerate(prompts):
      bad = [t for t in p if not 0 <= t < self.vocab_size]
      if bad:
        raise ValueError(
          f"prompt {i}: token ids {bad[:5]} are outside the vocabulary "
          f"[0, {self.vocab_size})"
        )
    longest = max(len(p) for p in prompts) + self.max_new
    if self.max_positions and longest > self.max_positions:
      warnings.warn(
        f"prompt + max_new_tokens = {longest} positions, past the model's "
        f"max_position_embeddings={self.max_positions}: quality may degrade",
        stacklevel=3,
      )

  def generate(self, params, prompts, key=None) -> list[list[int]]:
    if self.sampling.temperature > 0 and key is None:
      raise ValueError("sampling (temperature > 0) needs a key")
    prompts = [[int(t) for t in p] for p in prompts]
    if not prompts:
      return []
    self._check(prompts)
    length = round_up(max(len(p) for p in prompts), self.bucket)
    bs = self._rows(len(prompts))
    outs = []
    for start in range(0, len(prompts), bs):
      chunk = prompts[start : start + bs]
      n = len(chunk)
      chunk += [chunk[0]] * (bs - n)  # fixed batch shape
      inputs = left_pad(chunk, length, self.pad_id)
      if self.mesh is not None:  # rows sharded like a training batch
        inputs = [_place(x, self.mesh) for x in inputs]
      k = None if key is None else jax.random.fold_in(key, start // bs)
      got = self._gen(params, *inputs, k)
      outs.extend(np.asarray(jax.device_get(got))[:n].tolist())
    return outs


def _place(x: np.ndarray, mesh) -> jax.Array:
  """The same full array on every process -> rows sharded over the mesh's
  batch axes (each process keeps its own devices' rows)."""
  spec = sharding.batch_sharding(mesh, x.ndim)
  return jax.make_array_from_callback(x.shape, spec, lambda i: x[i])


def truncate(
  ids: Sequence[int],
  eos_ids: Sequence[int],
  decode: Callable[[Sequence[int]], str] | None = None,
  stop_strings: Sequence[str] = (),
) -> list[int]:
  """Tokens before the first eos, cut after the token that completes a stop
  string (that token kept, as Hugging Face's stop strings do)."""
  ids = list(ids)
  eos = set(int(e) for e in eos_ids)
  for i, t in enumerate(ids):
    if t in eos:
      ids = ids[:i]
      break
  if stop_strings and decode is not None:
    for i in range(1, len(ids) + 1):
      text = decode(ids[:i])
      if any(s in text for s in stop_strings):
        return ids[:i]
  return ids


def make_text_decoder(
  apply_fn,
  tokenizer,
  *,
  max_new: int,
  sampling: Sampling = GREEDY,
  batch_size: int = 128,
):
  """`answer(params, prompts, key=None) -> texts`: decoded text before eos.

  Prompts are strings, encoded with the tokenizer's `bos_prefix`. Task
  accuracy and on-policy mining both decode this way. `apply_fn` must carry
  its model config (`apply_fn.config`, see `train.make_apply_fn`) and may
  carry the run's mesh (`apply_fn.mesh`), over which rows are sharded.
  """
  gen = Generator(
    apply_fn,
    apply_fn.config,
    max_new=max_new,
    eos_ids=tokenizer.eos_ids,
    pad_id=tokenizer.pad_id,
    vocab_size=tokenizer.vocab_size,
    sampling=sampling,
    batch_size=batch_size,
    mesh=getattr(apply_fn, "mesh", None),
  )

  def answer(params, prompts, key=None):
    ids = [list(tokenizer.bos_prefix) + tokenizer.encode(p) for p in prompts]
    outs = gen.generate(params, ids, key)
    eos = tokenizer.eos_ids
    return [tokenizer.decode(truncate(o, eos)) for o in outs]

  return answer


# ------------------------------------------------------------------- CLI


def _read_prompts(path: str) -> list:
  """Prompts of a JSONL file; a bad row is a DataError naming file:line."""
  from jft.data.jsonl import DataError, read_jsonl
  from jft.objectives.sft import check_messages

  rows = read_jsonl(path)
  out = []
  for r in rows:
    if "messages" in r:
      check_messages(r["messages"], r.where)
      out.append(r["messages"])
    elif isinstance(r.get("prompt"), str):
      out.append(r["prompt"])
    else:
      raise DataError(
        f"{r.where}: needs a string 'prompt' or a 'messages' list"
      )
  return out


def main(argv: Sequence[str] | None = None) -> int:
  import argparse

  import jft

  p = argparse.ArgumentParser(
    prog="python -m jft.generate", description="Generate completions."
  )
  p.add_argument("--init", required=True, help="RUN_DIR or hf:DIR")
  p.add_argument("--adapter", default=None, help="PEFT adapter directory")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--prompt", action="append", help="a prompt (repeatable)")
  src.add_argument("--prompts", help="JSONL file: 'prompt' or 'messages'")
  p.add_argument("--chat", action="store_true", help="apply chat template")
  p.add_argument("--max_new_tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=0.0)
  p.add_argument("--top_k", type=int, default=0)
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--stop", action="append", default=[], help="stop string")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--out", default=None, help="write JSONL here")
  p.add_argument(
    "--verbose", action="store_true", help="tracebacks for user errors too"
  )
  args = p.parse_args(argv)
  model = jft.load(args.init, adapter=args.adapter, dtype=args.dtype)
  prompts = args.prompt or _read_prompts(args.prompts)
  texts = model.generate_text(
    prompts,
    max_new_tokens=args.max_new_tokens,
    temperature=args.temperature,
    top_k=args.top_k,
    top_p=args.top_p,
    stop=args.stop,
    chat=args.chat,
    seed=args.seed,
  )
  rows = [
    {"prompt": pr, "completion": t}
    for pr, t in zip(prompts, texts, strict=True)
  ]
  if args.out:
    with open(args.out, "w", encoding="utf-8") as fh:
      for r in rows:
        fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} completions to {args.out}")
  else:
    for r in rows:
      print(r["completion"])
  return 0


__all__ = [
  "GREEDY",
  "Generator",
  "Sampling",
  "left_pad",
  "make_generate_fn",
  "make_nocache_decoder",
  "make_text_decoder",
  "sample",
  "truncate",
]

if __name__ == "__main__":
  from jft import cli

  cli.run_main(main)
