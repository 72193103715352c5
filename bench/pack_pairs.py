"""DPO pairs packed (`dpo.pack_pairs`) against a pair a row, padded.

  python bench/pack_pairs.py [--pairs 512] [--rounds 3] [--steps 6]

A realistic length mix (prompt and completion lengths log-normal, medians
40 and 60 tokens, clipped so the longer side fits `seq_len` 256), random
token ids, the ref-5M model shape, a frozen reference copy, float32. Both
layouts hold the same tokens a step: padded, 8 pairs as [2 x 8, 256];
packed, 8 rows of 512 that each take as many whole pairs as fit. Steps of
the two alternate in interleaved rounds; the figures are medians after a
warm-up, and the speed-up is pairs/s packed over pairs/s padded.
`tests/test_dpo.py` pins that both give the same per-pair losses.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_util  # noqa: E402
import jft_side  # noqa: E402

from jft import objectives, optim, steps, train  # noqa: E402
from jft.data import pipeline  # noqa: E402
from jft.models import transformer  # noqa: E402
from jft.objectives import dpo  # noqa: E402
from jft.state import TrainState, split_params  # noqa: E402

SEQ, BATCH, VOCAB = 256, 8, 4096


def length_mix(rng: np.random.Generator, n: int) -> list[tuple[int, int, int]]:
  """(prompt, chosen, rejected) lengths whose longer side fits SEQ + 1."""
  out = []
  while len(out) < n:
    p = int(np.clip(rng.lognormal(np.log(40), 0.8), 4, 200))
    c, r = (int(max(1, rng.lognormal(np.log(60), 0.9))) for _ in range(2))
    if p + max(c, r) <= SEQ + 1:
      out.append((p, c, r))
  return out


def examples(lengths, packed: bool, rng: np.random.Generator) -> list[dict]:
  make = dpo.packed_pair_example if packed else dpo.pair_example
  ids = lambda n: rng.integers(3, VOCAB, n).tolist()
  return [make(ids(p), ids(c), ids(r)) for p, c, r in lengths]


def pairs_in(batch: dict, packed: bool) -> int:
  """Pairs a batch holds (padding rows hold none)."""
  if packed:
    return int(batch["segment_ids"].max(axis=1).sum())
  return int((batch["weights"].sum(axis=1) > 0).sum())


def build(packed: bool):
  """(compiled step, state, batch iterator) of one layout."""
  c = jft_side.jft_config("dpo")
  c.dpo.pack_pairs = packed
  c.dpo.rpo_alpha = 0.0
  model_cfg = transformer.config_from_dict(
    {"preset": "ref-5M", "vocab_size": VOCAB}
  )
  model = transformer.Transformer(model_cfg)
  params = jft_side.random_params(model, 0)
  trainable, frozen = split_params(params, train.freeze_table(c, model_cfg))
  objective = objectives.get("dpo")(c, tokenizer=None)
  optimizer, schedule = optim.make_optimizer(c.optimizer, 1000, trainable)
  state = TrainState(
    step=jnp.zeros((), jnp.int32),
    trainable=trainable,
    frozen=frozen,
    opt_state=optimizer.init(trainable),
    rng=jax.random.PRNGKey(1),
    ref=objective.reference_params(params, trainable),
  )
  step_fn = steps.make_train_step(
    objective, train.make_apply_fn(model), optimizer, schedule, 1
  )
  return step_fn, state


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--pairs", type=int, default=512)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--steps", type=int, default=6, help="per layout a round")
  ap.add_argument("--warmup", type=int, default=2)
  args = ap.parse_args(argv)
  lengths = length_mix(np.random.default_rng(0), args.pairs)
  side = {}
  for packed in (False, True):
    exs = examples(lengths, packed, np.random.default_rng(1))
    it = pipeline.make_train_iter(
      exs,
      seq_len=SEQ * (2 if packed else 1),
      batch_size=BATCH,
      seed=0,
      pad_id=0,
      packing=packed,
    )
    step_fn, state = build(packed)
    batch = next(it)
    compiled = (
      jax.jit(step_fn, donate_argnums=(0,)).lower(state, batch).compile()
    )
    side[packed] = dict(it=it, compiled=compiled, state=state, times=[], n=[])
  for _ in range(args.rounds):
    for packed in (False, True):
      s = side[packed]
      for i in range(args.warmup + args.steps):
        batch = next(s["it"])
        t0 = time.perf_counter()
        s["state"], m = s["compiled"](s["state"], batch)
        jax.block_until_ready(m)
        if i >= args.warmup:
          s["times"].append(time.perf_counter() - t0)
          s["n"].append(pairs_in(batch, packed))
  res = {}
  for packed, s in side.items():
    step = statistics.median(s["times"])
    pairs = statistics.mean(s["n"])
    res["packed" if packed else "padded"] = dict(
      step_s=step, pairs_per_step=pairs, pairs_per_s=pairs / step
    )
  print(f"CPU: {bench_util.cpu_name()}; ref-5M, float32, {args.pairs} pairs")
  print("| layout | step | pairs a step | pairs/s |")
  print("| --- | --- | --- | --- |")
  for name, r in res.items():
    print(
      f"| {name} | {r['step_s']:.3f} s | {r['pairs_per_step']:.1f} "
      f"| {r['pairs_per_s']:.1f} |"
    )
  ratio = res["packed"]["pairs_per_s"] / res["padded"]["pairs_per_s"]
  print(f"packed / padded pairs/s: {ratio:.2f}x")
  res["speedup"] = ratio
  return res


if __name__ == "__main__":
  main()
