"""Peak host memory of a training process: jft vs PyTorch, full / LoRA /
QLoRA, and jft's full fine-tuning under each `model.remat` policy.

  python bench/memory.py [--steps 3] [--warmup 1] [--remat full,dots]
      [--cases jft-full,torch-full,...] [--shape 50M|tiny] [--json out.json]

Every row is a fresh process (so its peak RSS, `ru_maxrss`, is its own)
that imports one framework, builds a random Llama-shaped model, float32,
and runs `--warmup` + `--steps` AdamW train steps on one batch. The base is
techniques.py's cost base (50.9M parameters: d_model 768, 8 layers, GQA
12/4 heads, SwiGLU MLP 2048, vocab 384, untied embeddings), batch 4 x 128.

* jft: `bench/jft_side.py`'s step (as compare.py times it), parameters from
  `jft.init.init_params` as a run makes them (QLoRA: the float base first,
  then its kernels quantized: NF4 or int4, block 64, double quant, as
  configs/qlora.py; LoRA r=8, alpha 16 on all linear layers).
* PyTorch: `bench/torch_side.py`'s loop (as compare.py times it):
  transformers `LlamaForCausalLM`, PEFT LoRA with the same settings,
  `torch.optim.AdamW(fused=True)`. PyTorch QLoRA needs bitsandbytes; its row
  says why it is absent when it is.

Also reported: the peak of a process that only imported the same framework
and ran one op (the runtime, to subtract), the peak after building (model,
optimizer state and, for jft, the step's compile), the bytes of parameters
+ optimizer state, and for jft the step's temporaries as XLA plans them
(`memory_analysis().temp_size_in_bytes`: the activations kept for the
backward pass among them), which is what `model.remat` trades for
recompute. Figures, never a pass/fail check (tests/test_bench.py only runs
a tiny shape). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_util import Shape, cpu_name, peak_mib, rss_mib  # noqa: E402
from techniques import (  # noqa: E402
  COST_BATCH,
  COST_MODEL,
  COST_SEQ,
  COST_VOCAB,
)

SHAPES = {
  "50M": Shape(
    vocab_size=COST_VOCAB,
    **COST_MODEL,
    batch=COST_BATCH,
    seq=COST_SEQ,
    prompt=0,
  ),
  # Seconds: the smoke test's size (multiples of 64 for QLoRA's blocks).
  "tiny": Shape(256, 64, 2, 4, 2, 128, batch=2, seq=16, prompt=0),
}
QLORA = {"quant.block_size": 64, "quant.double_quant": True}
# case -> (framework, workload or None for the runtime alone, overrides)
CASES = {
  "jft-runtime": ("jft", None, {}),
  "jft-full": ("jft", "full", {}),
  "jft-lora": ("jft", "lora", {}),
  "jft-qlora-nf4": ("jft", "lora", {**QLORA, "quant.kind": "nf4"}),
  "jft-qlora-int4": ("jft", "lora", {**QLORA, "quant.kind": "int4"}),
  "torch-runtime": ("torch", None, {}),
  "torch-full": ("torch", "full", {}),
  "torch-lora": ("torch", "lora", {}),
  "torch-qlora-nf4": ("torch", "qlora", {}),
}
LABELS = {
  "jft": "jft",
  "torch": "PyTorch + transformers",
}
TECHNIQUE = {
  "full": "full fine-tuning",
  "lora": "LoRA r=8, all linear",
  "qlora": "QLoRA nf4",
}


def cases(remat: list[str]) -> dict:
  """CASES plus one jft full fine-tuning case per extra remat policy."""
  out = {}
  for name, case in CASES.items():
    out[name] = case
    if name == "jft-full":  # next to it in the table
      for r in remat:
        out[f"jft-full-remat-{r}"] = ("jft", "full", {"model.remat": r})
  return out


def technique(name: str, case) -> str:
  fw, workload, over = case
  if workload is None:
    return "runtime only (imports, one op)"
  t = TECHNIQUE[workload]
  if "quant.kind" in over:
    t = f"QLoRA {over['quant.kind']} (double quant), LoRA r=8"
  if fw == "torch" and workload == "lora":
    t += " (PEFT)"
  if fw == "jft" and workload == "full":
    t += f", remat={over.get('model.remat', 'none')}"
  return t


def torch_qlora_absent() -> str | None:
  """Why there is no PyTorch QLoRA row (None: nothing stops one)."""
  if importlib.util.find_spec("bitsandbytes") is None:
    return (
      "bitsandbytes (the 4-bit layers PEFT's QLoRA needs) is not installed here"
    )
  return "bitsandbytes is installed, but this bench has no PyTorch QLoRA case"


def measure(name: str, case, shape: Shape, steps: int, warmup: int) -> dict:
  """Runs one case in this process (a fresh one); returns its figures."""
  fw, workload, over = case
  if fw == "jft":
    import jax
    import jft_side

    jax.numpy.zeros(1).block_until_ready()
    versions = {"jax": jax.__version__}
  else:
    import peft
    import torch
    import torch_side
    import transformers

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.ones(1).add_(1)
    versions = {
      "torch": torch.__version__,
      "transformers": transformers.__version__,
      "peft": peft.__version__,
    }
  row = {"case": name, "runtime_mib": peak_mib(), **versions}
  if workload is None:
    return {**row, "peak_mib": peak_mib()}
  if fw == "jft":
    system = jft_side.JftSystem(
      workload, "float32", shape, overrides=over, jft_init=True
    )
  else:
    system = torch_side.TorchSystem(workload, "float32", shape)
  row["built_peak_mib"] = peak_mib()
  for _ in range(warmup):
    system.step()
  times = [system.step() for _ in range(steps)]
  if fw == "jft":
    param_bytes, opt_bytes = system.param_bytes, system.opt_bytes
    row["temp_bytes"] = system.temp_bytes
  else:
    param_bytes, opt_bytes = system.state_bytes()
  return {
    **row,
    "params": system.params_total,
    "trainable": system.params_trainable,
    "param_bytes": param_bytes,
    "opt_bytes": opt_bytes,
    "step_s": statistics.median(times) if times else None,
    "loss": system.loss,
    "rss_mib": rss_mib(),
    "peak_mib": peak_mib(),
  }


def _mb(mib) -> str:
  if mib is None:
    return "—"
  return f"{mib:,.0f} MB" if abs(mib) >= 10 else f"{mib:.1f} MB"


def format_report(info: dict, rows: list[dict], absent: str | None) -> str:
  s = SHAPES[info["shape"]]
  base = next((r["params"] for r in rows if "params" in r), 0)
  lines = [
    f"## Peak host memory per training process ({info['date']})",
    "",
    f"- CPU: {info['cpu']}; {info['threads']} cores in the affinity",
    f"- {info['versions']}",
    f"- base {info['shape']}: {base:,} parameters (d_model {s.d_model}, "
    f"{s.n_layers} layers, {s.n_heads}/{s.n_kv_heads} heads, MLP "
    f"{s.mlp_dim}, vocab {s.vocab_size}), float32, AdamW, batch {s.batch} "
    f"x {s.seq}; {info['warmup']} warm-up + {info['steps']} measured "
    "step(s), each row a fresh process",
    "- peak - runtime: the row's peak RSS less that of a process that only "
    "imported the same framework; XLA temporaries: the jft step's planned "
    "scratch (activations for the backward pass among them)",
    "",
    "| system | technique | peak RSS | peak - runtime | peak after build "
    "| params + optimizer state | XLA temporaries |",
    "| --- | --- | --- | --- | --- | --- | --- |",
  ]
  runtime = {r["framework"]: r["peak_mib"] for r in rows if r["runtime_only"]}
  for r in rows:
    fw = r["framework"]
    if r["runtime_only"]:
      lines.append(
        f"| {LABELS[fw]} | {r['technique']} | {_mb(r['peak_mib'])} | — | — "
        "| — | — |"
      )
      continue
    rt = runtime.get(fw)
    temp = r.get("temp_bytes")
    lines.append(
      f"| {LABELS[fw]} | {r['technique']} | {_mb(r['peak_mib'])} | "
      f"{_mb(None if rt is None else r['peak_mib'] - rt)} | "
      f"{_mb(r['built_peak_mib'])} | "
      f"{_mb((r['param_bytes'] + r['opt_bytes']) / 2**20)} | "
      f"{_mb(None if temp is None else temp / 2**20)} |"
    )
  if absent:
    lines.append(
      f"| {LABELS['torch']} | QLoRA nf4 (PEFT) | not measured: {absent} "
      "| — | — | — | — |"
    )
  return "\n".join(lines)


def run_child(name: str, args) -> dict:
  """`name` in a fresh process; its figures, or an error row."""
  cmd = [sys.executable, os.path.abspath(__file__), f"--_child={name}"]
  cmd += [f"--shape={args.shape}", f"--steps={args.steps}"]
  cmd += [f"--warmup={args.warmup}", f"--remat={','.join(args.remat)}"]
  out = subprocess.run(
    cmd,
    capture_output=True,
    text=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    check=False,
  )
  if out.returncode:
    raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shape", default="50M", choices=tuple(SHAPES))
  p.add_argument("--steps", type=int, default=3, help="measured steps")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument(
    "--remat",
    default="full,dots",
    help="extra jft full fine-tuning rows, one per model.remat policy "
    "(none is the jft-full row)",
  )
  p.add_argument("--cases", default="", help="default: all")
  p.add_argument("--json", default="")
  p.add_argument("--_child", default="", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  args.remat = [r for r in args.remat.split(",") if r and r != "none"]
  known = cases(args.remat)
  args.cases = [c for c in args.cases.split(",") if c] or list(known)
  bad = sorted(set(args.cases) - set(known))
  if bad:
    p.error(f"--cases: unknown {bad}; expected some of {tuple(known)}")
  return args


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  known = cases(args.remat)
  shape = SHAPES[args.shape]
  if args._child:
    case = known[args._child]
    res = measure(args._child, case, shape, args.steps, args.warmup)
    print(json.dumps(res))
    return [res]
  absent = None
  rows = []
  for name in args.cases:
    fw, workload, _ = known[name]
    if workload == "qlora":  # PyTorch QLoRA: bitsandbytes
      absent = torch_qlora_absent()
      continue
    print(f"measuring {name} ...", file=sys.stderr, flush=True)
    row = run_child(name, args)
    row.update(
      framework=fw,
      workload=workload,
      quant=known[name][2].get("quant.kind", ""),
      runtime_only=workload is None,
      technique=technique(name, known[name]),
    )
    rows.append(row)
  versions = {}
  for r in rows:
    versions.update(
      {k: r[k] for k in ("jax", "torch", "transformers", "peft") if k in r}
    )
  info = {
    "date": datetime.date.today().isoformat(),
    "cpu": cpu_name(),
    "threads": len(os.sched_getaffinity(0)),
    "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
    "shape": args.shape,
    "steps": args.steps,
    "warmup": args.warmup,
  }
  print(format_report(info, rows, absent))
  for workload in ("full", "lora"):  # the same model on both sides
    sizes = {
      (r["params"], r["trainable"])
      for r in rows
      if r.get("workload") == workload and not r.get("quant")
    }
    if len(sizes) > 1:
      print(f"\n{workload}: (params, trainable) differ: {sorted(sizes)}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"info": info, "rows": rows, "absent": absent}, f, indent=2)
  return rows


if __name__ == "__main__":
  main()
