"""jft against PyTorch (transformers, PEFT, TRL) on the same workloads.

Both systems run in this one process, interleaved in rounds: each round
runs `--steps` steps of every (workload, dtype, system) in turn, the
system order alternating from round to round, so load from other processes
hits every system alike. Reported: the median step time over all rounds
(after `--warmup` untimed steps per system), tokens/s and jft / PyTorch
step-time ratios (below 1: jft is faster), plus jft bfloat16 against
PyTorch float32 (the target is <= 0.6).

  python bench/compare.py [--workloads full,lora,dpo]
      [--dtypes float32,bfloat16] [--rounds 3] [--steps 10] [--warmup 3]
      [--shape ref-5M] [--json out.json]
  python bench/compare.py --quick     # tiny shapes, a smoke run

`--quick` also compiles jft's step at XLA optimisation level 0
(`--fast_compile`, half the compile time): its numbers only show that
everything runs.

Workloads (PERF.md's ref-5M: Llama-style, vocab 4096, d_model 256, SwiGLU
MLP 688, 4 layers, 4 heads, 4 KV heads, untied embeddings, RoPE; AdamW):

* full: full fine-tuning, batch 8 x 256 tokens, next-token loss.
  jft: the CLM train step. PyTorch: `LlamaForCausalLM(input_ids,
  labels=...)`, backward, `clip_grad_norm_(1.0)`, AdamW step (fused, as
  Trainer's default `adamw_torch_fused`), LR scheduler step, `zero_grad`:
  a plain loop, the least overhead PyTorch can have.
* lora: the same with LoRA r=8, alpha 16 on all 7 linear projections of
  every layer (q, k, v, o, gate, up, down); base weights frozen, only the
  adapters train and carry optimizer state. jft: `lora.rank=8`,
  `lora.targets='all-linear'`. PyTorch: PEFT `LoraConfig(r=8,
  lora_alpha=16, target_modules=[q,k,v,o,gate,up,down]_proj)`, same loop.
* dpo: DPO (sigmoid loss, beta 0.1), full fine-tuning against a frozen
  reference copy; 8 pairs, prompt 64 + completion 192 tokens each.
  jft: the `objective=dpo` train step (policy forward of chosen and
  rejected as one [2B, T] batch, reference forward under stop_gradient,
  backward, AdamW). PyTorch: TRL's `DPOTrainer` (reference passed as a
  deep copy of the policy; `precompute_ref_log_probs=False`, so it runs its
  reference forward every step, as jft does).

What one timed step includes, for each side:

* jft: one call of the jitted train step (`jft.steps.make_train_step`,
  state donated, as `jft/train.py` runs it) until its outputs are ready:
  forward, loss, backward, gradient clipping, AdamW update, metrics. The
  batch is already on the device; compilation happens before warm-up.
* PyTorch loop (full, lora): the lines listed above, timed around them;
  the batch is a ready tensor.
* TRL: exactly what `Trainer._inner_training_loop` does between its
  `on_step_begin` and `on_step_end` callbacks: `trainer.training_step`
  (TRL's `compute_loss`: policy forward with its fused, chunked LM-head
  log-probs, reference forward under `no_grad`, loss, its per-step metrics;
  then backward), grad-norm clipping, `optimizer.step()` (Trainer's default
  `adamw_torch_fused`), `lr_scheduler.step()`, `zero_grad`. The time is
  read by a `TrainerCallback` (on_step_begin -> on_step_end) inside a real
  `trainer.train()`; fetching and collating the batch (the dataset is
  tokenised once, when the trainer is built) and logging fall outside it.
  To interleave a running `trainer.train()` with the other systems, it runs
  in a helper thread that the callback parks after every step until the
  next one is asked for, so only one system ever computes at a time.

Precisions: float32, and bfloat16 compute with float32 master weights:
PyTorch `torch.autocast("cpu", dtype=torch.bfloat16)` (TRL: `bf16=True`,
Trainer's own autocast), jft `model.dtype='bfloat16'` (params stay
float32). A forward hook checks that the PyTorch models really compute in
the asked dtype. The HF models use transformers' default attention (sdpa).

Threads: both systems use every core of the process's CPU affinity (N,
printed): `torch.set_num_threads(N)` (also inside TRL's thread, since
OpenMP's thread count is per calling thread; checked) and XLA:CPU's
default intra-op pool, which XLA sizes to the cores it may use (no XLA flag
is set here; its threads are counted and printed).

Weights are random and differ between the systems (speed does not depend
on them; jft's are drawn with numpy in the shapes `model.init` gives, to
spare a compile), but the models have the same size: total and trainable
parameter counts are asserted equal within 0.5% and printed. Tokens per
step: batch x sequence (x2 for DPO: chosen and rejected). A benchmark,
never a pass/fail check (tests/test_bench.py only runs `--quick`).

The two systems' builders live in bench/jft_side.py (jft's step) and
bench/torch_side.py (the PyTorch loop), each importing only its own
framework, so bench/memory.py can run each in a process of its own.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import warnings

import jax
import numpy as np
import peft
import tokenizers
import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_util import DPO_BETA, LR, Shape, cpu_name  # noqa: E402
from jft_side import JftSystem  # noqa: E402
from torch_side import TorchSystem, count_params, dtype_probe, hf_model  # noqa: E402

from jft import hostmem  # noqa: E402

WORKLOADS = ("full", "lora", "dpo")
DTYPES = ("float32", "bfloat16")
PARAM_TOLERANCE = 0.005  # relative difference allowed between param counts


SHAPES = {
  "ref-5M": Shape(4096, 256, 4, 4, 4, 688, batch=8, seq=256, prompt=64),
  # Seconds, not minutes: the smoke test's size.
  "tiny": Shape(256, 32, 2, 2, 2, 64, batch=2, seq=16, prompt=4),
}


# ------------------------------------------------------------------------
# TRL


def word_tokenizer(vocab_size: int):
  """A word-level tokenizer: token i is the word `w{i}`, one token each,
  so a text of n words is exactly n tokens; `<eos>` and `<pad>` are the
  vocabulary's last two ids."""
  vocab = {f"w{i}": i for i in range(vocab_size - 2)}
  vocab["<pad>"], vocab["<eos>"] = vocab_size - 2, vocab_size - 1
  tok = tokenizers.Tokenizer(
    tokenizers.models.WordLevel(vocab, unk_token="<pad>")
  )
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  return transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>"
  )


