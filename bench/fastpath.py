"""The train step's fast paths, lever by lever, interleaved in one process.

Variants of the ref-5M CLM full fine-tuning step (`bench/throughput.py`'s
build: model, AdamW, `steps.make_train_step`), each compiled once and timed
in alternating rounds (one call of each per round, medians), so load from
other processes hits every variant alike:

  plain              autodiff matmuls (`matmul.autodiff_reference`), the
                     einsum attention (`attend.autodiff_reference`) and
                     full [B, T, V] logits (`logits_chunk=0`): jft before
  matmul             `Linear` with the canonical-layout custom VJP
  attention          the attention core's custom VJP alone
  mlp                the gated MLP activation's custom VJP alone
  matmul+chunk=N     and the fused LM head + log-softmax, N tokens a chunk
                     (jft's default `logits_chunk` holds ref-5M's 2048)
  all+chunk=N        all four together (jft's default is matmul+chunk=N:
                     the attention and MLP VJPs are opt-in,
                     model.attention_vjp and model.mlp_vjp)
  plain+chunk=N      the fused head alone
  ...,f32 dz         the fused head's backward dots in float32 (bf16 runs;
                     jft uses the compute dtype)

For each: median step time, ratio to `plain`, the loss, and the largest
relative gradient difference to `plain` (for bfloat16 also each variant's
gradient error against the float32 model's, so a fast path is seen to be no
less accurate). Never pass/fail.

  python bench/fastpath.py [--dtypes float32,bfloat16] [--rounds 7]
      [--chunks 2048,512] [--variants plain,matmul,...]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import os
import platform
import statistics
import time

import jax
import numpy as np

from jft import train
from jft.models import attend, head_loss, matmul, transformer
from jft.objectives.clm import CLM


def _throughput():
  here = os.path.dirname(os.path.abspath(__file__))
  spec = importlib.util.spec_from_file_location(
    "throughput", os.path.join(here, "throughput.py")
  )
  tp = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tp)
  return tp


def variants(chunks, vocab) -> dict[str, tuple[frozenset, dict]]:
  """name -> (the paths kept at autodiff's reference: "matmul",
  "attention", "mlp"; model overrides); chunks in tokens (`logits_chunk`
  counts logits: tokens x vocab)."""
  every, full = frozenset({"matmul", "attention", "mlp"}), {"logits_chunk": 0}
  out = {
    "plain": (every, full),
    "matmul": (every - {"matmul"}, full),
    "attention": (every - {"attention"}, full),
    "mlp": (every - {"mlp"}, full),
  }
  for c in chunks:
    chunk = {"logits_chunk": c * vocab}
    out[f"matmul+chunk={c}"] = (every - {"matmul"}, chunk)
    out[f"all+chunk={c}"] = (frozenset(), chunk)
  for c in chunks[:1]:
    chunk = {"logits_chunk": c * vocab}
    out[f"plain+chunk={c}"] = (every, chunk)
    out[f"all+chunk={c},f32 dz"] = (frozenset(), chunk)
  for refs, over in out.values():  # the model's switches for the VJPs
    over["attention_vjp"] = "attention" not in refs
    over["mlp_vjp"] = "mlp" not in refs
  return out


def reference_paths(paths) -> contextlib.ExitStack:
  """Enters autodiff's reference for each named path ("mlp" is only the
  model's switch)."""
  ctx = contextlib.ExitStack()
  if "matmul" in paths:
    ctx.enter_context(matmul.autodiff_reference())
  if "attention" in paths:
    ctx.enter_context(attend.autodiff_reference())
  return ctx


@contextlib.contextmanager
def f32_head_grad():
  """The fused head's backward dots in float32 whatever the compute dtype
  (autodiff's choice for float32 logits), for comparison."""
  orig = head_loss.chunked_token_logps

  def f32(*args, **kw):
    return orig(*args, **{**kw, "grad_dtype": None})

  head_loss.chunked_token_logps = f32
  try:
    yield
  finally:
    head_loss.chunked_token_logps = orig


