"""Where a run's data comes from: files, and the data-source plug-ins.

`config.data.train_files == ''` means the built-in task suite, written once
into `WORKDIR/data`. (The tokenizer's origin is `jft.init`'s concern.)

The trainer asks its data source for each step's batch with
`source.next(state)`, which returns `(local batch, metrics)`: a JSONL file
ignores the state (`Static`); online RL's rollouts are made with the policy
in it (`jft.rl.rollouts`). Either way the source's position is checkpointed
with the train state (`get_state` / `set_state`).
"""

from __future__ import annotations

import json
import os

import jax

from jft import sharding
from jft.data import pipeline, stream, tasks


def state_dict(state) -> dict:
  """A source state as saved (a dict, or the JSON bytes grain's checkpoint
  handler passes back)."""
  if isinstance(state, bytes | str):
    return json.loads(state)
  return state


class Static:
  """A source over prepared examples: the grain iterator; the train state
  is not read.

  A finite iterator (`data.num_epochs`) that runs out serves `padding` (an
  all-padding batch, weight 0) from then on: with several processes, a
  shard shorter than the longest one pads while the others finish theirs.
  Without `padding`, running out is an error.
  """

  def __init__(self, iterator, padding: dict | None = None):
    self.iterator = iterator
    self.padding = padding

  def next(self, state) -> tuple[dict, dict]:
    del state
    try:
      return next(self.iterator), {}
    except StopIteration:
      if self.padding is None:
        raise pipeline.DataError(
          "the training data ran out (config.data.num_epochs passes) "
          "before config.total_steps"
        ) from None
      return self.padding, {}

  def get_state(self) -> dict:
    return self.iterator.get_state()

  def set_state(self, state) -> None:
    self.iterator.set_state(state_dict(state))

  def start_prefetch(self) -> None:
    start = getattr(self.iterator, "start_prefetch", None)
    if start is not None:
      start()


def data_files(config, workdir: str, kind: str) -> tuple[str, str]:
  """(train_spec, eval_spec) for an objective whose built-in split is kind."""
  d = config.data
  if d.train_files:
    return d.train_files, d.eval_files
  b = d.builtin

  def write():
    return tasks.write_suite(
      os.path.join(workdir, "data"),
      tasks=tuple(t for t in b.tasks.split(",") if t),
      n_train=b.n_train,
      n_eval=b.n_eval,
      seed=b.seed,
    )

  # Process 0 writes; the others wait, then find it written (idempotent).
  if jax.process_index() == 0:
    write()
  sharding.sync("jft_builtin_suite")
  paths = write()
  kind = {"kto": "pref"}.get(kind, kind)  # KTO's rows: the pairs, unpaired
  return paths[f"{kind}_train"], paths[f"{kind}_eval"]


def corpus_texts(train_spec: str, limit_mb: float = 0):
  """Every string field of the training records: what the model will see
  (the text a new tokenizer is trained on), up to `limit_mb` MB of it
  (counted in characters) from the start, in file order (0: all). Records
  are read lazily, so a large corpus is read only as far as the limit."""
  limit = limit_mb * 2**20 if limit_mb else float("inf")
  seen = 0
  source = stream.JsonlSource(train_spec)
  try:
    for i in range(len(source)):
      for text in _texts(source[i]):
        if seen >= limit:
          print(
            f"tokenizer: trained on the first {limit_mb} MB of the training "
            "text (config.data.tokenizer_train_mb)"
          )
          return
        seen += len(text)
        yield text
  finally:
    source.close()


def _texts(record: dict):
  """A record's strings: its string fields and chat messages' contents."""
  for v in record.values():
    if isinstance(v, str):
      yield v
    elif isinstance(v, list):  # chat messages
      for m in v:
        if isinstance(m, dict) and isinstance(m.get("content"), str):
          yield m["content"]