def dpo_dataset(shape: Shape, rows: int, seed: int):
  """`{"prompt","chosen","rejected"}` text rows of exactly `shape.prompt`
  + (`shape.seq` - `shape.prompt`) tokens, eos included."""
  import datasets

  rng = np.random.default_rng(seed)
  n_words = shape.vocab_size - 2
  comp = shape.seq - shape.prompt - 1  # + <eos>

  def words(n):
    return " ".join(f"w{i}" for i in rng.integers(0, n_words, n))

  data = [
    {
      "prompt": words(shape.prompt),
      "chosen": " " + words(comp) + " <eos>",
      "rejected": " " + words(comp) + " <eos>",
    }
    for _ in range(rows)
  ]
  return datasets.Dataset.from_list(data)


class TrlDpoSystem:
  """TRL's DPOTrainer; one `step()` = one step of a running train()."""

  name = "TRL DPOTrainer"

  def __init__(self, workload: str, dtype: str, shape: Shape, seed: int = 0):
    import datasets
    import trl

    assert workload == "dpo", workload
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    model = hf_model(shape, seed)
    ref = copy.deepcopy(model)
    self.params_total, self.params_trainable = count_params(model)
    self.seen = dtype_probe(model)
    self.tmp = tempfile.TemporaryDirectory(prefix="jft-compare-trl-")
    args = trl.DPOConfig(
      output_dir=self.tmp.name,
      per_device_train_batch_size=shape.batch,
      max_steps=1_000_000,  # stopped by close()
      learning_rate=LR,
      adam_beta2=0.95,
      weight_decay=0.1,
      max_grad_norm=1.0,
      lr_scheduler_type="cosine",
      warmup_steps=50,
      beta=DPO_BETA,
      max_length=shape.seq,
      bf16=dtype == "bfloat16",
      use_cpu=True,
      logging_strategy="no",
      save_strategy="no",
      report_to="none",
      disable_tqdm=True,
      dataloader_num_workers=0,
      dataloader_pin_memory=False,
      seed=seed,
    )
    self.trainer = trl.DPOTrainer(
      model=model,
      ref_model=ref,
      args=args,
      train_dataset=dpo_dataset(shape, 4 * shape.batch, seed),
      processing_class=word_tokenizer(shape.vocab_size),
    )
    row = self.trainer.train_dataset[0]  # tokenised as planned
    assert len(row["prompt_ids"]) == shape.prompt, len(row["prompt_ids"])
    for k in ("chosen_ids", "rejected_ids"):
      assert len(row[k]) == shape.seq - shape.prompt, (k, len(row[k]))
    self._go = threading.Semaphore(0)
    self._done = threading.Semaphore(0)
    self._stop = False
    self._error = None
    self._finished = False
    self._dt = None
    self.loss = math.nan
    self.trainer.remove_callback(transformers.PrinterCallback)  # no logs
    self.trainer.add_callback(_StepClock(self))
    self.torch_threads = torch.get_num_threads()
    self._thread = threading.Thread(target=self._train, daemon=True)
    self._thread.start()
    self._wait()  # the trainer is set up and parked before its first step

  def _train(self):
    torch.set_num_threads(self.torch_threads)  # per thread under OpenMP
    self.torch_threads = torch.get_num_threads()
    try:
      self.trainer.train()
    except BaseException as e:  # re-raised in the main thread
      self._error = e
    finally:
      self._finished = True
      self._done.release()

  def _wait(self):
    self._done.acquire()
    if self._error is not None:
      raise RuntimeError("TRL DPOTrainer failed") from self._error
    if self._finished and not self._stop:
      raise RuntimeError("TRL DPOTrainer stopped early")

  def step(self) -> float:
    self._dt = None
    self._go.release()
    self._wait()
    assert self._dt is not None
    return self._dt

  def close(self):
    if not self._finished:
      self._stop = True
      self._go.release()
      self._thread.join(timeout=60)
    self.tmp.cleanup()


