"""Peak host memory while loading a Hugging Face checkpoint.

  python bench/load_memory.py                   # llama-3.2-1b shape
  python bench/load_memory.py --preset tiny     # a quick run

Writes random bf16 safetensors of the preset's shape (as the Hub ships
Llama 3.2 1B: two shards + index) once, then loads them in a fresh process
per mode through jft's own path (`jft.init.init_params`, `init='hf:DIR'`):

  float32      params upcast to float32 (full fine-tuning)
  bfloat16     params kept in bf16
  qlora-nf4    4-bit NF4 kernels (double quant, block 64) quantized layer by
               layer while reading, plus rank-8 LoRA adapters
  naive-f32    the old way, for reference: every file read whole into host
               numpy, cast, then placed on the device

and prints each one's peak RSS next to the bytes its parameters hold and
the RSS of the same process before loading (the runtime). Figures only;
never a test. Quote the CPU with them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_util import cpu_name, peak_mib, rss_mib  # noqa: E402

MODES = ("float32", "bfloat16", "qlora-nf4", "naive-f32")


def write_checkpoint(directory: str, preset: str) -> None:
  """Random bf16 weights of `preset`'s shape, in shards of about half the
  model + index (as the Hub ships Llama 3.2 1B)."""
  import ml_dtypes
  import safetensors.numpy

  from jft.interop.hf import config as hf_config
  from jft.interop.hf import weights, writer
  from jft.models import transformer

  cfg = transformer.config_from_dict({"preset": preset})
  if os.path.exists(os.path.join(directory, weights.INDEX_FILE)):
    return
  os.makedirs(directory, exist_ok=True)
  specs = weights.tensor_specs(cfg)
  sizes = {n: int(np.prod(s.hf_shape)) * 2 for n, s in specs.items()}
  half = sum(sizes.values()) // 2 + 1
  rng = np.random.default_rng(0)
  weight_map = {}
  shards = writer.plan_shards(sizes, half)
  for k, names in enumerate(shards):
    file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
    tensors = {}
    for n in names:
      shape = specs[n].hf_shape
      x = rng.standard_normal(shape, dtype=np.float32) * 0.02
      tensors[n] = x.astype(ml_dtypes.bfloat16)
      del x
    safetensors.numpy.save_file(
      tensors, os.path.join(directory, file), metadata={"format": "pt"}
    )
    weight_map.update(dict.fromkeys(names, file))
    del tensors
  with open(os.path.join(directory, weights.INDEX_FILE), "w") as fh:
    json.dump({"metadata": {}, "weight_map": weight_map}, fh)
  with open(os.path.join(directory, "config.json"), "w") as fh:
    json.dump(hf_config.config_to_hf(cfg, dtype="bfloat16"), fh)


def load_once(directory: str, mode: str) -> dict:
  """Loads in this process; returns the figures (run in a fresh process)."""
  import jax

  from jft import config as base_config
  from jft import init, sharding
  from jft.models import transformer

  jax.numpy.zeros(1).block_until_ready()  # the runtime, before loading
  before = rss_mib()
  c = base_config.base_config()
  c.init = f"hf:{directory}"
  c.model.preset = ""
  c.model.dtype = c.model.param_dtype = (
    "bfloat16" if mode == "bfloat16" else "float32"
  )
  c.mesh.num_devices = 1
  if mode == "qlora-nf4":
    c.lora.rank = 8
    c.quant.kind = "nf4"
    c.quant.double_quant = True

  class _Vocab:  # the checkpoint brings its shape; no tokenizer needed
    vocab_size = 1

  cfg = init.model_config(c, _Vocab())
  mesh = sharding.make_mesh(c.mesh)
  if mode == "naive-f32":
    params = _naive(directory, cfg)
  else:
    params = init.init_params(c, cfg, mesh, sharding.rules_from_config(c.mesh))
  jax.block_until_ready(params)
  return {
    "mode": mode,
    "param_mib": transformer.param_bytes(params) / 2**20,
    "runtime_mib": before,
    "peak_mib": peak_mib(),
  }


def _naive(directory: str, cfg):
  """Whole files into host numpy, cast, stacked, then device_put."""
  import glob

  import jax
  import safetensors.numpy
  from flax import traverse_util

  from jft.interop.hf import weights

  host = {}
  for f in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
    host.update(safetensors.numpy.load_file(f))
  flat = {}
  for leaf, tensors in weights.leaf_specs(cfg).items():
    arrs = [
      host[n].astype(np.float32).T if s.transpose else host[n]
      for n, s in tensors
    ]
    arrs = [a.astype(np.float32) for a in arrs]
    flat[leaf] = np.stack(arrs) if len(arrs) > 1 else arrs[0]
  params = jax.device_put(traverse_util.unflatten_dict(flat, sep="/"))
  del host, flat
  return params


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="llama-3.2-1b")
  p.add_argument("--dir", default="/tmp/jft-bench-load")
  p.add_argument("--modes", default=",".join(MODES))
  p.add_argument("--_child", default="", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  directory = os.path.join(args.dir, args.preset)
  if args._child:
    print(json.dumps(load_once(directory, args._child)))
    return []
  write_checkpoint(directory, args.preset)
  on_disk = sum(
    os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)
  )
  print(
    f"loading {args.preset} (random bf16 safetensors, {on_disk / 2**20:,.0f} "
    f"MiB on disk; {cpu_name()})"
  )
  print(
    f"{'mode':10s} {'params MiB':>11s} {'runtime MiB':>12s} {'peak MiB':>9s}"
  )
  rows = []
  for mode in args.modes.split(","):
    out = subprocess.run(
      [sys.executable, __file__, f"--preset={args.preset}", f"--dir={args.dir}"]
      + [f"--_child={mode}"],
      capture_output=True,
      text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
      check=False,
    )
    if out.returncode:
      print(f"{mode}: failed\n{out.stderr[-2000:]}")
      continue
    row = json.loads(out.stdout.strip().splitlines()[-1])
    rows.append(row)
    print(
      f"{mode:10s} {row['param_mib']:11,.0f} {row['runtime_mib']:12,.0f} "
      f"{row['peak_mib']:9,.0f}"
    )
  return rows


if __name__ == "__main__":
  main()
