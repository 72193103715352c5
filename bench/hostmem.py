"""jft's host memory settings (`jft.hostmem`) against glibc's and JAX's
defaults: the train step in fresh processes, interleaved.

The settings are process-wide and must be made before JAX creates its CPU
client, so each measurement is its own process: `jft` runs `hostmem.tune()`
first, as `jft.main` does; `default` sets `JFT_MALLOC=default`;
`thresholds` is jft's earlier setting, the malloc thresholds alone (mmap
for blocks above 32 MiB, a 256 MiB trim threshold, async dispatch). Rounds
alternate the order, so load from other processes hits every mode alike. Per
process: the median step after warm-up and the minor page faults a step
(`getrusage`), then per mode the median over rounds. Never pass/fail.

  python bench/hostmem.py [--preset ref-5M] [--dtypes float32,bfloat16]
      [--rounds 3] [--steps 12] [--vjps]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_util import cpu_name  # noqa: E402

MODES = ("jft", "thresholds", "default")


def child(mode: str, preset: str, dtype: str, steps: int, vjps: bool):
  """One measurement, in this (fresh) process."""
  from jft import hostmem

  if mode == "thresholds":
    libc = hostmem._glibc()
    ok = libc.mallopt(hostmem.M_MMAP_THRESHOLD, hostmem.MMAP_THRESHOLD) == 1
    ok &= libc.mallopt(hostmem.M_TRIM_THRESHOLD, 256 << 20) == 1
    if not ok:
      raise RuntimeError("mallopt refused the thresholds")
    line = "malloc mmap threshold 32 MiB, trim threshold 256 MiB"
  else:  # JFT_MALLOC=default makes it leave both alone
    line = hostmem.tune()
  import importlib.util
  import resource
  import time

  import jax
  import numpy as np

  here = os.path.dirname(os.path.abspath(__file__))
  spec = importlib.util.spec_from_file_location(
    "throughput", os.path.join(here, "throughput.py")
  )
  tp = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tp)
  over = {"attention_vjp": True, "mlp_vjp": True} if vjps else {}
  cfg, step_fn, state = tp.build(preset, dtype, "none", overrides=over)
  data = jax.device_put(
    tp.random_batch(np.random.default_rng(0), 8, 256, cfg.vocab_size)
  )
  step = jax.jit(step_fn, donate_argnums=(0,)).lower(state, data).compile()
  for _ in range(3):  # warm-up: the heap grows to its steady size
    state, metrics = step(state, data)
    jax.block_until_ready(state)
  times = []
  faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = step(state, data)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
  return {
    "settings": line,
    "step_s": statistics.median(times),
    "faults_per_step": faults / steps,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "loss": float(metrics["train/loss"]),
  }


def measure(mode: str, preset: str, dtype: str, steps: int, vjps: bool):
  env = {k: v for k, v in os.environ.items() if k != "JFT_MALLOC"}
  if mode != "jft":
    env["JFT_MALLOC"] = "default"
  cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, dtype]
  cmd += ["--preset", preset, "--steps", str(steps)] + (["--vjps"] * vjps)
  out = subprocess.run(cmd, env=env, capture_output=True, text=True)
  if out.returncode:
    raise RuntimeError(f"{mode} {dtype} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def run(preset, dtypes, rounds, steps, vjps, say=print) -> list[dict]:
  got = {(d, m): [] for d in dtypes for m in MODES}
  for r in range(rounds):
    for d in dtypes:
      for m in MODES[r % 3 :] + MODES[: r % 3]:
        x = measure(m, preset, d, steps, vjps)
        got[(d, m)].append(x)
        say(f"round {r + 1}/{rounds} {d} {m}: {x['step_s']:.3f} s")
  rows = []
  for d in dtypes:
    base = statistics.median(x["step_s"] for x in got[(d, "default")])
    # The settings move bytes, not numbers: every process's loss is equal.
    same = len({x["loss"] for m in MODES for x in got[(d, m)]}) == 1
    for m in MODES:
      xs = got[(d, m)]
      step_s = statistics.median(x["step_s"] for x in xs)
      faults = statistics.median(x["faults_per_step"] for x in xs)
      rows.append(
        {
          "dtype": d,
          "mode": m,
          "settings": xs[0]["settings"],
          "step_s": step_s,
          "ratio": step_s / base,
          "faults_per_step": faults,
          "peak_rss_mb": statistics.median(x["peak_rss_mb"] for x in xs),
          "losses_equal": same,
        }
      )
  return rows


def report(rows, preset, rounds, steps, vjps) -> str:
  lines = [
    f"## Host memory settings, the {preset} step ({cpu_name()})",
    f"- {rounds} rounds, each a fresh process per mode, {steps} steps after 3"
    f" warm-up; medians; model VJPs {'on' if vjps else 'off (defaults)'}",
    "",
    "| dtype | mode | settings | step | / default | page faults a step | "
    "peak RSS | same loss |",
    "| --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  for r in rows:
    lines.append(
      f"| {r['dtype']} | {r['mode']} | {r['settings']} | {r['step_s']:.3f} s "
      f"| {r['ratio']:.2f} | {r['faults_per_step']:,.0f} | "
      f"{r['peak_rss_mb']:,.0f} MB | {'yes' if r['losses_equal'] else 'NO'} |"
    )
  return "\n".join(lines)


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="ref-5M")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=12)
  p.add_argument(
    "--vjps", action="store_true", help="model.attention_vjp and mlp_vjp on"
  )
  p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    mode, dtype = args.child
    print(json.dumps(child(mode, args.preset, dtype, args.steps, args.vjps)))
    return []
  dtypes = [d for d in args.dtypes.split(",") if d]
  say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
  rows = run(args.preset, dtypes, args.rounds, args.steps, args.vjps, say)
  print(report(rows, args.preset, args.rounds, args.steps, args.vjps))
  return rows


if __name__ == "__main__":
  main()
