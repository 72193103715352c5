"""The one training loop every objective runs through.

Read top to bottom: mesh -> data -> model -> abstract state -> shardings ->
init/restore -> jit(step) -> loop (log, eval, checkpoint). Objectives plug in
by name (`config.objective`); nothing here branches on which one it is.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jft import (
  artefacts,
  checkpoint,
  errors,
  evaluators,
  hostmem,
  init,
  metrics,
  objectives,
  optim,
  preempt,
  resume,
  runlock,
  sharding,
  steps,
)
from jft.data import feed, sources
from jft.models import transformer
from jft.peft import lora
from jft.state import TrainState, flat_paths, model_params, split_params
from jft.validate import validate


class NonFiniteLossError(errors.NonFiniteError):
  """Training produced a NaN/inf; the run stops before saving it."""


def freeze_table(config, model_cfg):
  """`config.freeze`, or the automatic table when it is empty."""
  if config.freeze:
    return tuple(tuple(r) for r in config.freeze)
  critic = ((r"critic/.*", "trainable"),)  # PPO's critic trains in full
  if model_cfg.peft.lora_rank > 0:
    return critic + lora.ADAPTER_FREEZE
  return ((".*", "trainable"),)


class ApplyFn:
  """`apply_fn(params, inputs, positions, segment_ids, *, rng, train,
  cache)`: the model's pure forward; `.config` is its TransformerConfig
  (decoders size their KV cache from it), `.mesh` the run's mesh (decoders
  shard their rows over it)."""

  def __init__(self, model: nn.Module, mesh=None):
    self.model, self.config, self.mesh = model, model.config, mesh

  def __call__(
    self,
    params,
    inputs,
    positions,
    segment_ids,
    *,
    rng=None,
    train=False,
    **kwargs,
  ):
    rngs = {"dropout": rng} if (train and rng is not None) else {}
    return self.model.apply(
      {"params": model_params(params)},  # without PPO's critic
      inputs,
      positions,
      segment_ids,
      deterministic=not train,
      rngs=rngs,
      **kwargs,
    )


def make_apply_fn(model: nn.Module, mesh=None) -> ApplyFn:
  return ApplyFn(model, mesh)


def run(
  config, workdir: str, *, stop_after: int | None = None
) -> dict[str, float]:
  """Trains per `config` in `workdir`; returns the last logged metrics.

  `stop_after=k` checkpoints and returns after step k, as a preempted job
  would (tests and notebooks use it; a rerun resumes). SIGTERM/SIGINT save
  and raise `errors.Preempted`; one run per workdir (`runlock`).
  """
  validate(config)  # every value rule, before anything is built
  logging.info("host memory: %s", hostmem.tune())
  os.makedirs(workdir, exist_ok=True)
  primary = jax.process_index() == 0
  say = print if primary else (lambda *_: None)
  with (
    runlock.WorkdirLock(workdir, enabled=primary, say=say),
    preempt.Preemption(say=say) as stop_signal,
  ):
    return _run(config, workdir, stop_after, stop_signal, primary)


def _resolved_config(config, model_cfg) -> dict:
  """The config as WORKDIR/config.json records it: the model's full shape,
  and what the run finds out (`runtime`)."""
  resolved = config.to_dict()
  resolved["model"] = {
    "preset": config.model.preset,
    **transformer.config_to_dict(model_cfg),
  }
  # Not config keys, but a resume must match them too: each process's data
  # position is saved, so another process count would read other rows.
  resolved["runtime"] = {"process_count": jax.process_count()}
  return resolved


def _write_config(resolved: dict, workdir: str, model_cfg) -> None:
  """WORKDIR/config.json: the resolved config (`_resolved_config`, with
  the steps the run takes). A resume checked it first (jft/resume.py), so
  a changed key is an error, not an overwrite."""
  if jax.process_index() == 0:
    path = os.path.join(workdir, "config.json")
    with open(path + ".tmp", "w") as f:
      json.dump(resolved, f, indent=2, default=str)
    os.replace(path + ".tmp", path)
    logging.info("model: %s", model_cfg)


def _check_stages_resolved(config) -> None:
  for key in init.STAGE_KEYS:
    value = init.get_key(config, key)
    if isinstance(value, str) and init.kind(value) == "stage":
      raise ValueError(
        f"config.{key}={value!r}: resolve stages before training "
        "(jft.init.resolve_stages(config, train.run); python -m jft.main "
        "does this)"
      )


def _initial_state(
  config, model_cfg, params, objective, mesh, total
) -> TrainState:
  """The train state at step 0, placed on the mesh."""
  trainable, frozen = split_params(params, freeze_table(config, model_cfg))
  for path, leaf in flat_paths(trainable).items():
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      raise ValueError(
        f"config.freeze: {path} ({leaf.dtype}) cannot be trained; freeze it"
      )
  ref = objective.reference_params(params, trainable)
  optimizer, _ = optim.make_optimizer(config.optimizer, total, trainable)
  state = TrainState(
    step=jnp.zeros((), jnp.int32),
    trainable=trainable,
    frozen=frozen,
    opt_state=jax.jit(  # moments shard like their params (FSDP)
      optimizer.init,
      out_shardings=sharding.opt_state_shardings(optimizer, trainable, mesh),
    )(trainable),
    rng=jax.random.PRNGKey(config.seed),
    ref=ref,
  )
  return jax.device_put(
    state,
    jax.tree.map(
      lambda x: (
        x.sharding
        if isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding)
        else sharding.replicated(mesh)
      ),
      state,
    ),
  )


def _accounting(state, primary: bool) -> dict[str, int]:
  """Parameter counts and bytes, logged at step 0 and printed."""
  acc = {
    "params/trainable": transformer.param_count(state.trainable),
    "params/frozen": transformer.param_count(state.frozen),
    "params/trainable_bytes": transformer.param_bytes(state.trainable),
    "params/frozen_bytes": transformer.param_bytes(state.frozen),
    "params/opt_state_bytes": transformer.param_bytes(state.opt_state),
    "params/reference_bytes": transformer.param_bytes(state.ref),
  }
  if primary:
    labels = {p: "trainable" for p in flat_paths(state.trainable)}
    labels.update({p: "frozen" for p in flat_paths(state.frozen)})
    for p in sorted(labels):
      logging.info("param %-40s %s", p, labels[p])
    print("params: " + ", ".join(f"{k}={v:,}" for k, v in acc.items()))
  return acc


def _compile(config, objective, apply_fn, state, mesh, rules, total):
  """(jitted train step, jitted eval step) with the run's shardings; the
  learning-rate schedule spans `total` steps."""
  optimizer, schedule = optim.make_optimizer(
    config.optimizer, total, state.trainable
  )
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  batch_shardings = sharding.batch_sharding(mesh)
  # Traced under the mesh and rules: the model's activation constraints apply.
  train_step = jax.jit(
    sharding.with_mesh_rules(
      steps.make_train_step(
        objective, apply_fn, optimizer, schedule, config.grad_accum_steps
      ),
      mesh,
      rules,
    ),
    in_shardings=(state_shardings, batch_shardings),
    out_shardings=(state_shardings, sharding.replicated(mesh)),
    donate_argnums=(0,),
  )
  eval_step = jax.jit(
    sharding.with_mesh_rules(
      steps.make_eval_step(objective, apply_fn), mesh, rules
    ),
    in_shardings=(
      jax.tree.map(lambda x: x.sharding, state.params),
      jax.tree.map(lambda x: x.sharding, state.ref),
      batch_shardings,
    ),
    out_shardings=sharding.replicated(mesh),
  )
  return train_step, eval_step


def _evaluator(objective, apply_fn, eval_step, eval_batches, evals, mesh):
  """`evaluate(state) -> {'eval/...': float}`: eval batches + evaluators."""

  def evaluate(state) -> dict[str, float]:
    params, res = state.params, {}
    if eval_batches:
      sums = None
      for b in eval_batches:
        out = eval_step(params, state.ref, sharding.global_batch(b, mesh))
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
      sums = jax.device_get(sums)
      res = {
        f"eval/{k}": float(s) / max(float(w), 1e-12)
        for k, (s, w) in sums.items()
      }
      if objective.token_loss:
        res["eval/perplexity"] = math.exp(min(res["eval/loss"], 80.0))
    for ev in evals:
      res.update(ev(apply_fn, params))
    return res

  return evaluate


def _finite_guard(ckpt):
  """`check(step, metrics)`: raises NonFiniteLossError, naming the last good
  checkpoint, when the step's loss, grad norm or updated params are not
  finite. Every save is preceded by this check, so every saved step is good.
  """

  def check(step: int, m) -> None:
    if bool(m[steps.FINITE]):
      return
    vals = jax.device_get({k: m[k] for k in ("train/loss", "train/grad_norm")})
    what = ", ".join(f"{k} {float(v)}" for k, v in vals.items())
    ckpt.wait()
    good = ckpt.latest_step()
    where = (
      f"The last good checkpoint is step {good} in {ckpt.directory}; a "
      "rerun resumes from it (lower optimizer.lr or raise "
      "optimizer.grad_clip_norm first)"
      if good is not None
      else "No checkpoint was saved before it; nothing to resume"
    )
    raise NonFiniteLossError(
      f"training diverged at step {step} ({what}, or a parameter is not "
      f"finite after the update); stopped without saving it. {where}."
    )

  return check


def _run(config, workdir, stop_after, stop_signal, primary):
  ckpt = checkpoint.Checkpointer(workdir, config.keep_checkpoints)
  try:
    return _train(config, workdir, stop_after, stop_signal, primary, ckpt)
  finally:
    ckpt.close()


def _say_finished(workdir, latest, total, primary) -> dict:
  if primary:
    print(
      f"{workdir}: already finished (step {latest} of {total}); nothing to do."
    )
  return {}


def total_steps(config, data_steps: int | None) -> int:
  """The steps the run takes: `config.total_steps`; with
  `data.num_epochs`, `data_steps` (what those passes over the data take)
  when total_steps is 0, else the fewer of the two."""
  if data_steps is None:
    return config.total_steps
  return min(config.total_steps or data_steps, data_steps)


def _batch_row(config) -> tuple[str, int, str]:
  """(what `batch_size` counts, token slots in one, how to print them).
  DPO and reward rows are pairs, chosen and rejected each `seq_len` long;
  packed pairs are rows of 2 x `seq_len` holding whole pairs."""
  t = config.seq_len
  if config.objective == "dpo" and config.dpo.pack_pairs:
    return "rows", 2 * t, f"2 x {t} tokens (packed pairs)"
  if config.objective in ("dpo", "reward"):
    return "pairs", 2 * t, f"2 x {t} tokens"
  return "rows", t, f"{t} tokens"


def describe_batch(config, n_proc: int) -> str:
  """One line: rows and tokens per optimizer step, and how they are made
  (`batch_size` is global; grad accumulation splits it, not multiplies)."""
  b, k = config.batch_size, config.grad_accum_steps
  unit, slots, shape = _batch_row(config)
  if b % (n_proc * k) == 0:
    parts = [f"{n_proc} process{'es' if n_proc > 1 else ''}"] * (n_proc > 1)
    parts += [f"{k} accumulated micro-batches"] * (k > 1)
    how = " x ".join(parts + [f"{b // (n_proc * k)} {unit}"])
  else:
    how = f"batch_size {b}, grad_accum_steps {k}, {n_proc} processes"
  return (
    f"effective batch: {b} {unit} x {shape} = {b * slots:,} tokens per "
    f"step ({how})"
  )


def _train(config, workdir, stop_after, stop_signal, primary, ckpt):
  latest = ckpt.latest_step() or 0
  done = resume.finished(config, workdir, latest)
  if done is not None:
    return _say_finished(workdir, latest, done, primary)
  _check_stages_resolved(config)

  # Mesh.
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config.mesh)

  # Data.
  objective_cls = objectives.get(config.objective)
  train_spec, eval_spec = sources.data_files(
    config, workdir, getattr(objective_cls, "builtin_split", "pretrain")
  )
  tokenizer = init.load_tokenizer(
    config,
    workdir,
    lambda: sources.corpus_texts(train_spec, config.data.tokenizer_train_mb),
  )
  objective = objective_cls(config, tokenizer)
  n_proc = jax.process_count()
  if config.batch_size % n_proc:
    raise ValueError(
      f"config.batch_size={config.batch_size} is not divisible by the "
      f"{n_proc} processes"
    )

  # Model and parameters.
  model_cfg = init.model_config(config, tokenizer)
  if model_cfg.head != "lm" and model_cfg.peft.lora_rank:
    if config.lora.save_adapters and model_cfg.head == "score":
      raise ValueError(
        "config.lora.save_adapters=True: PEFT adapter files cannot hold a "
        "reward model's trained score head; set it False and use "
        "config.lora.save_merged=True (a sequence classifier)"
      )
  resolved = _resolved_config(config, model_cfg)
  if latest:  # before anything is built or restored
    resume.check(workdir, resolved, config.allow_config_change)
  model = transformer.Transformer(model_cfg)
  init.record_source(config, workdir)
  params = init.init_params(config, model_cfg, mesh, rules)
  apply_fn = make_apply_fn(model, mesh)

  # Data (after the model: some is made with it, e.g. DPO's on-policy
  # pairs or RL's rollouts), and what evaluates the run.
  data = feed.build(
    config,
    objective,
    tokenizer,
    workdir,
    apply_fn,
    params,
    mesh,
    _batch_runner(mesh),
    lm=_starting_lm(config, model_cfg, mesh, rules),
  )
  train_iter = data.train
  total = total_steps(config, data.steps)
  if latest >= total:  # known only now: the data's steps
    return _say_finished(workdir, latest, total, primary)
  resolved["total_steps"] = total
  if data.steps is not None:  # resume.planned_steps reads it
    resolved["runtime"]["data_steps"] = data.steps
  _write_config(resolved, workdir, model_cfg)
  if primary:
    epochs = config.data.num_epochs
    why = f" ({epochs} epochs of the data)" if total == data.steps else ""
    print(describe_batch(config, n_proc))
    print(f"schedule: {optim.describe_schedule(config.optimizer, total)}{why}")
  evals = evaluators.build(
    config, tokenizer, data.eval_records, objective.evaluators
  )
  state = _initial_state(config, model_cfg, params, objective, mesh, total)
  del params
  accounting = _accounting(state, primary)

  # Resume: the newest checkpoint that verifies (older ones if not).
  writer = metrics.MetricWriter(workdir, enabled=primary, config=config)
  start = 0
  if latest:
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      state,
    )
    start, restored = ckpt.restore_latest_good(
      abstract, train_iter, say=print if primary else (lambda *_: None)
    )
    if restored is not None:
      state = restored
    if primary and start:
      print(f"Resuming {workdir} from checkpoint at step {start}.")
  if primary:  # rows past the restored step are logged again (all of a
    # run killed before its first checkpoint, step 0 included)
    metrics.truncate_jsonl(writer.path, start if start else -1)

  train_step, eval_step = _compile(
    config, objective, apply_fn, state, mesh, rules, total
  )
  evaluate = _evaluator(
    objective, apply_fn, eval_step, data.eval_batches, evals, mesh
  )
  check_finite = _finite_guard(ckpt)

  # Loop.
  progress = metrics.Progress(total, enabled=primary)
  last = {}
  if start == 0:
    first = dict(accounting)
    first.update(data.stats)
    if config.eval_every:
      first.update(evaluate(state))
    writer.write(0, first)
    if "eval/loss" in first and primary:
      print(
        "step 0: "
        + "  ".join(
          f"{k} {v:.4f}" for k, v in first.items() if k.startswith("eval/")
        )
      )
  tokens, t_last, s_last, pending = 0, time.time(), start, None
  preempted = False
  try:
    for step in range(start, total):
      local, source_metrics = train_iter.next(state)
      tokens += int(np.sum(local["weights"] > 0))
      state, m = train_step(state, sharding.global_batch(local, mesh))
      s = step + 1
      if pending is not None:  # one step behind: keeps dispatch async
        check_finite(*pending)
      pending = (s, m)
      out = {f"train/{k}": v for k, v in source_metrics.items()}  # rollouts
      if s % config.log_every == 0 or s == total:
        check_finite(s, m)
        now = time.time()
        out.update(
          {
            k: float(v)
            for k, v in jax.device_get(m).items()
            if k.startswith("train/") and k != "train/weight"
          }
        )
        elapsed = max(now - t_last, 1e-9)
        out["train/tokens_per_s"] = tokens * n_proc / elapsed
        out["train/steps_per_s"] = (s - s_last) / elapsed
        tokens, t_last, s_last = 0, now, s
        progress.update(s, out)
      if config.eval_every and (s % config.eval_every == 0 or s == total):
        ev = evaluate(state)
        out.update(ev)
        if ev and primary:
          print("  ".join(f"{k} {v:.4f}" for k, v in ev.items()))
        t_last, s_last = time.time(), s  # eval is not training throughput
      # Every step asks (all processes must); the last step just finishes.
      preempted = stop_signal.should_stop(s) and s < total
      stop = preempted or (stop_after is not None and s >= stop_after)
      if s % config.checkpoint_every == 0 or s == total or stop:
        check_finite(s, m)
        ckpt.save(s, state, train_iter)
      if out:
        writer.write(s, out)
        last = out
      if stop:
        break
    ckpt.wait()
  finally:
    writer.close()
  if preempted:
    raise errors.Preempted(int(state.step), stop_signal.signame, workdir)
  finished = int(state.step) >= total
  if primary and finished and total < config.total_steps:
    print(
      f"data exhausted after {config.data.num_epochs} epochs at step "
      f"{total} of {config.total_steps}"
    )
  if finished:
    artefacts.export(config, workdir, state, model_cfg, tokenizer, primary)
  if primary and finished:
    artefacts.write_summary(objective, workdir, writer.path)
    artefacts.write_curves(workdir, writer.path)
  if primary and finished:  # last: it points at what the lines above wrote
    print(end_summary(workdir, total))
  return last


HEADLINE = (  # what a finished run's summary shows, when logged
  "train/loss",
  "eval/loss",
  "eval/perplexity",
  "eval/accuracy",
  "eval/task_accuracy",
  "eval/masked_accuracy",
)


def end_summary(workdir: str, step: int) -> str:
  """The lines a finished run ends with: its workdir, the last value of
  each headline metric, the before/after table and curves when written,
  and how to open TensorBoard."""
  _, last = metrics.first_and_last(os.path.join(workdir, "metrics.jsonl"))
  shown = [f"{k} {last[k]:.4f}" for k in HEADLINE if last.get(k) is not None]
  lines = [f"done: {workdir} (step {step})"]
  if shown:
    lines.append("  " + "  ".join(shown))
  for label, name in (("summary", "summary.md"), ("curves", "curves.png")):
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      lines.append(f"  {label}: {path}")
  lines.append(f"  tensorboard --logdir {os.path.join(workdir, 'tb')}")
  return "\n".join(lines)


def _starting_lm(config, model_cfg, mesh, rules):
  """For a reward model (no LM head): a loader of the language model it
  starts from, which mines its built-in pairs; None otherwise."""
  if model_cfg.head != "score" or not config.init:
    return None

  def load():
    lm_cfg = dataclasses.replace(lora.base_config(model_cfg), head="lm")
    c = config.copy_and_resolve_references()
    c.init_adapter, c.lora.rank, c.quant.kind = "", 0, ""
    params = init.init_params(c, lm_cfg, mesh, rules)
    return make_apply_fn(transformer.Transformer(lm_cfg), mesh), params

  return load


def _batch_runner(mesh):
  """`run(fn, params, host_batches)`: jitted fn over whole-data batches.

  Every process passes the same full batches (not its shard), so arrays are
  built from the full host data by index.
  """

  def run(fn, params, batches):
    jfn = jax.jit(fn)
    outs = []
    for b in batches:
      placed = {
        k: jax.make_array_from_callback(
          v.shape, sharding.batch_sharding(mesh, v.ndim), lambda i, v=v: v[i]
        )
        for k, v in b.items()
      }
      outs.append(sharding.to_host(jfn(params, placed)))
    return outs

  return run
