"""Where a run's data and tokenizer come from.

`config.data.train_files == ''` means the built-in task suite, written once
into `WORKDIR/data`. The tokenizer is, in order: `config.data.tokenizer`, the
one of the run named by `config.init`, this workdir's own (resume), or one
trained on the training text and saved as `WORKDIR/tokenizer.model`.
"""

from __future__ import annotations

import os

import jax

from jft import sharding
from jft.data import pipeline, tasks
from jft.data.tokenizer import Tokenizer, train_tokenizer, write_bytes_atomic

TOKENIZER_FILE = "tokenizer.model"


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
  return paths[f"{kind}_train"], paths[f"{kind}_eval"]


def _corpus_texts(train_spec: str):
  """Every string field of the training records: what the model will see."""
  for rec in pipeline.read_jsonl_files(train_spec, required=()):
    for v in rec.values():
      if isinstance(v, str):
        yield v
      elif isinstance(v, list):  # chat messages
        for m in v:
          if isinstance(m, dict) and isinstance(m.get("content"), str):
            yield m["content"]


def init_workdir(init: str) -> str | None:
  """The jft workdir named by `config.init`, if it names one."""
  if init and not init.startswith("hf:"):
    return init
  return None


def load_tokenizer(config, workdir: str, train_spec: str) -> Tokenizer:
  """The run's tokenizer, also kept as WORKDIR/tokenizer.model.

  Keeping a copy makes every workdir self-contained: a later stage that
  starts from this run (`config.init`) reads the very same vocabulary.
  """
  tok = _find_tokenizer(config, workdir, train_spec)
  own = os.path.join(workdir, TOKENIZER_FILE)
  if jax.process_index() == 0 and not os.path.exists(own):
    write_bytes_atomic(own, tok.model_proto)  # unique temp name + rename
  return tok


def _find_tokenizer(config, workdir: str, train_spec: str) -> Tokenizer:
  if config.data.tokenizer:
    return Tokenizer.load(config.data.tokenizer)
  src = init_workdir(config.init)
  if src and os.path.exists(os.path.join(src, TOKENIZER_FILE)):
    return Tokenizer.load(os.path.join(src, TOKENIZER_FILE))
  if config.init.startswith("hf:"):
    path = os.path.join(config.init[3:], "tokenizer.model")
    if os.path.exists(path):
      return Tokenizer.load(path)
  own = os.path.join(workdir, TOKENIZER_FILE)
  if os.path.exists(own):
    return Tokenizer.load(own)
  return train_tokenizer(
    _corpus_texts(train_spec),
    output_path=own,
    vocab_size=config.data.tokenizer_vocab_size,
  )
