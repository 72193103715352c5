"""Decoding speed: the KV cache against re-running the whole sequence.

  python bench/decode.py                       # ref-5M, batch 8, 64 tokens
  python bench/decode.py --mining              # + DPO's mining, both ways

Part 1 decodes `--batch` prompts of `--prompt_len` tokens for `--new`
tokens greedily with `jft.generate.Generator` (prefill, then one-token steps
over a cache) and with `make_nocache_decoder` (the decoder jft used before:
a fixed buffer re-run through the model per token), on the same random
model, interleaved over `--reps` rounds; it prints median tokens/s of each
and their ratio. Every row decodes all `--new` tokens (no eos), so both do
the same work.

Part 2 (`--mining`) times DPO's on-policy mining (`jft.data.onpolicy.mine`:
greedy plus `--samples` draws at temperature 1 on `--prompts` built-in
prompts, 16 new tokens) with each decoder on the `mini` preset, as the
default `configs/dpo.py` mines. The model is the SFT stage from the stage
cache when one exists (`--sft_dir`), else random weights (eos is then rare,
so the cache cannot stop early: a lower bound on its gain).

Timings only; never part of the tests' pass/fail. Quote the CPU with them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jft import generate, train
from jft.models import transformer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_util import cpu_name  # noqa: E402


def random_model(preset: str, seed: int = 0):
  cfg = transformer.config_from_dict({"preset": preset})
  model = transformer.Transformer(cfg)
  params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))
  import flax.linen as nn

  return cfg, nn.unbox(params)["params"], train.make_apply_fn(model)


def _time(fn) -> float:
  t = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t


def decode_speed(args) -> dict:
  cfg, params, apply_fn = random_model(args.preset)
  rng = np.random.default_rng(0)
  prompts = rng.integers(5, cfg.vocab_size, (args.batch, args.prompt_len))
  cache = generate.make_generate_fn(
    apply_fn,
    cfg,
    max_new=args.new,
    eos_ids=[],
    pad_id=0,
    vocab_size=cfg.vocab_size,
  )
  tokens, seg, pos = generate.left_pad(prompts.tolist(), args.prompt_len, 0)
  nocache = generate.make_nocache_decoder(
    apply_fn,
    max_new=args.new,
    eos_id=-1,
    pad_id=0,
    vocab_size=cfg.vocab_size,
  )
  buf = np.zeros((args.batch, args.prompt_len + args.new), np.int32)
  buf[:, : args.prompt_len] = prompts
  lengths = np.full((args.batch,), args.prompt_len, np.int32)
  runs = {
    "kv cache": lambda: cache(params, tokens, seg, pos, None),
    "no cache": lambda: nocache(params, buf, lengths),
  }
  a = np.asarray(runs["kv cache"]())  # warm-up (compiles), and a check:
  b = np.asarray(runs["no cache"]())  # greedy tokens must agree
  agree = float(np.mean(a == b))
  times = {k: [] for k in runs}
  for _ in range(args.reps):
    for k, fn in runs.items():
      times[k].append(_time(fn))
  n = args.batch * args.new
  out = {k: n / statistics.median(v) for k, v in times.items()}
  print(
    f"decode ({args.preset}, batch {args.batch}, prompt {args.prompt_len}, "
    f"{args.new} new tokens, median of {args.reps}; {cpu_name()}):"
  )
  for k, v in out.items():
    print(f"  {k:9s} {v:10.1f} tokens/s")
  ratio = out["kv cache"] / out["no cache"]
  print(f"  speed-up  {ratio:10.2f}x   (greedy tokens agree: {agree:.3f})")
  return {**out, "speedup": ratio, "agree": agree}


def mining_time(args) -> dict:
  import ml_collections

  from jft import checkpoint, sharding
  from jft.data import onpolicy, pipeline, tasks
  from jft.data import tokenizer as tokenizers

  suite = tasks.write_suite(args.workdir, n_train=8000, n_eval=200, seed=0)
  fields = ("task", "prompt", "completion")
  records = pipeline.read_jsonl_files(suite["sft_train"], fields)
  records = list(records)[: args.prompts]
  if args.sft_dir:
    tok = tokenizers.load_tokenizer_dir(args.sft_dir)
    import json
    import os

    with open(os.path.join(args.sft_dir, "config.json")) as fh:
      cfg = transformer.config_from_dict(json.load(fh)["model"])
    mesh = sharding.make_mesh(
      ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    )
    params = checkpoint.load_params(args.sft_dir, mesh)
    apply_fn = train.make_apply_fn(transformer.Transformer(cfg))
    what = f"SFT model {args.sft_dir}"
  else:
    from jft.data.tokenizer import train_tokenizer

    tok = train_tokenizer(
      (r["prompt"] + r["completion"] for r in records),
      output_path=f"{args.workdir}/tok.model",
      vocab_size=512,
    )
    cfg, params, apply_fn = random_model("mini")
    what = "random mini model"

  cached = onpolicy.make_answer_fn(
    apply_fn, params, tok, max_new=16, temperature=1.0
  )

  def uncached():
    """The decoder jft mined with before the cache, on the same prompts."""
    gens = {
      s: generate.make_nocache_decoder(
        apply_fn,
        max_new=16,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
        vocab_size=tok.vocab_size,
        sampling=s,
      )
      for s in (generate.GREEDY, generate.Sampling(1.0))
    }

    def answer(prompts, key):
      s = generate.GREEDY if key is None else generate.Sampling(1.0)
      ids = [tok.bos_prefix + tok.encode(p) for p in prompts]
      outs = []
      length = generate.round_up(max(map(len, ids)) + 16, 16)
      for start in range(0, len(ids), 256):
        chunk = ids[start : start + 256]
        n = len(chunk)
        chunk += [chunk[0]] * (256 - n)
        buf = np.full((256, length), tok.pad_id, np.int32)
        for i, p in enumerate(chunk):
          buf[i, : len(p)] = p
        lens = np.array([len(p) for p in chunk], np.int32)
        k = None if key is None else jax.random.fold_in(key, start // 256)
        got = np.asarray(gens[s](params, buf, lens, k))[:n]
        outs += [
          tok.decode(generate.truncate(o, tok.eos_ids)) for o in got.tolist()
        ]
      return outs

    return answer

  results = {}
  for name, answer in (("kv cache", cached), ("no cache", uncached())):
    onpolicy.mine(records[:8], answer, samples=args.samples, seed=0)  # warm
    t = time.perf_counter()
    rows, _ = onpolicy.mine(records, answer, samples=args.samples, seed=0)
    results[name] = time.perf_counter() - t
    print(
      f"mining ({what}, {len(records)} prompts x {1 + args.samples} "
      f"decodes) with {name}: {results[name]:.1f} s, {len(rows)} pairs"
    )
  ratio = results["no cache"] / results["kv cache"]
  print(f"  mining speed-up {ratio:.2f}x ({cpu_name()})")
  return results


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="ref-5M")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--prompt_len", type=int, default=16)
  p.add_argument("--new", type=int, default=64)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--mining", action="store_true")
  p.add_argument("--prompts", type=int, default=8000)
  p.add_argument("--samples", type=int, default=2)
  p.add_argument("--sft_dir", default="", help="a jft SFT run (mini preset)")
  p.add_argument("--workdir", default="/tmp/jft-bench-decode")
  args = p.parse_args(argv)
  out = {"decode": decode_speed(args)}
  if args.mining:
    out["mining"] = mining_time(args)
  return out


if __name__ == "__main__":
  main()
