"""Soak: a training run interrupted at random must equal an uninterrupted one.

Runs `python -m jft.main` on a tiny model for `--steps` steps, interrupting
it `--interrupts` times at random: kill -9 at a random step, kill -9 while a
checkpoint is being written (the moment orbax's temporary step directory
appears), or SIGTERM (which must save, exit 75 and lose nothing). Each
interruption is followed by a rerun of the same command. At the end every
metrics row (timings aside) and every parameter of the final checkpoint
must equal an uninterrupted run's, bit for bit.

  python bench/soak.py                       # 300 steps, 20 interruptions
  python bench/soak.py --steps=40 --interrupts=3

Prints one line per interruption and a verdict; exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ("train/tokens_per_s", "train/steps_per_s")
KINDS = ("kill9", "kill9_saving", "sigterm")


def make_data(root: str) -> dict[str, str]:
  """A small task suite and tokenizer, made once and shared by every run."""
  sys.path.insert(0, ROOT)
  from jft.data import tasks
  from jft.data.tokenizer import train_tokenizer

  paths = tasks.write_suite(root, n_train=300, n_eval=20, seed=0)
  with open(paths["pretrain_train"]) as f:
    texts = [json.loads(ln)["text"] for ln in f]
  tok = os.path.join(root, "tok.model")
  train_tokenizer(texts, output_path=tok, vocab_size=512)
  return {"tok": tok, "train": paths["pretrain_train"]}


def command(workdir: str, data: dict, steps: int) -> list[str]:
  sets = {
    "total_steps": steps,
    "checkpoint_every": 10,
    "keep_checkpoints": 2,
    "log_every": 1,
    "eval_every": 0,
    "batch_size": 8,
    "seq_len": 32,
    "model.d_model": 32,
    "model.mlp_dim": 64,
    "model.n_heads": 2,
    "model.n_kv_heads": 1,
    "optimizer.warmup_steps": 5,
    "data.tokenizer": data["tok"],
    "data.train_files": data["train"],
  }
  return [
    sys.executable,
    "-m",
    "jft.main",
    "--config=configs/pretrain_clm.py",
    f"--workdir={workdir}",
    *(f"--config.{k}={v}" for k, v in sets.items()),
  ]


def _env() -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one device: the soak is about files
  return env


def logged_step(workdir: str) -> int:
  """The highest step in metrics.jsonl (0 if none yet)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  step = 0
  with open(path) as f:
    for line in f:
      try:
        step = max(step, json.loads(line)["step"])
      except (ValueError, KeyError):
        pass  # a line being written
  return step


def _saving(workdir: str) -> bool:
  d = os.path.join(workdir, "checkpoints")
  return os.path.isdir(d) and any("tmp" in n for n in os.listdir(d))


def _total(cmd) -> int:
  arg = next(a for a in cmd if a.startswith("--config.total_steps="))
  return int(arg.split("=", 1)[1])


def interrupt(cmd, workdir: str, kind: str, at_step: int) -> str:
  """Runs `cmd` until step `at_step` is logged (and, for kill9_saving, a
  save is in flight), then interrupts it; returns what happened."""
  proc = subprocess.Popen(
    cmd,
    cwd=ROOT,
    env=_env(),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  started = time.time()
  rows = os.path.join(workdir, "metrics.jsonl")
  try:
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
      fresh = os.path.exists(rows) and os.path.getmtime(rows) > started
      if (
        fresh
        and logged_step(workdir) >= at_step
        and (kind != "kill9_saving" or _saving(workdir))
      ):
        break
      time.sleep(0.002 if kind == "kill9_saving" else 0.01)
    if proc.poll() is not None:
      _, err = proc.communicate()
      if proc.returncode != 0:
        raise RuntimeError(f"run failed ({proc.returncode}):\n{err[-3000:]}")
      return "finished before the interruption"
    step = logged_step(workdir)
    if kind == "sigterm":
      proc.send_signal(signal.SIGTERM)
      _, err = proc.communicate(timeout=300)
      if proc.returncode == 0 and logged_step(workdir) >= _total(cmd):
        return f"SIGTERM at step ~{step}, as the run finished: exit 0"
      if proc.returncode != 75:
        raise RuntimeError(
          f"SIGTERM: exit {proc.returncode}, not 75:\n{err[-3000:]}"
        )
      return f"SIGTERM at step ~{step}: saved and exited 75"
    proc.kill()
    proc.wait()
    return f"kill -9 at step ~{step}" + (
      " during a checkpoint write" if kind == "kill9_saving" else ""
    )
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def finish(cmd) -> None:
  out = subprocess.run(
    cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1200
  )
  if out.returncode != 0:
    raise RuntimeError(f"run failed ({out.returncode}):\n{out.stderr[-3000:]}")


def rows(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    out = [json.loads(ln) for ln in f if ln.strip()]
  return [{k: v for k, v in r.items() if k not in TIMING} for r in out]


def final_params(workdir: str) -> dict:
  sys.path.insert(0, ROOT)
  from jft import checkpoint, sharding
  from jft.state import flat_paths

  mesh = sharding.make_mesh(_base_mesh())
  return flat_paths(checkpoint.load_params(workdir, mesh))


def _base_mesh():
  from jft import config

  return config.base_config().mesh


def compare(reference: str, soaked: str) -> list[str]:
  """Every difference between two runs' metrics rows and final params."""
  import numpy as np

  problems = []
  a, b = rows(reference), rows(soaked)
  if len(a) != len(b):
    problems.append(f"{len(a)} metrics rows vs {len(b)}")
  for ra, rb in zip(a, b, strict=False):
    if ra != rb:
      problems.append(f"step {ra.get('step')}: {ra} != {rb}")
  pa, pb = final_params(reference), final_params(soaked)
  for k in sorted(set(pa) | set(pb)):
    if k not in pa or k not in pb or not np.array_equal(pa[k], pb[k]):
      problems.append(f"parameter {k} differs")
  return problems


def soak(root: str, steps: int, interrupts: int, seed: int, say=print) -> list:
  """Runs the soak in `root`; returns the list of differences (empty: ok)."""
  rng = random.Random(seed)
  data = make_data(os.path.join(root, "data"))
  reference, soaked = os.path.join(root, "ref"), os.path.join(root, "soak")
  t0 = time.time()
  finish(command(reference, data, steps))
  say(f"uninterrupted run: {time.time() - t0:.0f}s")
  cmd = command(soaked, data, steps)
  # Points in the first 3/4: a signal at the very end just finishes.
  points = sorted(rng.randint(1, steps * 3 // 4) for _ in range(interrupts))
  for i, at in enumerate(points):
    kind = KINDS[i % len(KINDS)] if interrupts >= 3 else rng.choice(KINDS)
    say(f"[{i + 1}/{interrupts}] {interrupt(cmd, soaked, kind, at)}")
  finish(cmd)
  problems = compare(reference, soaked)
  say(
    f"soak: {steps} steps, {interrupts} interruptions: "
    + ("identical to the uninterrupted run" if not problems else "DIFFERS")
  )
  for p in problems[:20]:
    say("  " + p)
  return problems


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--interrupts", type=int, default=20)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dir", default="", help="'' = a new temporary folder")
  args = p.parse_args()
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from bench_util import cpu_name

  print(f"CPU: {cpu_name()}")
  root = args.dir or tempfile.mkdtemp(prefix="jft-soak-")
  t0 = time.time()
  problems = soak(root, args.steps, args.interrupts, args.seed)
  print(f"wall time {time.time() - t0:.0f}s; files in {root}")
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main())
