"""Runs one jft job on every worker of a Cloud TPU VM slice (a pod).

Each TPU VM host runs one process, `python -m jft.main ... --distributed=on`;
JAX finds the other hosts from the TPU metadata, so no addresses are
passed. `--sync` first copies the checkout (`--source`, default `.`) to
`--repo_dir` on every worker (copy a clean checkout: scp takes everything):

  python launch/tpu_pod.py --tpu=my-v4-32 --zone=us-central2-b --sync \\
    --setup='pip install -e .' --dry_run -- \\
    --config=configs/pretrain_clm.py:small --workdir=/mnt/shared/runs/v4

`--workdir` must be on storage every worker sees (NFS, a GCS FUSE mount):
each process writes its checkpoint shards there. `--dry_run` prints the
gcloud commands instead of running them.
"""

from __future__ import annotations

import argparse
import os
import posixpath
import shlex
import subprocess
import sys


def _has_workdir(job_args) -> bool:
  return any(a.startswith("--workdir=") for a in job_args) or (
    "--workdir" in job_args
  )


def commands(args: argparse.Namespace) -> list[list[str]]:
  """The gcloud invocations, in order: optional copy, then the run."""
  where = [f"--zone={args.zone}"]
  if args.project:
    where.append(f"--project={args.project}")
  cmds = []
  if args.sync:
    cmds.append(
      [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "scp",
        "--recurse",
        "--worker=all",
        *where,
        os.path.abspath(args.source),
        f"{args.tpu}:{posixpath.dirname(args.repo_dir) or '~'}",
      ]
    )
  job = shlex.join(
    [args.python, "-m", "jft.main", *args.job_args, "--distributed=on"]
  )
  steps = [f"cd {args.repo_dir}"]
  if args.setup:
    steps.append(args.setup)
  env = " ".join(args.env)
  steps.append(f"{env} {job}".strip())
  cmds.append(
    [
      "gcloud",
      "compute",
      "tpus",
      "tpu-vm",
      "ssh",
      args.tpu,
      "--worker=all",
      *where,
      f"--command={' && '.join(steps)}",
    ]
  )
  return cmds


def parse(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--tpu", required=True, help="TPU VM (slice) name")
  p.add_argument("--zone", required=True)
  p.add_argument("--project", default="")
  p.add_argument(
    "--repo_dir",
    default="",
    help="the checkout on each worker (default ~/NAME of --source)",
  )
  p.add_argument(
    "--sync", action="store_true", help="scp --source to every worker first"
  )
  p.add_argument("--source", default=".", help="local checkout to copy")
  p.add_argument(
    "--setup", default="", help="shell run on each worker before the job"
  )
  p.add_argument("--python", default="python3")
  p.add_argument(
    "--env", action="append", default=[], help="KEY=VALUE for the job"
  )
  p.add_argument("--dry_run", action="store_true")
  p.add_argument("job_args", nargs=argparse.REMAINDER)
  args = p.parse_args(argv)
  if args.job_args[:1] == ["--"]:
    args.job_args = args.job_args[1:]
  name = os.path.basename(os.path.abspath(args.source))
  args.repo_dir = args.repo_dir or f"~/{name}"
  if args.sync and posixpath.basename(args.repo_dir) != name:
    p.error(
      f"--sync copies {name}/ into the parent of --repo_dir, so its "
      f"last part must be {name!r}, got {args.repo_dir!r}"
    )
  if not _has_workdir(args.job_args):
    p.error("pass --workdir=DIR (on storage all workers share) after --")
  return args


def main(argv: list[str] | None = None) -> int:
  args = parse(sys.argv[1:] if argv is None else argv)
  for cmd in commands(args):
    if args.dry_run:
      print(shlex.join(cmd))
      continue
    code = subprocess.call(cmd)
    if code:
      return code
  return 0


if __name__ == "__main__":
  sys.exit(main())
