"""Preference pairs from a model's own mistakes on the built-in tasks.

DPO's built-in data (`config.dpo.builtin_pairs='on_policy'`, the default):
the starting model (DPO's reference) answers suite prompts, greedily and by
sampling; `tasks.is_correct` labels every answer; a prompt with a wrong
answer gives one pair: chosen = the true answer, rejected = the model's
first wrong one (greedy first). The pairs are the errors this model makes
(on-policy and verifier-labelled, as in iterative RPO or Step-DPO), which is
what moves its greedy accuracy. Made-up near-miss negatives
(`builtin_pairs='synthetic'`) are already unlikely under the model, and
pushing them further down did not help it (see the README).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence

import jax

from jft import generate, sharding
from jft.data import pipeline, sources, tasks
from jft.data.tokenizer_util import write_bytes_atomic

# prompts, key (None = greedy) -> one decoded answer per prompt
AnswerFn = Callable[[list[str], "jax.Array | None"], list[str]]
_FORMAT = 1  # Bump when the mining changes: invalidates mined files.


def pairs_from_answers(
  records: Sequence[dict],
  answers: Sequence[Sequence[str]],
  every_wrong: bool = False,
) -> tuple[list[dict], dict[str, list[int]]]:
  """One pair per record that has a wrong, non-empty answer (with
  `every_wrong`, one per distinct wrong answer: a reward model then sees
  every mistake the model made, not only its first).

  `records` are suite rows ({"task","prompt","completion"}); `answers[i]`
  are record i's decoded answers, greedy first. An empty answer (eos at
  once) is wrong but cannot be a rejected text, so it is passed over.
  Returns (rows, counts), counts[task] = [prompts, prompts with a pair].
  """
  if len(records) != len(answers):
    raise ValueError(f"{len(records)} records but {len(answers)} answer lists")
  rows, counts = [], {}
  for rec, cands in zip(records, answers, strict=True):
    task, prompt = rec["task"], rec["prompt"]
    wrong = [
      a.strip()
      for a in cands
      if a.strip() and not tasks.is_correct(task, prompt, a)
    ]
    wrong = list(dict.fromkeys(wrong))  # distinct, first seen first
    count = counts.setdefault(task, [0, 0])
    count[0] += 1
    if wrong:
      count[1] += 1
    for w in wrong if every_wrong else wrong[:1]:
      rows.append(
        {
          "prompt": prompt,
          "chosen": rec["completion"],
          "rejected": " " + w,
          "task": task,
        }
      )
  return rows, counts


def mine(
  records: Sequence[dict],
  answer_fn: AnswerFn,
  *,
  samples: int,
  seed: int,
  every_wrong: bool = False,
) -> tuple[list[dict], dict[str, list[int]]]:
  """Greedy answers plus `samples` sampled ones per prompt, then pairs."""
  prompts = [r["prompt"] for r in records]
  keys = [None] + [
    jax.random.fold_in(jax.random.PRNGKey(seed), i) for i in range(samples)
  ]
  per_key = [answer_fn(prompts, k) for k in keys]  # [K+1][N]
  return pairs_from_answers(
    records, list(zip(*per_key, strict=True)), every_wrong
  )


def make_answer_fn(
  apply_fn, params, tokenizer, *, max_new: int, temperature: float
) -> AnswerFn:
  """Decoded answers of the model `params` (greedy when key is None)."""
  greedy = generate.make_text_decoder(
    apply_fn, tokenizer, max_new=max_new, batch_size=256
  )
  sampler = generate.make_text_decoder(
    apply_fn,
    tokenizer,
    max_new=max_new,
    sampling=generate.Sampling(temperature=temperature),
    batch_size=256,
  )

  def answer(prompts, key):
    decoder = greedy if key is None else sampler
    return decoder(params, prompts, key)

  return answer


def summary_line(split: str, counts: dict[str, list[int]]) -> str:
  """'dpo on-policy train pairs: 9 of 40 prompts got a wrong answer (...)'."""
  n = sum(c[0] for c in counts.values())
  k = sum(c[1] for c in counts.values())
  per = ", ".join(f"{t} {c[1]}/{c[0]}" for t, c in sorted(counts.items()))
  return (
    f"dpo on-policy {split} pairs: {k} of {n} prompts got a wrong answer "
    f"({per})"
  )


def write_pairs(
  out_dir: str,
  settings: dict,
  records: dict[str, Sequence[dict]],
  answer_fn: AnswerFn,
  *,
  samples: int,
  seed: int,
  write: bool = True,
  every_wrong: bool = False,
) -> dict[str, str]:
  """Mines each split into OUT_DIR/onpolicy_{split}.jsonl, once.

  `settings` say what was mined (starting model, sampling); files whose
  manifest matches are reused, so a resumed run does not decode again. With
  `write=False` (processes other than 0) the decoding still runs, as every
  process must join the sharded forward passes, but nothing is written.
  """
  paths = {s: os.path.join(out_dir, f"onpolicy_{s}.jsonl") for s in records}
  manifest = os.path.join(out_dir, "onpolicy.json")
  settings = {"format": _FORMAT, **settings}
  if tasks.manifest_matches(manifest, settings, paths):
    return paths

  def rows():
    for split, recs in records.items():
      start = time.perf_counter()
      mined, counts = mine(
        recs, answer_fn, samples=samples, seed=seed, every_wrong=every_wrong
      )
      if write:
        took = time.perf_counter() - start
        print(f"{summary_line(split, counts)}; mined in {took:.1f} s")
      yield split, mined

  if write:
    tasks.write_once(manifest, settings, paths, rows)
  else:
    for _ in rows():
      pass
  return paths


# `config.dpo.builtin_pairs`: the model's own mistakes; the suite's near
# misses; or both for training (held out: the mined pairs), which gives a
# reward model negatives on tasks where the model makes almost none.
BUILTIN_PAIRS = ("on_policy", "synthetic", "on_policy+synthetic")


def builtin_pairs(config, workdir: str, tokenizer, apply_fn, params):
  """The built-in preference data (`data.train_files` empty): pairs mined
  from the starting model's own mistakes (`dpo.builtin_pairs='on_policy'`,
  the default; its `mine_*` settings), the suite's synthetic near misses,
  or both (`'on_policy+synthetic'`).
  Shared by DPO, the reward model and KTO (which unpairs them).

  Returns (train_spec, eval_spec, held-out suite rows for task accuracy).
  """
  c, d = config, config.dpo
  if d.mine_pairs not in ("first", "all"):
    raise ValueError(
      f"config.dpo.mine_pairs: unknown {d.mine_pairs!r}; expected 'first' "
      "(one pair per prompt) or 'all' (one per distinct wrong answer)"
    )
  if d.builtin_pairs not in BUILTIN_PAIRS:
    raise ValueError(
      f"config.dpo.builtin_pairs: unknown {d.builtin_pairs!r}; expected "
      f"one of {BUILTIN_PAIRS}"
    )
  fields = ("task", "prompt", "completion")
  sft_train, sft_eval = sources.data_files(c, workdir, "sft")
  held_out = list(pipeline.read_jsonl_files(sft_eval, fields))
  synthetic = sources.data_files(c, workdir, "pref")
  if d.builtin_pairs == "synthetic":
    return synthetic[0], synthetic[1], held_out
  train = list(pipeline.read_jsonl_files(sft_train, fields))
  n = d.mine_prompts or len(train)
  if not 0 < n <= len(train):
    raise ValueError(
      f"config.dpo.mine_prompts={d.mine_prompts}: the built-in suite has "
      f"{len(train)} training prompts"
    )
  paths = write_pairs(
    os.path.join(workdir, "data"),
    {
      "init": c.init,
      "prompts": n,
      "samples": d.mine_samples,
      "temperature": d.mine_temperature,
      "max_new_tokens": c.sft.max_new_tokens,
      "seed": c.seed,
      "pairs": d.mine_pairs,
    },
    {"train": train[:n], "eval": held_out},
    make_answer_fn(
      apply_fn,
      params,
      tokenizer,
      max_new=c.sft.max_new_tokens,
      temperature=d.mine_temperature,
    ),
    samples=d.mine_samples,
    seed=c.seed,
    write=jax.process_index() == 0,
    every_wrong=d.mine_pairs == "all",
  )
  sharding.sync("jft_onpolicy_pairs")
  for split, path in paths.items():
    # Bytes: a damaged file is read_jsonl's to report, with its line.
    with open(path, "rb") as f:
      if not any(line.strip() for line in f):
        raise ValueError(
          f"{path}: the starting model answered every {split} prompt "
          "right, so there are no pairs to learn from; set "
          "config.dpo.builtin_pairs='synthetic' or raise "
          "config.dpo.mine_samples"
        )
  train_spec = paths["train"]
  if d.builtin_pairs == "on_policy+synthetic":  # held out: mined pairs only
    train_spec += "," + synthetic[0]
  return train_spec, paths["eval"], held_out


def unpaired(train_spec: str, eval_spec: str) -> tuple[str, str]:
  """KTO rows (`{"prompt","completion","label"}`) from preference pairs:
  each chosen answer a desirable row, each rejected one an undesirable row
  (a row repeated by several pairs, e.g. the true answer under
  `mine_pairs='all'`, once), written next to each pairs file (process 0)
  as `*_kto.jsonl`. Specs may list several files (comma-separated)."""
  out = []
  for spec in (train_spec, eval_spec):
    paths = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
      path = part.removesuffix(".jsonl") + "_kto.jsonl"
      if jax.process_index() == 0:
        rows = {}
        for r in pipeline.read_jsonl_files(
          part, ("prompt", "chosen", "rejected")
        ):
          for field, label in (("chosen", True), ("rejected", False)):
            row = {"prompt": r["prompt"], "completion": r[field]}
            rows.setdefault(json.dumps({**row, "label": label}), None)
        text = "".join(line + "\n" for line in rows)
        write_bytes_atomic(path, text.encode("utf-8"))
      paths.append(path)
    out.append(",".join(paths))
  sharding.sync("jft_kto_rows")
  return out[0], out[1]
