"""Full fine-tuning vs LoRA vs QLoRA (int4, nf4): the trade-off in one table.

Two parts, each technique in its own process (so peak RSS is its own):

* quality: SFT on the built-in tasks from the same pretrained base (the
  cached `configs/pretrain_clm.py:PRESET` stage), same data, same steps;
  final eval/loss and eval/task_accuracy.
* cost: the same techniques on a >= 50M-parameter base (random init; the
  numbers do not depend on the weights): trainable parameters, bytes of
  parameters + optimizer state, frozen bytes vs the base in bfloat16, peak
  RSS and median step time after warm-up.

  python bench/techniques.py [--quality_preset mini] [--quality_steps 300]
      [--cost_steps 8 (0: quality only)] [--json out.json]
Not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TECHNIQUES = {
  "full": ("configs/sft.py", {}),
  "lora": ("configs/lora.py", {}),
  "qlora-int4": ("configs/qlora.py", {"quant.kind": "int4"}),
  "qlora-nf4": ("configs/qlora.py", {"quant.kind": "nf4"}),
}
# A >= 50M-parameter Llama-style base for the cost part (~57M with the
# built-in tokenizer's 384-token vocabulary).
COST_MODEL = dict(
  d_model=768, n_layers=8, n_heads=12, n_kv_heads=4, mlp_dim=2048
)
COST_VOCAB = 384  # the built-in tokenizer's, rounded up to a multiple of 64
COST_BATCH, COST_SEQ = 4, 128


def _set(config, key, value):
  node = config
  *head, last = key.split(".")
  for h in head:
    node = node[h]
  node[last] = value


def worker(args) -> dict:
  sys.path.insert(0, ROOT)
  from jft import init, train

  path, overrides = TECHNIQUES[args.tech]
  config = init.load_config_file(os.path.join(ROOT, path) + f":{args.preset}")
  for k, v in overrides.items():
    _set(config, k, v)
  config.log_every = max(args.steps // 4, 1)
  config.checkpoint_every = args.steps
  config.total_steps = args.steps
  if args.part == "cost":
    config.init = ""
    config.model.preset = "tiny"
    for k, v in COST_MODEL.items():
      _set(config, f"model.{k}", v)
    config.batch_size, config.seq_len = COST_BATCH, COST_SEQ
    config.eval_every = 0
    config.log_every = 1
    config.lora.save_adapters = False
  else:
    config.eval_every = args.steps
    # mini's MLP width (352) is not a multiple of 64
    config.quant.block_size = args.quality_block
  workdir = tempfile.mkdtemp(prefix=f"jft-bench-{args.tech}-")
  train.run(config, workdir)
  rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
  first = rows[0]
  rates = [r["train/steps_per_s"] for r in rows if "train/steps_per_s" in r]
  last = {}
  for r in rows:
    last.update(r)
  return {
    "tech": args.tech,
    "part": args.part,
    "trainable": first["params/trainable"],
    "frozen": first["params/frozen"],
    "param_bytes": first["params/trainable_bytes"]
    + first["params/frozen_bytes"],
    "frozen_bytes": first["params/frozen_bytes"],
    "opt_bytes": first["params/opt_state_bytes"],
    "step_s": float(1 / np.median(rates[1:])) if len(rates) > 1 else None,
    "eval_loss": last.get("eval/loss"),
    "task_accuracy": last.get("eval/task_accuracy"),
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
  }


def run_worker(tech, part, preset, steps) -> dict:
  out = tempfile.mktemp(suffix=".json")
  cmd = [
    sys.executable,
    os.path.abspath(__file__),
    "--worker",
    f"--tech={tech}",
    f"--part={part}",
    f"--preset={preset}",
    f"--steps={steps}",
    f"--json={out}",
  ]
  subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
  with open(out) as f:
    return json.load(f)


def _mb(x):
  return f"{x / 2**20:,.1f} MB"


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--worker", action="store_true")
  ap.add_argument("--tech", default="full")
  ap.add_argument("--part", default="quality")
  ap.add_argument("--preset", default="mini")
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--quality_block", type=int, default=32)
  ap.add_argument("--quality_preset", default="mini")
  ap.add_argument("--quality_steps", type=int, default=300)
  ap.add_argument("--cost_steps", type=int, default=8)
  ap.add_argument("--techniques", default=",".join(TECHNIQUES))
  ap.add_argument("--json", default="")
  args = ap.parse_args()
  if args.worker:
    res = worker(args)
    with open(args.json, "w") as f:
      json.dump(res, f)
    return
  techs = args.techniques.split(",")
  quality = {
    t: run_worker(t, "quality", args.quality_preset, args.quality_steps)
    for t in techs
  }
  if not args.cost_steps:  # --cost_steps=0: the quality part alone
    print("| technique | eval/loss | task accuracy |\n| --- | --- | --- |")
    for t in techs:
      q = quality[t]
      print(f"| {t} | {q['eval_loss']:.4f} | {q['task_accuracy']:.3f} |")
    return
  cost = {t: run_worker(t, "cost", "tiny", args.cost_steps) for t in techs}
  base = cost[techs[0]]["trainable"] + cost[techs[0]]["frozen"]
  bf16_base = 2 * (cost["full"]["trainable"] if "full" in cost else base)
  head = (
    "| technique | trainable params (50M base) | params + opt state | "
    "frozen bytes / bf16 base | peak RSS | step time | eval/loss | "
    "task accuracy |"
  )
  print(head)
  print("|" + " --- |" * 8)
  for t in techs:
    c, q = cost[t], quality[t]
    ratio = c["frozen_bytes"] / bf16_base if c["frozen_bytes"] else 0.0
    print(
      f"| {t} | {int(c['trainable']):,} ({100 * c['trainable'] / base:.2f}%) | "
      f"{_mb(c['param_bytes'] + c['opt_bytes'])} | {ratio:.3f} | "
      f"{c['peak_rss_mb']:,.0f} MB | {c['step_s']:.3f} s | "
      f"{q['eval_loss']:.4f} | {q['task_accuracy']:.3f} |"
    )
  full = cost.get("full", {}).get("step_s")
  lo = cost.get("lora", {}).get("step_s")
  for t in ("qlora-int4", "qlora-nf4"):
    if t in cost and lo:
      print(f"{t} step time / LoRA: {cost[t]['step_s'] / lo:.2f}")
  if full and lo:
    print(f"LoRA step time / full FT: {lo / full:.2f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"quality": quality, "cost": cost}, f, indent=2)


if __name__ == "__main__":
  main()
