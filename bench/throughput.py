"""CLM training throughput on one device: step time, tokens/s, MFU, RSS.

Builds the train step from jft's own pieces (model, optimizer, CLM objective,
`steps.make_train_step`, `jax.jit` with state donation as `jft/train.py`
does) and feeds it random token batches in the pipeline's batch format, so
the figures are the trainer's, minus data loading.

  python bench/throughput.py --preset ref-5M --dtype bfloat16 --json out.json

MFU = model FLOPs per step / measured step time / peak, where model FLOPs
follow PaLM (Chowdhery et al. 2022, app. B), halved attention for causal:

  per token: 6 * N_matmul + 6 * L * H * Dh * T

`N_matmul` counts the weights of every matmul (all `Linear` kernels, LM head
included; not the embedding table, a gather). The peak is measured in the
same run by a matmul microbenchmark of PERF.md's shape, in the step's dtype
(bf16 operands accumulate in f32), so MFU stays comparable across machines
whose absolute speed drifts. Never part of the test run's pass/fail.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jft import config as base_config
from jft import hostmem, optim, steps, train
from jft.models import transformer
from jft.objectives.clm import CLM
from jft.state import TrainState, flat_paths, split_params

# PERF.md's microbenchmark shape: [M, K] @ [K, N].
PEAK_SHAPE = (2040, 256, 4096)


def random_batch(rng: np.random.Generator, b: int, t: int, vocab: int):
  """One unpacked batch in the format of `jft/data/pipeline.py`."""
  return {
    "inputs": rng.integers(0, vocab, (b, t)).astype(np.int32),  # [B, T]
    "targets": rng.integers(0, vocab, (b, t)).astype(np.int32),  # [B, T]
    "weights": np.ones((b, t), np.float32),  # [B, T]
    "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),  # [B, T]
    "segment_ids": np.ones((b, t), np.int32),  # [B, T]
  }


def build(
  preset: str,
  dtype: str,
  remat: str,
  total_steps: int = 1000,
  overrides: dict | None = None,
):
  """(model config, train step fn, initial TrainState) for the benchmark.

  `overrides`: more model config fields (e.g. `logits_chunk`)."""
  c = base_config.base_config()
  model_cfg = transformer.config_from_dict(
    {"preset": preset, "dtype": dtype, "remat": remat, **(overrides or {})}
  )
  model = transformer.Transformer(model_cfg)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
  params = nn.unbox(variables["params"])
  # Full fine-tune: every leaf trains (independent of the config default).
  trainable, frozen = split_params(params, ((".*", "trainable"),))
  optimizer, schedule = optim.make_optimizer(
    c.optimizer, total_steps, trainable
  )
  state = TrainState(
    step=jnp.zeros((), jnp.int32),
    trainable=trainable,
    frozen=frozen,
    opt_state=optimizer.init(trainable),
    rng=jax.random.PRNGKey(1),
  )
  step_fn = steps.make_train_step(
    CLM(c, tokenizer=None),
    train.make_apply_fn(model),
    optimizer,
    schedule,
    grad_accum_steps=1,
  )
  return model_cfg, step_fn, state


def matmul_params(params) -> int:
  """Weights used in matmuls: every kernel (LM head too), not the table."""
  return int(
    sum(
      np.prod(x.shape)
      for p, x in flat_paths(params).items()
      if p.endswith("/kernel")
    )
  )


def model_flops_per_token(cfg: transformer.TransformerConfig, n_matmul, t):
  """PaLM-style training FLOPs per token; causal attention counted half."""
  attn = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * t
  if cfg.causal:
    attn //= 2
  return 6 * n_matmul + attn


def _median_time(fn, warmup: int, reps: int) -> float:
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def matmul_peak(dtype: str, shape=PEAK_SHAPE, reps: int = 10) -> float:
  """Median FLOP/s of a canonical-layout [M,K]@[K,N] dot in `dtype`.

  bf16 operands accumulate in float32 (`preferred_element_type`), as
  the model's matmuls do.
  """
  m, k, n = shape
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((m, k)), dtype)  # [M, K]
  b = jnp.asarray(rng.standard_normal((k, n)), dtype)  # [K, N]
  f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  sec = _median_time(lambda: f(a, b), warmup=2, reps=reps)
  return 2.0 * m * k * n / sec


def peak_rss_mib() -> float:
  """Peak resident set of this process, from the OS (Linux: KiB units)."""
  kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  scale = 1 / 1024 / 1024 if sys.platform == "darwin" else 1 / 1024
  return kib * scale


def run(
  preset: str = "ref-5M",
  dtype: str = "float32",
  batch: int = 8,
  seq: int = 256,
  steps_: int = 20,
  warmup: int = 3,
  remat: str = "none",
  peak_reps: int = 10,
  logits_chunk: int | None = None,
) -> dict[str, float]:
  """Benchmarks one configuration; returns the figures as a flat dict.

  `logits_chunk`: the model's fused-head chunk (None: its default; 0: full
  [B, T, V] logits)."""
  over = {} if logits_chunk is None else {"logits_chunk": logits_chunk}
  model_cfg, step_fn, state = build(preset, dtype, remat, overrides=over)
  n_params = int(
    sum(x.size for x in jax.tree.leaves((state.trainable, state.frozen)))
  )
  n_matmul = matmul_params(state.params)
  data = jax.device_put(
    random_batch(np.random.default_rng(0), batch, seq, model_cfg.vocab_size)
  )
  jitted = jax.jit(step_fn, donate_argnums=(0,))
  # The peak is taken before and after the steps, the better of the two:
  # a busy machine (other processes) can only lower it.
  peak = matmul_peak(dtype, reps=peak_reps)

  t0 = time.perf_counter()
  compiled = jitted.lower(state, data).compile()
  compile_s = time.perf_counter() - t0

  times = []
  for i in range(warmup + steps_):
    t0 = time.perf_counter()
    state, metrics = compiled(state, data)
    jax.block_until_ready((state, metrics))
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  loss = float(metrics["train/loss"])
  step_s = statistics.median(times)

  tokens = batch * seq
  flops = model_flops_per_token(model_cfg, n_matmul, seq) * tokens
  peak = max(peak, matmul_peak(dtype, reps=peak_reps))
  return {
    "params": n_params,
    "params_matmul": n_matmul,
    "compile_s": compile_s,
    "step_s": step_s,
    "step_s_min": min(times),
    "tokens_per_s": tokens / step_s,
    "model_tflops_per_step": flops / 1e12,
    "achieved_gflops": flops / step_s / 1e9,
    "peak_gflops": peak / 1e9,
    "mfu": flops / step_s / peak,
    "peak_rss_mib": peak_rss_mib(),
    "final_loss": loss,
  }


def format_table(args: argparse.Namespace, res: dict[str, float]) -> str:
  head = (
    f"preset={args.preset} dtype={args.dtype} batch={args.batch}x{args.seq}"
    f" remat={args.remat} steps={args.steps} ({jax.devices()[0].platform})"
  )
  rows = [
    ("params (matmul)", f"{res['params']:,} ({res['params_matmul']:,})"),
    ("compile", f"{res['compile_s']:.2f} s"),
    ("step (median)", f"{res['step_s'] * 1e3:.1f} ms"),
    ("step (min)", f"{res['step_s_min'] * 1e3:.1f} ms"),
    ("tokens/s", f"{res['tokens_per_s']:,.0f}"),
    ("model GFLOP/s", f"{res['achieved_gflops']:.1f}"),
    (f"peak GFLOP/s ({args.dtype} matmul)", f"{res['peak_gflops']:.1f}"),
    ("MFU", f"{100 * res['mfu']:.1f} %"),
    ("peak RSS", f"{res['peak_rss_mib']:.0f} MiB"),
  ]
  width = max(len(k) for k, _ in rows)
  return "\n".join([head] + [f"  {k:<{width}}  {v}" for k, v in rows])


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="ref-5M")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--steps", type=int, default=20, help="timed steps")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument(
    "--remat",
    default="none",
    choices=tuple(transformer.REMAT_POLICIES),
  )
  p.add_argument("--peak_reps", type=int, default=10)
  p.add_argument(
    "--logits_chunk",
    type=int,
    default=None,
    help="model.logits_chunk (default: the model's; 0 = full logits)",
  )
  p.add_argument("--json", default="", help="write the figures here")
  return p.parse_args(argv)


def main(argv=None) -> dict[str, float]:
  args = parse_args(argv)
  # As jft.main does (JFT_MALLOC=default for glibc's and JAX's own).
  print(f"host memory: {hostmem.tune()}")
  res = run(
    preset=args.preset,
    dtype=args.dtype,
    batch=args.batch,
    seq=args.seq,
    steps_=args.steps,
    warmup=args.warmup,
    remat=args.remat,
    peak_reps=args.peak_reps,
    logits_chunk=args.logits_chunk,
  )
  print(format_table(args, res))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), **res}, f, indent=2)
  return res


if __name__ == "__main__":
  main()
