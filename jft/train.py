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
  checkpoint,
  evaluators,
  init,
  metrics,
  objectives,
  optim,
  sharding,
  steps,
)
from jft.data import feed, sources
from jft.interop import hf
from jft.interop import peft as peft_format
from jft.models import transformer
from jft.peft import lora
from jft.state import TrainState, flat_paths, model_params, split_params


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/inf loss; the run stops before saving it."""


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
  would (tests and notebooks use it; a rerun resumes).
  """
  os.makedirs(workdir, exist_ok=True)
  primary = jax.process_index() == 0
  ckpt = checkpoint.Checkpointer(workdir, config.keep_checkpoints)
  start = ckpt.latest_step() or 0
  if start >= config.total_steps:
    if primary:
      print(
        f"{workdir}: already finished (step {start} of "
        f"{config.total_steps}); nothing to do."
      )
    ckpt.close()
    return {}
  for key in init.STAGE_KEYS:
    value = init.get_key(config, key)
    if isinstance(value, str) and init.kind(value) == "stage":
      raise ValueError(
        f"config.{key}={value!r}: resolve stages before training "
        "(jft.init.resolve_stages(config, train.run); python -m jft.main "
        "does this)"
      )

  # Mesh.
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config.mesh)

  # Data.
  objective_cls = objectives.get(config.objective)
  train_spec, eval_spec = sources.data_files(
    config, workdir, getattr(objective_cls, "builtin_split", "pretrain")
  )
  tokenizer = init.load_tokenizer(
    config, workdir, lambda: sources.corpus_texts(train_spec)
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
  model = transformer.Transformer(model_cfg)
  if primary:
    resolved = config.to_dict()
    resolved["model"] = {
      "preset": config.model.preset,
      **transformer.config_to_dict(model_cfg),
    }
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(resolved, f, indent=2, default=str)
    logging.info("model: %s", model_cfg)
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
  train_iter, eval_batches = data.train, data.eval_batches
  evals = evaluators.build(
    config, tokenizer, data.eval_records, objective.evaluators
  )

  trainable, frozen = split_params(params, freeze_table(config, model_cfg))
  for path, leaf in flat_paths(trainable).items():
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      raise ValueError(
        f"config.freeze: {path} ({leaf.dtype}) cannot be trained; freeze it"
      )
  ref = objective.reference_params(params, trainable)
  del params
  optimizer, schedule = optim.make_optimizer(
    config.optimizer, config.total_steps, trainable
  )
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
  state = jax.device_put(
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
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  accounting = {
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
    print("params: " + ", ".join(f"{k}={v:,}" for k, v in accounting.items()))

  # Resume.
  writer = metrics.MetricWriter(workdir, enabled=primary)
  if start:
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      state,
    )
    state = ckpt.restore(start, abstract, train_iter)
    if primary:
      metrics.truncate_jsonl(writer.path, start)
      print(f"Resuming {workdir} from checkpoint at step {start}.")

  # Compile.
  batch_shardings = sharding.batch_sharding(mesh)
  # Traced under the mesh and rules: the model's activation constraints apply.
  p_train_step = jax.jit(
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
  p_eval_step = jax.jit(
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

  def evaluate(state) -> dict[str, float]:
    params, res = state.params, {}
    if eval_batches:
      sums = None
      for b in eval_batches:
        out = p_eval_step(params, state.ref, sharding.global_batch(b, mesh))
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

  def check_finite(step: int, m) -> None:
    loss = float(m["train/loss"])
    if not math.isfinite(loss):
      ckpt.wait()
      raise NonFiniteLossError(
        f"train/loss is {loss} at step {step}; stopping. The last good "
        f"checkpoint is step {ckpt.latest_step()} in {ckpt.directory}"
      )

  # Loop.
  progress = metrics.Progress(config.total_steps, enabled=primary)
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
  try:
    for step in range(start, config.total_steps):
      local, source_metrics = train_iter.next(state)
      tokens += int(np.sum(local["weights"] > 0))
      state, m = p_train_step(state, sharding.global_batch(local, mesh))
      s = step + 1
      if pending is not None:  # one step behind: keeps dispatch async
        check_finite(*pending)
      pending = (s, m)
      out = {f"train/{k}": v for k, v in source_metrics.items()}  # rollouts
      if s % config.log_every == 0 or s == config.total_steps:
        check_finite(s, m)
        now = time.time()
        out.update(
          {
            k: float(v)
            for k, v in jax.device_get(m).items()
            if k != "train/weight"
          }
        )
        elapsed = max(now - t_last, 1e-9)
        out["train/tokens_per_s"] = tokens * n_proc / elapsed
        out["train/steps_per_s"] = (s - s_last) / elapsed
        tokens, t_last, s_last = 0, now, s
        progress.update(s, out)
      if config.eval_every and (
        s % config.eval_every == 0 or s == config.total_steps
      ):
        ev = evaluate(state)
        out.update(ev)
        if ev and primary:
          print("  ".join(f"{k} {v:.4f}" for k, v in ev.items()))
        t_last, s_last = time.time(), s  # eval is not training throughput
      stop = stop_after is not None and s >= stop_after
      if s % config.checkpoint_every == 0 or s == config.total_steps or stop:
        check_finite(s, m)
        ckpt.save(s, state, train_iter)
      if out:
        writer.write(s, out)
        last = out
      if stop:
        break
  finally:
    ckpt.close()
    writer.close()
  if int(state.step) >= config.total_steps:
    export(config, workdir, state, model_cfg, tokenizer, primary)
  if primary and int(state.step) >= config.total_steps:
    report = ""
    if objective.summary_rows or objective.evaluators:
      report = evaluators.summary_table(
        objective.summary_rows, *metrics.first_and_last(writer.path)
      )
    if report:
      print(report)
      with open(os.path.join(workdir, "summary.md"), "w") as f:
        f.write(report + "\n")
  return last


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


def export(
  config, workdir: str, state, model_cfg, tokenizer, primary: bool
) -> None:
  """End-of-run artefacts: LoRA adapters alone and/or the merged model.

  Every process takes part in gathering sharded params; process 0 writes.
  """
  if not (
    model_cfg.peft.lora_rank
    and (config.lora.save_adapters or config.lora.save_merged)
  ):
    return
  params = model_params(sharding.to_host(state.params))
  if not primary:
    return
  if config.lora.save_adapters:
    out = os.path.join(workdir, "adapters")
    base = init.hf_dir(config.init) if init.kind(config.init) == "hf" else ""
    peft_format.save_adapter(out, params, model_cfg, base_model=base)
    print(f"adapters: {out}")
  if config.lora.save_merged:
    out = os.path.join(workdir, "merged")
    hf.export_model(
      out,
      params,
      model_cfg,
      tokenizer=tokenizer,
      source=os.path.join(workdir, init.SOURCE_DIR),
      overwrite=True,
    )
    print(f"merged model: {out}")
