"""What a run trains and evaluates on: its data source, eval batches and the
held-out records evaluators read.

`build` picks by the objective's declared `source`: 'examples' reads JSONL
(the user's files or the built-in suite; for preference objectives the
built-in pairs are mined from the starting model, `onpolicy.builtin_pairs`)
into examples and a grain iterator; 'rollouts' (PPO, GRPO) serves rollouts
of the current policy over the prompts (`jft.rl.rollouts`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from jft import init, sharding
from jft.data import onpolicy, pipeline, refcache, sources, stream
from jft.models import transformer
from jft.rl import rollouts


@dataclasses.dataclass
class Data:
  train: object  # `next(state) -> (local batch, metrics)`; checkpointable
  eval_batches: list  # this process's host batches
  eval_records: list  # held-out rows for evaluators (e.g. task prompts)
  stats: dict  # data/* counts, logged at step 0
  # With config.data.num_epochs: the steps the data lasts, the same on every
  # process (`train_steps`); None = it repeats (or rollouts: no end).
  steps: int | None = None


def files(config, objective, workdir, tokenizer, apply_fn, params):
  """(train_spec, eval_spec, held-out rows or None) for the objective."""
  if config.data.train_files:
    return config.data.train_files, config.data.eval_files, None
  if objective.builtin_split == "pref":
    return onpolicy.builtin_pairs(config, workdir, tokenizer, apply_fn, params)
  if objective.builtin_split == "kto":
    train, ev, held_out = onpolicy.builtin_pairs(
      config, workdir, tokenizer, apply_fn, params
    )
    return (*onpolicy.unpaired(train, ev), held_out)
  train, ev = sources.data_files(config, workdir, objective.builtin_split)
  return train, ev, None


def shard_eval(batches: list[dict], pad_id: int) -> list[dict]:
  """This process's eval batches, equal in count across processes."""
  n, i = jax.process_count(), jax.process_index()
  mine = batches[i::n]
  total = -(-len(batches) // n)
  while len(mine) < total:  # an all-padding batch contributes weight 0
    pad = {k: np.zeros_like(v) for k, v in batches[0].items()}
    pad["inputs"][:] = pad_id
    pad["targets"][:] = pad_id
    mine.append(pad)
  return mine


def build(
  config,
  objective,
  tokenizer,
  workdir,
  apply_fn,
  params,
  mesh,
  run_batches,
  lm=None,
) -> Data:
  """The run's data (see the module docstring).

  `lm()` gives the (apply_fn, params) of a language model to mine built-in
  pairs with, when the model trained is not one (a reward model); by
  default the model itself.
  """
  miner = lm() if lm is not None else (apply_fn, params)
  train_spec, eval_spec, held_out = files(
    config, objective, workdir, tokenizer, *miner
  )
  del miner
  if objective.source == "rollouts":
    prompts = pipeline.read_jsonl_files(train_spec, ("prompt",))
    records = (
      pipeline.read_jsonl_files(eval_spec, ("prompt",)) if eval_spec else []
    )
    cls = {"ppo": rollouts.PPORollouts, "grpo": rollouts.GRPORollouts}[
      objective.name
    ]
    source = cls(config, objective, tokenizer, prompts, apply_fn, workdir, mesh)
    return Data(source, [], records, {})
  if config.data.streaming:
    return _streamed(config, objective, tokenizer, train_spec, eval_spec)
  train = objective.make_examples(
    pipeline.read_jsonl_files(train_spec, objective.fields)
  )
  precompute = functools.partial(
    refcache.precompute,
    objective,
    apply_fn=apply_fn,
    params=params,
    run_batches=run_batches,
    cache_dir=init.cache_root(config),
    model_config=transformer.config_to_dict(apply_fn.config),
    say=print if jax.process_index() == 0 else (lambda *_: None),
  )
  train = precompute(train, split="train")
  layout = dict(_layout(config, objective), num_epochs=config.data.num_epochs)
  eval_batches, records = _eval_batches(
    config,
    objective,
    tokenizer,
    eval_spec,
    layout["packing"],
    functools.partial(precompute, split="eval"),
  )
  iterator = pipeline.make_train_iter(train, pad_id=tokenizer.pad_id, **layout)
  steps, padding = None, None
  if config.data.num_epochs is not None:
    steps = train_steps(train, layout)
    padding = pipeline.padding_batch(
      train,
      seq_len=layout["seq_len"],
      batch_size=layout["batch_size"],
      pad_id=tokenizer.pad_id,
    )
  return Data(
    sources.Static(iterator, padding),
    eval_batches,
    held_out if held_out is not None else records,
    dict(objective.data_stats),
    steps,
  )


def _layout(config, objective) -> dict:
  """This process's batch layout (`pipeline.make_train_iter`'s keywords)."""
  packing = (
    config.data.packing if objective.packing is None else objective.packing
  )
  n_proc = jax.process_count()
  return dict(
    seq_len=config.seq_len * objective.seq_len_factor,
    batch_size=config.batch_size // n_proc,
    seed=config.seed,
    shuffle=config.data.shuffle,
    shard_index=jax.process_index(),
    shard_count=n_proc,
    packing=packing,
  )


def _eval_batches(
  config, objective, tokenizer, eval_spec, packing, prepare=lambda x: x
):
  """(this process's eval batches, the held-out records) of `eval_spec`;
  `prepare` adds what the objective precomputes to the examples."""
  if not eval_spec:
    return [], []
  records = pipeline.read_jsonl_files(eval_spec, objective.fields)
  examples = prepare(objective.make_examples(records, split="eval"))
  if not examples:
    return [], records
  batches = pipeline.make_eval_batches(
    examples,
    seq_len=config.seq_len * objective.seq_len_factor,
    batch_size=config.eval_batch_size,
    pad_id=tokenizer.pad_id,
    packing=packing,
  )
  return shard_eval(batches, tokenizer.pad_id), records


def _streamed(config, objective, tokenizer, train_spec, eval_spec) -> Data:
  """`config.data.streaming`: training records read, parsed and tokenized
  one at a time as training consumes them (`jft.data.stream`); the eval
  files are read up front, as in a run that does not stream."""
  layout = _layout(config, objective)
  source = stream.JsonlSource(train_spec, objective.fields)
  iterator, padding = pipeline.make_stream_iter(
    source,
    lambda record: objective.make_examples([record]),
    pad_id=tokenizer.pad_id,
    read_threads=config.data.read_threads,
    **layout,
  )
  eval_batches, records = _eval_batches(
    config, objective, tokenizer, eval_spec, layout["packing"]
  )
  stats = {"data/train_records": len(source), **objective.data_stats}
  return Data(sources.Static(iterator, padding), eval_batches, records, stats)


def train_steps(examples, layout: dict) -> int:
  """Steps that `layout["num_epochs"]` passes over `examples` take: this
  process's batches (`pipeline.count_train_batches`; the last one padded,
  not dropped), the most of any process's, so every process stops at the
  same step and none of the data is left out; a process whose shard is
  shorter serves padding batches (weight 0) at the end."""
  return sharding.max_over_processes(
    pipeline.count_train_batches(examples, **layout)
  )