def _grad_fn(cfg, batch):
  """jit(grad) of the mean CLM loss for model config `cfg`."""
  apply_fn = train.make_apply_fn(transformer.Transformer(cfg))
  objective = CLM(None, tokenizer=None)

  def loss(params):
    s, w, _ = objective.loss(apply_fn, params, batch, None, train=True)
    return s / w

  return jax.jit(jax.grad(loss))


def _max_rel(a, b) -> float:
  """max over leaves of max|a - b| / max|a|."""
  rel = [
    float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y))))
    / (float(np.max(np.abs(np.asarray(x, np.float64)))) + 1e-30)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  ]
  return max(rel)


def interleaved(fns: dict, rounds: int) -> dict[str, float]:
  for f in fns.values():  # warm-up
    jax.block_until_ready(f())
  times = {k: [] for k in fns}
  for _ in range(rounds):
    for k, f in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f())
      times[k].append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in times.items()}


def run(dtype, preset, b, t, rounds, chunks, only=None) -> list[dict]:
  tp = _throughput()
  rng = np.random.default_rng(0)
  built, grads = {}, {}
  vocab = transformer.config_from_dict({"preset": preset}).vocab_size
  for name, (reference, over) in variants(chunks, vocab).items():
    if only and name not in only:
      continue
    ctx = reference_paths(reference)
    if name.endswith("f32 dz"):
      ctx.enter_context(f32_head_grad())
    with ctx:  # traced (and compiled) under it
      cfg, step_fn, state = tp.build(preset, dtype, "none", overrides=over)
      if not built:
        data = jax.device_put(tp.random_batch(rng, b, t, cfg.vocab_size))
      compiled = jax.jit(step_fn).lower(state, data).compile()
      grads[name] = _grad_fn(cfg, data)(state.params)
    built[name] = (compiled, state)
  ref32 = None
  if dtype != "float32":
    with reference_paths({"matmul", "attention"}):
      cfg32 = dataclasses.replace(cfg, dtype="float32", logits_chunk=0)
      ref32 = _grad_fn(cfg32, data)(state.params)
  med = interleaved(
    {k: (lambda c=c, s=s: c(s, data)) for k, (c, s) in built.items()}, rounds
  )
  names = list(built)
  base = names[0]
  rows = []
  for k in names:
    _, m = built[k][0](built[k][1], data)
    row = {
      "variant": k,
      "dtype": dtype,
      "step_ms": med[k] * 1e3,
      "speedup": med[base] / med[k],
      "loss": float(m["train/loss"]),
      "grad_diff": _max_rel(grads[base], grads[k]),
    }
    if ref32 is not None:
      row["grad_err_vs_f32"] = _max_rel(ref32, grads[k])
    rows.append(row)
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="ref-5M")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--rounds", type=int, default=7)
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--chunks", default="2048,512", help="tokens per chunk")
  p.add_argument("--variants", default="", help="comma-separated subset")
  args = p.parse_args(argv)
  chunks = [int(c) for c in args.chunks.split(",") if c]
  only = set(args.variants.split(",")) if args.variants else None
  print(
    f"# {platform.processor() or platform.machine()}, jax {jax.__version__},"
    f" {time.strftime('%Y-%m-%d %H:%M')}, {args.preset} batch"
    f" {args.batch}x{args.seq}, {args.rounds} interleaved rounds"
  )
  for dtype in args.dtypes.split(","):
    for r in run(
      dtype, args.preset, args.batch, args.seq, args.rounds, chunks, only
    ):
      extra = ""
      if "grad_err_vs_f32" in r:
        extra = f"  grad err vs f32 {r['grad_err_vs_f32']:.1e}"
      print(
        f"{dtype:9s} {r['variant']:22s} {r['step_ms']:7.1f} ms"
        f"  x{r['speedup']:4.2f}  loss {r['loss']:.6f}"
        f"  grad diff {r['grad_diff']:.1e}{extra}",
        flush=True,
      )


if __name__ == "__main__":
  main()
