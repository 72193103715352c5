"""The data path's figures: a streamed corpus against the train step.

  python bench/pipeline.py            # 1 GB generated corpus (~3 min)
  python bench/pipeline.py --mb 64 --skip-run

Generates a JSONL corpus of `--mb` MB (English-like words with Zipf
frequencies, record lengths mixed, some longer than a row) and a 4096-piece
tokenizer trained on its start (ref-5M's vocabulary), then prints, each
phase in a fresh process so its peak RSS is its own:

* stream: `config.data.streaming`'s path (`jft.data.stream.JsonlSource`,
  `pipeline.make_stream_iter` with the CLM objective's `make_examples`) on
  the whole corpus: the index time, the time to the first batch, tokens/s
  of packed 8 x 256 batches on one core (read_threads=0: parse, tokenize,
  pack and batch on the consumer's thread), peak RSS.
* stream and eager on the first `--eager-mb` MB: the eager path reads and
  tokenizes everything before its first batch, so its time and memory grow
  with the corpus; the streamed path's do not.
* step: the ref-5M full fine-tuning step's tokens/s (`bench/throughput.py`,
  float32, 8 x 256), the rate the pipeline must stay 10x ahead of.
* run: `python -m jft.main` streaming the whole corpus with ref-5M: wall
  time from launch to the first step's log line (process start, indexing,
  model init and the step's compile included) and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import bench_util  # noqa: E402

SEQ, BATCH = 256, 8


def _words(rng: np.random.Generator, n: int = 6000) -> list[str]:
  """n made-up words of 2-9 letters."""
  letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
  p = 1 / np.arange(1, 27)
  p /= p.sum()
  return [
    "".join(rng.choice(letters, size=int(rng.integers(2, 10)), p=p))
    for _ in range(n)
  ]


def make_corpus(path: str, mb: int, seed: int = 0) -> None:
  """`mb` MB of {"text"} records; a pool of 20k records, reshuffled and
  written until the size is reached (generation must not dominate)."""
  rng = np.random.default_rng(seed)
  words = np.array(_words(rng))
  zipf = 1 / np.arange(1, len(words) + 1)
  zipf /= zipf.sum()
  pool = []
  for _ in range(20_000):
    n = int(np.clip(rng.lognormal(4.5, 1.0), 3, 3000))  # median ~90 words
    text = " ".join(rng.choice(words, size=n, p=zipf))
    pool.append(json.dumps({"text": text.capitalize() + "."}) + "\n")
  target = mb * 2**20
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    written = 0
    while written < target:
      for i in rng.permutation(len(pool)):
        f.write(pool[i])
        written += len(pool[i])
        if written >= target:
          break
  os.replace(tmp, path)


def head_of(path: str, out: str, mb: int) -> None:
  """The first `mb` MB of `path`'s lines."""
  with open(path, "rb") as src, open(out, "wb") as dst:
    n = 0
    for line in src:
      dst.write(line)
      n += len(line)
      if n >= mb * 2**20:
        break


def prepare(args) -> tuple[str, str]:
  """(corpus path, tokenizer path), made once per size in `args.dir`."""
  from jft.data import sources
  from jft.data.tokenizer import train_tokenizer

  os.makedirs(args.dir, exist_ok=True)
  corpus = os.path.join(args.dir, f"corpus-{args.mb}mb.jsonl")
  if not os.path.exists(corpus):
    t0 = time.perf_counter()
    make_corpus(corpus, args.mb)
    print(f"generated {corpus} in {time.perf_counter() - t0:.0f} s")
  tok = os.path.join(args.dir, "tok4096.model")
  if not os.path.exists(tok):
    train_tokenizer(
      sources.corpus_texts(corpus, limit_mb=8), output_path=tok, vocab_size=4096
    )
  return corpus, tok


def _objective(tok_path: str):
  from jft import config as base
  from jft.data.tokenizer import Tokenizer
  from jft.objectives.clm import CLM

  c = base.base_config()
  c.seq_len = SEQ
  return CLM(c, Tokenizer.load(tok_path))


def phase_stream(corpus: str, tok_path: str, batches: int) -> dict:
  """Index, first batch, then tokens/s on this thread."""
  from jft.data import pipeline, stream

  obj = _objective(tok_path)
  base = bench_util.rss_mib()
  t0 = time.perf_counter()
  src = stream.JsonlSource(corpus, obj.fields)
  index_s = time.perf_counter() - t0
  it, _ = pipeline.make_stream_iter(
    src,
    lambda r: obj.make_examples([r]),
    seq_len=SEQ,
    batch_size=BATCH,
    seed=0,
    pad_id=obj.tokenizer.pad_id,
    read_threads=0,
  )
  next(it)
  first_s = time.perf_counter() - t0
  for _ in range(5):  # warm-up
    next(it)
  times, tokens = [], 0
  for _ in range(batches):
    t = time.perf_counter()
    b = next(it)
    times.append(time.perf_counter() - t)
    tokens += int((b["segment_ids"] > 0).sum())
  return {
    "records": len(src),
    "index_s": index_s,
    "first_batch_s": first_s,
    "batch_s_median": statistics.median(times),
    "tokens_per_s": tokens / sum(times),
    "peak_rss_mib": bench_util.peak_mib(),
    "data_mib": bench_util.peak_mib() - base,
  }


