"""CLI: `python -m jft.interop.hf export|flags`.

export --workdir=RUN --out=DIR   a jft run's checkpoint (latest or --step)
                                 as a Hugging Face directory (LoRA merged)
flags DIR                        the `--config.model.*` flags that rebuild
                                 DIR's architecture without its weights
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from jft import errors
from jft.interop.hf import config as hf_config
from jft.interop.hf import export as hf_export
from jft.interop.hf import writer


def export_run(
  workdir: str,
  out: str,
  *,
  step: int | None = None,
  dtype: str | None = None,
  max_shard_bytes: int = writer.MAX_SHARD_BYTES,
  overwrite: bool = False,
) -> str:
  """Writes a jft run's checkpoint (latest or `step`) as an HF dir."""
  import ml_collections

  from jft import checkpoint, sharding
  from jft.data import tokenizer as tokenizers
  from jft.models import transformer

  with open(os.path.join(workdir, hf_config.CONFIG_FILE)) as fh:
    run_config = json.load(fh)
  model_cfg = transformer.config_from_dict(run_config["model"])
  mesh = sharding.make_mesh(
    ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  )
  params = checkpoint.load_params(workdir, mesh, step)
  try:
    tok = tokenizers.load_tokenizer_dir(workdir)
  except FileNotFoundError as e:
    print(f"warning: exporting without a tokenizer ({e})", file=sys.stderr)
    tok = None
  return hf_export.export_model(
    out,
    params,
    model_cfg,
    tokenizer=tok,
    source=os.path.join(workdir, hf_export.SOURCE_DIR),
    dtype=dtype,
    max_shard_bytes=max_shard_bytes,
    overwrite=overwrite,
  )


def main(argv: Sequence[str] | None = None) -> None:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument(
    "--verbose", action="store_true", help="tracebacks for user errors too"
  )
  parser = argparse.ArgumentParser(
    prog="python -m jft.interop.hf",
    description=__doc__.split("\n")[0],
    parents=[common],
  )
  sub = parser.add_subparsers(dest="command", required=True)
  exp = sub.add_parser(
    "export", help="jft run checkpoint -> HF directory", parents=[common]
  )
  exp.add_argument("--workdir", required=True, help="jft run directory")
  exp.add_argument("--out", required=True, help="HF directory to write")
  exp.add_argument("--step", type=int, default=None, help="default: latest")
  exp.add_argument(
    "--dtype",
    default="source",
    choices=["source", "bfloat16", "float16", "float32", "keep"],
    help="source: the source checkpoint's dtype (else the params'); keep: "
    "the params' own",
  )
  exp.add_argument("--max_shard_gb", type=float, default=2.0)
  exp.add_argument("--overwrite", action="store_true")
  flg = sub.add_parser(
    "flags", help="print --config.model.* for an HF dir", parents=[common]
  )
  flg.add_argument("dir")
  args = parser.parse_args(argv)
  if args.command == "export":
    if not os.path.isfile(os.path.join(args.workdir, hf_config.CONFIG_FILE)):
      raise errors.UserError(
        f"--workdir={args.workdir}: not a jft run directory (no "
        f"{hf_config.CONFIG_FILE})"
      )
    dtype = {"source": None, "keep": "keep"}.get(args.dtype, args.dtype)
    export_run(
      args.workdir,
      args.out,
      step=args.step,
      dtype=dtype,
      max_shard_bytes=int(args.max_shard_gb * 1024**3),
      overwrite=args.overwrite,
    )
    print(f"wrote {args.out}")
  else:
    if not os.path.isfile(os.path.join(args.dir, hf_config.CONFIG_FILE)):
      raise errors.UserError(
        f"{args.dir}: not a Hugging Face checkpoint directory (no "
        f"{hf_config.CONFIG_FILE})"
      )
    fields = hf_config.config_from_hf(
      hf_config.load_hf_config(args.dir),
      os.path.join(args.dir, hf_config.CONFIG_FILE),
    )
    print(" ".join(hf_config.flags_for(fields)))


if __name__ == "__main__":
  from jft import cli

  cli.run_main(lambda: main(sys.argv[1:]))
