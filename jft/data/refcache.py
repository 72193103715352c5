"""Precomputed reference log-probs, cached on disk for reruns and resumes.

DPO with `dpo.precompute_ref` runs the frozen reference once over every pair
before training (`DPO.precompute`). That pass costs about as much as an
epoch of forwards, and a resumed run, a rerun with another learning rate or
a sweep over beta would repeat it for the same numbers. `precompute` keeps
them in `CACHE/ref_logps/KEY.npz` (CACHE = `config.stage_cache`, else
$JFT_CACHE or ~/.cache/jft), where KEY hashes what the numbers depend on:

- the reference's weights, by `params_fingerprint`: integer sums of every
  leaf's bit patterns, exact under any sharding, computed on the devices
  (no host copy of a large model);
- the examples' token arrays (every field, every example, in order);
- the model's config (dtype, head, soft-cap: what the forward computes).

A file whose recorded key, count or shapes do not match is never used: the
run says so and computes afresh. Files are written whole (a temporary file,
then a rename) by process 0; every process uses the cache only if every
process can read it.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jft import sharding
from jft.data.tokenizer_util import write_bytes_atomic

FORMAT = 1  # bump when what is cached changes


def _bits(x: jax.Array) -> jax.Array:
  """The leaf's bit patterns as uint32 (exact: no float arithmetic)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  utype = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}.get(size)
  if utype is None:  # 8-byte leaves: both halves
    halves = jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
    return halves.reshape(*x.shape[:-1], -1) if x.ndim else halves
  return jax.lax.bitcast_convert_type(x, utype).astype(jnp.uint32)


def _leaf_sums(x: jax.Array) -> jax.Array:
  """Two position-mixed sums of the leaf's bits, mod 2**32 ([2] uint32).
  Integer sums are associative, so the result does not depend on how the
  leaf is sharded or the order the reduction takes."""
  b = _bits(x).reshape(-1)
  i = jax.lax.iota(jnp.uint32, b.shape[0])
  h1 = jnp.sum((b ^ (i * jnp.uint32(0x9E3779B9))) * jnp.uint32(0x85EBCA6B))
  h2 = jnp.sum((b + i * jnp.uint32(0xC2B2AE35)) * jnp.uint32(0x27D4EB2F))
  return jnp.stack([h1, h2])


def params_fingerprint(params) -> str:
  """A hex digest of a param tree's values, paths, shapes and dtypes."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(params)
  sums = jax.jit(lambda xs: [_leaf_sums(x) for x in xs])([x for _, x in leaves])
  sums = sharding.to_host(sums)
  h = hashlib.sha256()
  for (path, x), s in zip(leaves, sums, strict=True):
    h.update(jax.tree_util.keystr(path).encode())
    h.update(f"{tuple(x.shape)}{jnp.dtype(x.dtype).name}".encode())
    h.update(np.asarray(s, np.uint32).tobytes())
  return h.hexdigest()


def examples_fingerprint(examples) -> str:
  """A hex digest of every example's arrays (field names, shapes, bytes)."""
  h = hashlib.sha256()
  h.update(str(len(examples)).encode())
  for ex in examples:
    for k in sorted(ex):
      a = np.ascontiguousarray(ex[k])
      h.update(f"{k}{a.shape}{a.dtype.str}".encode())
      h.update(a.tobytes())
  return h.hexdigest()


def cache_key(params, examples, fields, model_config: dict, name: str) -> str:
  parts = {
    "format": FORMAT,
    "objective": name,
    "fields": list(fields),
    "model": model_config,
    "params": params_fingerprint(params),
    "examples": examples_fingerprint(examples),
  }
  blob = json.dumps(parts, sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:32]


def read(path: str, key: str, examples, fields) -> dict | None:
  """The cached field values (`{field: [one array per example]}`), or None
  when the file is missing; a file that does not match `key` and the
  examples' shapes raises ValueError (the caller recomputes)."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as f:
      got = {k: f[k] for k in f.files}
  except Exception as e:  # truncated or not an npz
    raise ValueError(f"unreadable ({type(e).__name__}: {e})") from e
  if str(got.get("key", "")) != key:
    raise ValueError("its recorded key does not match its name")
  out = {}
  for field in fields:
    flat, shapes = got.get(field), got.get(field + ".shapes")
    want = np.array([np.shape(ex[field]) for ex in examples], np.int64)
    if flat is None or shapes is None or shapes.shape != want.shape:
      raise ValueError(f"field {field!r}: not {len(examples)} rows")
    if (shapes != want).any() or flat.size != want.prod(-1).sum():
      raise ValueError(f"field {field!r}: shapes differ from the examples'")
    ends = np.cumsum(want.prod(-1))
    parts = np.split(flat, ends[:-1])
    out[field] = [a.reshape(s) for a, s in zip(parts, want, strict=True)]
  return out


def write(path: str, key: str, examples, fields) -> None:
  """Each field's arrays, flattened end to end, with their shapes (rows
  may differ in length)."""
  import io

  arrays = {}
  for f in fields:
    vals = [np.asarray(ex[f]) for ex in examples]
    arrays[f] = np.concatenate([v.reshape(-1) for v in vals])
    arrays[f + ".shapes"] = np.array([v.shape for v in vals], np.int64)
  buf = io.BytesIO()
  np.savez(buf, key=np.asarray(key), **arrays)
  write_bytes_atomic(path, buf.getvalue())


def precompute(
  objective,
  examples,
  apply_fn,
  params,
  run_batches,
  *,
  cache_dir: str,
  model_config: dict,
  split: str,
  say=print,
):
  """`objective.precompute(...)`, read from or written to the cache when
  the objective precomputes fields (`objective.precomputed_fields`)."""
  fields = tuple(getattr(objective, "precomputed_fields", ()))
  if not fields or not examples:
    return objective.precompute(examples, apply_fn, params, run_batches)
  key = cache_key(params, examples, fields, model_config, objective.name)
  path = os.path.join(cache_dir, "ref_logps", f"{key}.npz")
  cached = None
  try:
    cached = read(path, key, examples, fields)
  except ValueError as e:
    say(f"reference log-probs: ignoring {path}: {e}; computing them again")
  # Every process uses the cache only if every process could read it.
  if sharding.max_over_processes(int(cached is None)):
    cached = None
  if cached is not None:
    say(f"reference log-probs ({split}, {len(examples):,} rows): from {path}")
    out = []
    for i, ex in enumerate(examples):
      ex = dict(ex)
      for f in fields:
        ex[f] = cached[f][i].copy()
      out.append(ex)
    return out
  out = objective.precompute(examples, apply_fn, params, run_batches)
  if jax.process_index() == 0:
    write(path, key, out, fields)
    say(f"reference log-probs ({split}, {len(out):,} rows): cached in {path}")
  return out