def phase_eager(corpus: str, tok_path: str) -> dict:
  """The path without streaming: read and tokenize all, then batch."""
  from jft.data import pipeline

  obj = _objective(tok_path)
  base = bench_util.rss_mib()
  t0 = time.perf_counter()
  examples = obj.make_examples(pipeline.read_jsonl_files(corpus, obj.fields))
  it = pipeline.make_train_iter(
    examples, seq_len=SEQ, batch_size=BATCH, seed=0, pad_id=0
  )
  next(it)
  return {
    "first_batch_s": time.perf_counter() - t0,
    "peak_rss_mib": bench_util.peak_mib(),
    "data_mib": bench_util.peak_mib() - base,
  }


def phase_step() -> dict:
  import throughput

  r = throughput.run(preset="ref-5M", dtype="float32", steps_=8, warmup=2)
  return {"step_s": r["step_s"], "tokens_per_s": r["tokens_per_s"]}


def run_main(corpus: str, tok_path: str, workdir: str) -> dict:
  """`jft.main` streaming the corpus: seconds to the first step's line
  (in a new `workdir`: an earlier run's is removed first)."""
  shutil.rmtree(workdir, ignore_errors=True)
  cmd = [
    sys.executable,
    "-m",
    "jft.main",
    "--config=configs/pretrain_clm.py:ref-5M",
    f"--workdir={workdir}",
    f"--config.data.train_files={corpus}",
    f"--config.data.tokenizer={tok_path}",
    "--config.data.streaming=True",
    f"--config.seq_len={SEQ}",
    f"--config.batch_size={BATCH}",
    "--config.total_steps=2",
    "--config.log_every=1",
    "--config.eval_every=0",
    "--config.checkpoint_every=2",
  ]
  t0 = time.perf_counter()
  first = None
  with subprocess.Popen(
    cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  ) as p:
    lines = []
    for line in p.stdout:
      lines.append(line)
      if first is None and line.startswith("step 1/"):
        first = time.perf_counter() - t0
  if p.returncode or first is None:
    sys.exit("jft.main failed:\n" + "".join(lines[-30:]))
  import resource

  peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
  return {"first_step_s": first, "peak_rss_mib": peak}


def _child(phase: str, *args) -> dict:
  """Runs a phase in a fresh process; its figures come back as JSON."""
  out = subprocess.run(
    [sys.executable, __file__, "--phase", phase, *map(str, args)],
    check=True,
    capture_output=True,
    text=True,
    cwd=ROOT,
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--mb", type=int, default=1024, help="corpus size")
  ap.add_argument("--eager-mb", type=int, default=32)
  ap.add_argument("--batches", type=int, default=200)
  ap.add_argument("--dir", default="/tmp/jft-bench-pipeline")
  ap.add_argument("--skip-run", action="store_true", help="no jft.main run")
  ap.add_argument("--json", default="")
  ap.add_argument("--phase", nargs="+", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.phase:
    name, *rest = args.phase
    fn = {
      "stream": lambda c, t, b: phase_stream(c, t, int(b)),
      "eager": phase_eager,
      "step": phase_step,
    }[name]
    print(json.dumps(fn(*rest)))
    return {}
  corpus, tok = prepare(args)
  small = os.path.join(args.dir, f"head-{args.eager_mb}mb.jsonl")
  head_of(corpus, small, args.eager_mb)
  res = {
    "cpu": bench_util.cpu_name(),
    "corpus_mb": args.mb,
    "stream": _child("stream", corpus, tok, args.batches),
    "stream_small": _child("stream", small, tok, 20),
    "eager_small": _child("eager", small, tok),
    "step": _child("step"),
  }
  if not args.skip_run:
    res["run"] = run_main(corpus, tok, os.path.join(args.dir, "run"))
  s, st = res["stream"], res["step"]
  print(f"CPU: {res['cpu']}; corpus {args.mb} MB, {s['records']:,} records")
  print("| path | time to first batch | data's peak RSS | tokens/s |")
  print("| --- | --- | --- | --- |")
  print(
    f"| streamed, {args.mb} MB | {s['first_batch_s']:.2f} s "
    f"(index {s['index_s']:.2f} s) | {s['data_mib']:,.0f} MiB "
    f"| {s['tokens_per_s']:,.0f} (one core) |"
  )
  for key, label in (("stream_small", "streamed"), ("eager_small", "eager")):
    r = res[key]
    print(
      f"| {label}, {args.eager_mb} MB | {r['first_batch_s']:.2f} s "
      f"| {r['data_mib']:,.0f} MiB | |"
    )
  print(
    f"| ref-5M f32 train step | | | {st['tokens_per_s']:,.0f} "
    f"({st['step_s']:.3f} s/step) |"
  )
  print("(data's peak RSS: the process's peak above its RSS after imports)")
  print(
    f"pipeline / step tokens/s: {s['tokens_per_s'] / st['tokens_per_s']:.1f}x"
  )
  if "run" in res:
    r = res["run"]
    print(
      f"jft.main streaming {args.mb} MB, ref-5M: first step "
      f"{r['first_step_s']:.1f} s after launch, peak RSS "
      f"{r['peak_rss_mib']:,.0f} MiB"
    )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(res, f, indent=1)
  return res


if __name__ == "__main__":
  main()
