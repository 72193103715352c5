"""Submits one jft job to a SLURM GPU cluster: one process per GPU.

Writes an sbatch script that `srun`s `python -m jft.main` once per GPU
(JAX's SLURM convention: task `SLURM_LOCALID` drives that GPU of its node).
Inside `srun`, jft.main sees SLURM_NTASKS > 1 and starts jax.distributed,
which reads the coordinator (first node of the step), process count and id
from SLURM's environment:

  python launch/slurm.py --nodes=4 --gpus_per_node=8 --partition=gpu \\
    --time=12:00:00 --dry_run -- \\
    --config=configs/sft.py --workdir=/shared/runs/sft-4n

`--workdir` must be on a filesystem every node mounts. `--dry_run` prints
the script and the sbatch command instead of submitting.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile


def _workdir(job_args) -> str | None:
  for i, a in enumerate(job_args):
    if a.startswith("--workdir="):
      return a.split("=", 1)[1]
    if a == "--workdir" and i + 1 < len(job_args):
      return job_args[i + 1]
  return None


def script(args: argparse.Namespace) -> str:
  """The sbatch script's text."""
  workdir = _workdir(args.job_args)
  directives = [
    f"--job-name={args.job_name}",
    f"--nodes={args.nodes}",
    f"--ntasks-per-node={args.gpus_per_node}",
    f"--gpus-per-node={args.gpus_per_node}",
    f"--cpus-per-task={args.cpus_per_task}",
    f"--time={args.time}",
    f"--output={os.path.join(workdir, 'slurm-%j.out')}",
  ]
  if args.partition:
    directives.append(f"--partition={args.partition}")
  if args.account:
    directives.append(f"--account={args.account}")
  directives += args.sbatch
  lines = ["#!/bin/bash"] + [f"#SBATCH {d}" for d in directives]
  lines += ["set -euo pipefail", f"cd {shlex.quote(args.repo_dir)}"]
  if args.venv:
    lines.append(f"source {shlex.quote(args.venv)}/bin/activate")
  lines += [f"export {e}" for e in args.env]
  lines.append(f"mkdir -p {shlex.quote(workdir)}")
  job = shlex.join([args.python, "-m", "jft.main", *args.job_args])
  lines.append(f"srun --kill-on-bad-exit=1 {job}")
  return "\n".join(lines) + "\n"


def parse(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--nodes", type=int, default=1)
  p.add_argument("--gpus_per_node", type=int, default=8)
  p.add_argument("--cpus_per_task", type=int, default=8, help="per GPU")
  p.add_argument("--time", default="04:00:00")
  p.add_argument("--partition", default="")
  p.add_argument("--account", default="")
  p.add_argument("--job_name", default="jft")
  p.add_argument("--repo_dir", default=os.getcwd(), help="checkout to cd to")
  p.add_argument("--venv", default="", help="virtualenv to activate")
  p.add_argument("--python", default="python")
  p.add_argument("--env", action="append", default=[], help="KEY=VALUE")
  p.add_argument(
    "--sbatch", action="append", default=[], help="extra #SBATCH line"
  )
  p.add_argument("--dry_run", action="store_true")
  p.add_argument("job_args", nargs=argparse.REMAINDER)
  args = p.parse_args(argv)
  if args.job_args[:1] == ["--"]:
    args.job_args = args.job_args[1:]
  if _workdir(args.job_args) is None:
    p.error("pass --workdir=DIR (on storage all nodes share) after --")
  return args


def main(argv: list[str] | None = None) -> int:
  args = parse(sys.argv[1:] if argv is None else argv)
  text = script(args)
  if args.dry_run:
    print(text, end="")
    print("# submit with: sbatch SCRIPT")
    return 0
  with tempfile.NamedTemporaryFile(
    "w", prefix="jft-", suffix=".sbatch", delete=False
  ) as f:
    f.write(text)
  print(f"sbatch script: {f.name}")
  return subprocess.call(["sbatch", f.name])


if __name__ == "__main__":
  sys.exit(main())