class _StepClock(transformers.TrainerCallback):
  """Times on_step_begin -> on_step_end, then parks the trainer until the
  next step is asked for (`TrlDpoSystem.step`) or the run is closed."""

  def __init__(self, system: TrlDpoSystem):
    self.system, self.t0, self.loss_sum = system, 0.0, 0.0

  def on_train_begin(self, args, state, control, **kw):
    self.system._done.release()  # set up
    self.system._go.acquire()

  def on_step_begin(self, args, state, control, **kw):
    self.t0 = time.perf_counter()

  def on_step_end(self, args, state, control, **kw):
    sys_ = self.system
    sys_._dt = time.perf_counter() - self.t0
    # Trainer sums step losses in `_tr_loss` until it logs (never, here).
    loss_sum = float(getattr(sys_.trainer, "_tr_loss", math.nan))
    sys_.loss, self.loss_sum = loss_sum - self.loss_sum, loss_sum
    sys_._done.release()
    sys_._go.acquire()
    if sys_._stop:
      control.should_training_stop = True


def torch_system(workload, dtype, shape, seed=0):
  cls = TrlDpoSystem if workload == "dpo" else TorchSystem
  return cls(workload, dtype, shape, seed)


# ------------------------------------------------------------------------
# The run


def machine_info(threads: int) -> dict:
  try:
    import trl

    trl_version = trl.__version__
  except ImportError:
    trl_version = "not installed"
  flags = set()
  try:
    with open("/proc/cpuinfo") as fh:
      for line in fh:
        if line.startswith("flags"):
          flags = set(line.split(":", 1)[1].split())
          break
  except OSError:
    pass
  return {
    "date": datetime.date.today().isoformat(),
    "cpu": cpu_name(),
    "amx": " ".join(sorted(f for f in flags if f.startswith("amx"))),
    "avx512": " ".join(sorted(f for f in flags if f.startswith("avx512"))),
    "python": platform.python_version(),
    "torch": torch.__version__,
    "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    "jax": jax.__version__,
    "transformers": transformers.__version__,
    "peft": peft.__version__,
    "trl": trl_version,
    "threads": threads,
    "torch_threads": torch.get_num_threads(),
    "torch_interop_threads": torch.get_num_interop_threads(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


def xla_pool_threads() -> int | None:
  """Threads in XLA:CPU's intra-op (Eigen) pool, counted by name (Linux)."""
  n = 0
  try:
    for t in os.listdir("/proc/self/task"):
      with open(f"/proc/self/task/{t}/comm") as fh:
        n += fh.read().strip() == "tf_XLAEigen"
  except OSError:
    return None
  return n


def run(
  workloads,
  dtypes,
  shape: Shape,
  rounds: int,
  steps_: int,
  warmup: int,
  fast_compile: bool = False,
  say=print,
  overrides: dict | None = None,
) -> list[dict]:
  """Builds every (workload, dtype) pair of systems, warms them up, then
  times them in interleaved rounds; one result row per pair."""
  cases = {}
  try:
    for w in workloads:
      for d in dtypes:
        say(f"building {w} {d}: jft ...")
        j = JftSystem(
          w, d, shape, fast_compile=fast_compile, overrides=overrides
        )
        say(f"building {w} {d}: PyTorch ...")
        cases[(w, d)] = (j, torch_system(w, d, shape))
    for (w, d), systems in cases.items():
      for s in systems:
        for _ in range(warmup):
          s.step()
        # Same thread count in every PyTorch system (TRL's own thread too).
        n = getattr(s, "torch_threads", torch.get_num_threads())
        assert n == torch.get_num_threads(), (w, d, s.name, n)
        seen = getattr(s, "seen", None)
        if seen is not None:  # autocast really on (or off)
          want = torch.bfloat16 if d == "bfloat16" else torch.float32
          assert seen and set(seen) == {want}, (w, d, s.name, set(seen))
          seen.clear()
    times = {k: ([], []) for k in cases}
    for r in range(rounds):
      say(f"round {r + 1}/{rounds}")
      for k, systems in cases.items():
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for i in order:
          times[k][i].extend(systems[i].step() for _ in range(steps_))
    rows = []
    for (w, d), (j, t) in cases.items():
      check_sizes(w, j, t)
      tj, tt = times[(w, d)]
      mj, mt = statistics.median(tj), statistics.median(tt)
      tokens = shape.tokens(w)
      rows.append(
        {
          "workload": w,
          "dtype": d,
          "torch_system": t.name,
          "jft_step_s": mj,
          "torch_step_s": mt,
          "jft_tokens_per_s": tokens / mj,
          "torch_tokens_per_s": tokens / mt,
          "ratio": mj / mt,
          "jft_times": tj,
          "torch_times": tt,
          "jft_params": j.params_total,
          "jft_trainable": j.params_trainable,
          "torch_params": t.params_total,
          "torch_trainable": t.params_trainable,
          "jft_loss": j.loss,
          "torch_loss": t.loss,
        }
      )
    return rows
  finally:
    for systems in cases.values():
      for s in systems:
        s.close()


def check_sizes(workload, j, t) -> None:
  for what in ("params_total", "params_trainable"):
    a, b = getattr(j, what), getattr(t, what)
    if abs(a - b) > PARAM_TOLERANCE * max(b, 1):
      raise AssertionError(
        f"{workload}: {what} differ: jft {a:,} vs {t.name} {b:,}"
      )


def bf16_vs_f32(rows) -> dict[str, float]:
  """workload -> jft bfloat16 step / PyTorch float32 step."""
  by = {(r["workload"], r["dtype"]): r for r in rows}
  return {
    w: by[(w, "bfloat16")]["jft_step_s"] / by[(w, "float32")]["torch_step_s"]
    for w, d in by
    if d == "bfloat16" and (w, "float32") in by
  }


def format_report(info: dict, args, rows) -> str:
  s = SHAPES[args.shape]
  n = args.rounds * args.steps
  lines = [
    f"## jft vs PyTorch, side by side ({info['date']})",
    "",
    f"- CPU: {info['cpu']}; AMX: {info['amx'] or 'none'}; AVX-512: "
    f"{info['avx512'] or 'none'}",
    f"- torch {info['torch']} (CPU capability "
    f"{info['torch_cpu_capability']}), transformers "
    f"{info['transformers']}, peft {info['peft']}, trl {info['trl']}; "
    f"jax {info['jax']}; Python {info['python']}",
    f"- threads: {info['threads']} cores in this process's affinity; "
    f"torch.set_num_threads({info['torch_threads']}) (interop "
    f"{info['torch_interop_threads']}); XLA:CPU's default intra-op pool: "
    f"{info.get('xla_threads', '?')} threads (XLA_FLAGS="
    f"{info['xla_flags'] or 'unset'})",
    "- host allocator, one process for both systems: "
    + info.get("malloc", "not recorded"),
    "- jft's attention backward: "
    + (
      "hand-written (model.attention_vjp=True)"
      if args.attention_vjp
      else "autodiff of the einsum path (the default)"
    ),
    "- jft's gated MLP activation backward: "
    + (
      "hand-written (model.mlp_vjp=True)"
      if args.mlp_vjp
      else "autodiff (the default)"
    ),
    f"- shape {args.shape}: vocab {s.vocab_size}, d_model {s.d_model}, MLP "
    f"{s.mlp_dim}, {s.n_layers} layers, {s.n_heads} heads, {s.n_kv_heads} "
    f"KV heads; batch {s.batch} x {s.seq} (DPO: {s.batch} pairs, prompt "
    f"{s.prompt} + completion {s.seq - s.prompt})",
    f"- median of {n} steps per system ({args.rounds} interleaved rounds x "
    f"{args.steps}) after {args.warmup} warm-up steps; ratio = jft step "
    "time / PyTorch step time (below 1: jft faster)",
    *(
      [
        "- **jft compiled at XLA optimisation level 0 (--fast_compile): "
        "a smoke run, not a measurement**"
      ]
      if args.fast_compile
      else []
    ),
    "",
    "| workload | dtype | jft step | PyTorch system | PyTorch step "
    "| jft tokens/s | PyTorch tokens/s | jft / PyTorch |",
    "| --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  for r in rows:
    lines.append(
      f"| {r['workload']} | {r['dtype']} | {r['jft_step_s']:.3f} s | "
      f"{r['torch_system']} | {r['torch_step_s']:.3f} s | "
      f"{r['jft_tokens_per_s']:,.0f} | {r['torch_tokens_per_s']:,.0f} | "
      f"{r['ratio']:.2f} |"
    )
  cross = bf16_vs_f32(rows)
  if cross:
    lines += [
      "",
      "| workload | jft bfloat16 / PyTorch float32 (target <= 0.6) |",
      "| --- | --- |",
    ]
    lines += [f"| {w} | {x:.2f} |" for w, x in cross.items()]
  lines += [
    "",
    "| workload | jft params (trainable) | PyTorch params (trainable) |",
    "| --- | --- | --- |",
  ]
  seen = set()
  for r in rows:
    if r["workload"] in seen:
      continue
    seen.add(r["workload"])
    lines.append(
      f"| {r['workload']} | {r['jft_params']:,} ({r['jft_trainable']:,}) | "
      f"{r['torch_params']:,} ({r['torch_trainable']:,}) |"
    )
  return "\n".join(lines)


# jft's opt-in hand-written backward passes, one flag each.
VJP_KEYS = ("attention_vjp", "mlp_vjp")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workloads", default=",".join(WORKLOADS))
  p.add_argument("--dtypes", default=",".join(DTYPES))
  p.add_argument("--shape", default=None, choices=tuple(SHAPES))
  p.add_argument("--rounds", type=int, default=None, help="default 3")
  p.add_argument("--steps", type=int, default=None, help="per round; 10")
  p.add_argument("--warmup", type=int, default=None, help="default 3")
  p.add_argument(
    "--quick",
    action="store_true",
    help="smoke run: tiny shape, 1 round of 2 steps, 1 warm-up step, "
    "--fast_compile",
  )
  p.add_argument(
    "--fast_compile",
    action="store_true",
    default=None,
    help="compile jft's step at XLA optimisation level 0 (smoke runs only: "
    "its timings are then not representative)",
  )
  p.add_argument(
    "--malloc",
    default="jft",
    choices=("jft", "default"),
    help="jft: the host settings jft.main applies (jft.hostmem: malloc, "
    "process-wide, so PyTorch gets them too; JAX's CPU dispatch inline); "
    "default: glibc's and JAX's",
  )
  p.add_argument(
    "--attention_vjp",
    action="store_true",
    help="jft with model.attention_vjp=True (the attention core's "
    "hand-written backward; opt-in)",
  )
  p.add_argument(
    "--mlp_vjp",
    action="store_true",
    help="jft with model.mlp_vjp=True (the gated MLP activation's "
    "hand-written backward; opt-in)",
  )
  p.add_argument("--json", default="", help="write the rows here")
  args = p.parse_args(argv)
  defaults = (
    dict(shape="tiny", rounds=1, steps=2, warmup=1, fast_compile=True)
    if args.quick
    else dict(shape="ref-5M", rounds=3, steps=10, warmup=3, fast_compile=False)
  )
  for k, v in defaults.items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  for k in ("workloads", "dtypes"):
    vals = [x for x in getattr(args, k).split(",") if x]
    known = WORKLOADS if k == "workloads" else DTYPES
    bad = sorted(set(vals) - set(known))
    if bad or not vals:
      p.error(f"--{k}: unknown {bad}; expected some of {known}")
    setattr(args, k, vals)
  return args


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  # TRL 1.16 calls transformers 5's deprecated gradient_checkpointing names.
  warnings.filterwarnings(
    "ignore", message=".*will be removed in v6", category=FutureWarning
  )
  threads = len(os.sched_getaffinity(0))
  prev_threads = torch.get_num_threads()
  torch.set_num_threads(threads)
  try:
    info = machine_info(threads)
    info["malloc"] = (
      hostmem.tune()
      if args.malloc == "jft"
      else hostmem.describe({"skipped": "--malloc"})
    )
    rows = run(
      args.workloads,
      args.dtypes,
      SHAPES[args.shape],
      args.rounds,
      args.steps,
      args.warmup,
      fast_compile=args.fast_compile,
      say=lambda m: print(m, file=sys.stderr, flush=True),
      overrides={f"model.{k}": True for k in VJP_KEYS if getattr(args, k)}
      or None,
    )
    info["xla_threads"] = xla_pool_threads()
  finally:
    torch.set_num_threads(prev_threads)
  print(format_report(info, args, rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"info": info, "args": vars(args), "rows": rows}, f, indent=2)
  return rows


if __name__ == "__main__":
  main()
