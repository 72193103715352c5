"""XLA:CPU flags, one at a time, on the ref-5M full fine-tuning step.

  python bench/xla_flags.py [--dtypes float32 bfloat16] [--rounds 2]

Each (flag, dtype) is `bench/throughput.py` in a fresh process with
XLA_FLAGS set to that one flag (the flags are read once per process), 8 x
256, median of `--steps` steps after warm-up; the flags run interleaved,
`--rounds` times, and each row is the median over its rounds. The ratio is
the flag's step time over no flag's (below 1: faster). `loss` is the final
loss, to show whether a flag changed the numbers (fast math may).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_util  # noqa: E402

FLAGS = {
  "none (XLA's defaults)": "",
  "oneDNN": "--xla_cpu_use_onednn=true",
  "oneDNN dot fusion": "--xla_cpu_experimental_onednn_fusion_type=dot",
  "XNNPACK off": "--xla_cpu_use_xnnpack=false",
  "XNNPACK dot fusion": "--xla_cpu_experimental_xnn_fusion_type=dot",
  "XNN graph fusion (greedy)": (
    "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY"
  ),
  "512-bit vectors": "--xla_cpu_prefer_vector_width=512",
  "fast math": "--xla_cpu_enable_fast_math=true",
  "Eigen single-threaded": "--xla_cpu_multi_thread_eigen=false",
  "no concurrency-optimized scheduler": (
    "--xla_cpu_enable_concurrency_optimized_scheduler=false"
  ),
}


def one(flag: str, dtype: str, steps: int) -> dict | None:
  """throughput.py's figures under XLA_FLAGS=flag; None if it failed."""
  env = dict(os.environ, XLA_FLAGS=flag)
  with tempfile.NamedTemporaryFile(suffix=".json") as out:
    r = subprocess.run(
      [
        sys.executable,
        os.path.join(HERE, "throughput.py"),
        "--preset=ref-5M",
        f"--dtype={dtype}",
        f"--steps={steps}",
        "--peak_reps=2",
        f"--json={out.name}",
      ],
      env=env,
      capture_output=True,
      text=True,
    )
    if r.returncode:
      tail = (r.stderr or r.stdout).strip().splitlines()[-1:]
      print(f"  {flag or '(none)'} {dtype}: failed: {tail}", file=sys.stderr)
      return None
    with open(out.name) as f:
      return json.load(f)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--only", nargs="*", help="flag labels to run")
  args = ap.parse_args(argv)
  flags = {k: v for k, v in FLAGS.items() if not args.only or k in args.only}
  times = {(k, d): [] for k in flags for d in args.dtypes}
  loss = {}
  for _ in range(args.rounds):
    for d in args.dtypes:
      for k, flag in flags.items():
        res = one(flag, d, args.steps)
        if res is not None:
          times[k, d].append(res["step_s"])
          loss[k, d] = res["final_loss"]
  print(f"CPU: {bench_util.cpu_name()}; ref-5M full fine-tuning, 8 x 256")
  print("| flag | dtype | step | vs no flag | final loss |")
  print("| --- | --- | --- | --- | --- |")
  out = {}
  for d in args.dtypes:
    base = statistics.median(times[next(iter(flags)), d] or [float("nan")])
    for k, flag in flags.items():
      if not times[k, d]:
        print(f"| {k} (`{flag}`) | {d} | failed | | |")
        continue
      t = statistics.median(times[k, d])
      out[k, d] = t
      name = f"{k} (`{flag}`)" if flag else k
      print(f"| {name} | {d} | {t:.3f} s | {t / base:.2f} | {loss[k, d]:.5f} |")
  return out


if __name__ == "__main__":
  main()
