"""The one training loop every objective runs through.

Read top to bottom: mesh -> data -> model -> abstract state -> shardings ->
init/restore -> jit(step) -> loop (log, eval, checkpoint). Objectives plug in
by name (`config.objective`); nothing here branches on which one it is.
"""

from __future__ import annotations

import json
import math
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from jft import checkpoint, metrics, objectives, optim, sharding, stages, steps
from jft.data import pipeline, sources
from jft.models import transformer
from jft.peft import lora, quant
from jft.state import TrainState, flat_paths, merge_params, split_params


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/inf loss; the run stops before saving it."""


def resolve_model_config(config, tokenizer) -> transformer.TransformerConfig:
  """Model config from `config.model`, `config.lora` and `config.quant`.

  An unset `vocab_size` follows the tokenizer, rounded up to a multiple of
  64 so the vocab axis shards evenly; runs that load Hugging Face weights
  (`init='hf:...'`) keep the preset's vocabulary.
  """
  d = config.model.to_dict()
  if config.init.startswith("hf:") and not d.get("preset"):
    from jft.interop import hf

    d = hf.model_config_dict(config.init[3:], d)  # shape from config.json
  if d.get("vocab_size") is None and not config.init.startswith("hf:"):
    d["vocab_size"] = -(-tokenizer.vocab_size // 64) * 64
  lo, qu = config.lora, config.quant
  if lo.rank > 0:
    d.update(
      lora_rank=lo.rank,
      lora_alpha=lo.alpha,
      lora_dropout=lo.dropout,
      lora_rslora=lo.rslora,
      lora_targets=lora.resolve_targets(lo.targets),
    )
  if qu.kind:
    if qu.kind not in quant.KINDS:
      raise ValueError(
        f"config.quant.kind: unknown {qu.kind!r}; expected '' or one of "
        f"{quant.KINDS}"
      )
    d.update(
      quant_kind=qu.kind,
      quant_table=tuple(tuple(r) for r in qu.table),
      quant_block_size=qu.block_size,
      quant_double=qu.double_quant,
    )
  cfg = transformer.config_from_dict(d)
  if cfg.vocab_size < tokenizer.vocab_size:
    raise ValueError(
      f"config.model.vocab_size={cfg.vocab_size} is smaller than the "
      f"tokenizer's vocabulary ({tokenizer.vocab_size})"
    )
  return cfg


def freeze_table(config):
  """`config.freeze`, or the automatic table when it is empty."""
  if config.freeze:
    return tuple(tuple(r) for r in config.freeze)
  if config.lora.rank > 0:
    return lora.ADAPTER_FREEZE
  return ((".*", "trainable"),)


def make_apply_fn(model: nn.Module):
  def apply_fn(
    params, inputs, positions, segment_ids, *, rng=None, train=False, **kwargs
  ):
    rngs = {"dropout": rng} if (train and rng is not None) else {}
    return model.apply(
      {"params": params},
      inputs,
      positions,
      segment_ids,
      deterministic=not train,
      rngs=rngs,
      **kwargs,
    )

  return apply_fn


def _shard_eval(batches: list[dict], pad_id: int) -> list[dict]:
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


def _load_init(config, base_cfg, mesh) -> dict:
  """Float base params from `config.init` (adapters merged, 4-bit undone)."""
  init = config.init
  if init.startswith("hf:"):
    from jft.interop import hf

    return hf.load_params(init[3:], base_cfg)
  params = checkpoint.load_params(init, mesh)
  with open(os.path.join(init, "config.json")) as f:
    saved = transformer.config_from_dict(json.load(f)["model"])
  if saved.lora_rank or saved.quant_kind:
    params = jax.tree.map(np.asarray, lora.merge(params, saved))
  return params


def _check_tree(params, boxed, what: str) -> None:
  """Same paths, shapes and dtypes as the model expects, or a named error."""
  expect = flat_paths(nn.unbox(boxed))
  got = flat_paths(params)
  missing, extra = (
    sorted(set(expect) - set(got)),
    sorted(set(got) - set(expect)),
  )
  if missing or extra:
    raise ValueError(f"{what}: missing parameters {missing}, extra {extra}")
  for p, ref in expect.items():
    if tuple(got[p].shape) != tuple(ref.shape):
      raise ValueError(
        f"{what}: {p} has shape {tuple(got[p].shape)}, the model expects "
        f"{tuple(ref.shape)}"
      )


def init_params(config, model_cfg, mesh, rules) -> dict:
  """Parameters placed with their shardings.

  A float base (random, or from `config.init`) is built first; then 4-bit
  kernels are made from it and fresh LoRA adapters added, so QLoRA always
  quantizes real weights and every technique starts from the same base.
  """
  rng = jax.random.PRNGKey(config.seed)
  dummy = jnp.zeros((1, 8), jnp.int32)
  full, base = (
    transformer.Transformer(model_cfg),
    transformer.Transformer(lora.base_config(model_cfg)),
  )
  boxed_full = jax.eval_shape(lambda r: full.init(r, dummy)["params"], rng)
  boxed_base = jax.eval_shape(lambda r: base.init(r, dummy)["params"], rng)
  shard_full = flat_paths(sharding.param_shardings(boxed_full, mesh, rules))
  shard_base = sharding.param_shardings(boxed_base, mesh, rules)

  if not config.init:
    params = jax.jit(
      lambda r: nn.unbox(base.init(r, dummy)["params"]),
      out_shardings=shard_base,
    )(rng)
  else:
    loaded = _load_init(config, lora.base_config(model_cfg), mesh)
    _check_tree(loaded, boxed_base, f"config.init={config.init!r}")
    dtypes = jax.tree.map(lambda x: x.dtype, nn.unbox(boxed_base))
    params = jax.tree.map(
      lambda x, dt, s: jax.device_put(np.asarray(x).astype(dt), s),
      loaded,
      dtypes,
      shard_base,
    )
  if model_cfg.quant_kind:
    kernels = set(lora.check_quant_table(model_cfg.quant_table, params))
    out_sh = {p: s for p, s in shard_full.items() if "/lora_" not in p}
    params = jax.jit(
      lambda p: quant.quantize_params(
        p,
        kernels,
        kind=model_cfg.quant_kind,
        block_size=model_cfg.quant_block_size,
        double_quant=model_cfg.quant_double,
      ),
      out_shardings=traverse_util.unflatten_dict(out_sh, sep="/"),
    )(params)
  if model_cfg.lora_rank:
    lora.check_targets(model_cfg.lora_targets, params)
    ad_sh = {p: s for p, s in shard_full.items() if "/lora_" in p}
    adapters = jax.jit(
      lambda r: lora.adapters(nn.unbox(full.init(r, dummy)["params"])),
      out_shardings=traverse_util.unflatten_dict(ad_sh, sep="/"),
    )(jax.random.fold_in(rng, 1))
    params = merge_params(params, adapters)
  _check_tree(params, boxed_full, "model parameters")
  return params


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
  if config.init.startswith("run:"):  # train (or reuse) the earlier stage
    stage_dir = stages.ensure_stage(config.init[4:], config)
    config = config.copy_and_resolve_references()
    config.init = stage_dir

  # Mesh.
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config.mesh)

  # Data.
  objective_cls = objectives.get(config.objective)
  train_spec, eval_spec = sources.data_files(
    config, workdir, getattr(objective_cls, "builtin_split", "pretrain")
  )
  tokenizer = sources.load_tokenizer(config, workdir, train_spec)
  objective = objective_cls(config, tokenizer)
  n_proc = jax.process_count()
  if config.batch_size % n_proc:
    raise ValueError(
      f"config.batch_size={config.batch_size} is not divisible by the "
      f"{n_proc} processes"
    )

  # Model and parameters.
  model_cfg = resolve_model_config(config, tokenizer)
  model = transformer.Transformer(model_cfg)
  if primary:
    resolved = config.to_dict()
    resolved["model"] = {"preset": config.model.preset, **vars(model_cfg)}
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(resolved, f, indent=2, default=str)
    logging.info("model: %s", model_cfg)
  params = init_params(config, model_cfg, mesh, rules)
  apply_fn = make_apply_fn(model)

  # Examples (after the model: some data is made with it, e.g. DPO's
  # on-policy pairs).
  train_spec, eval_spec = objective.prepare_data(
    train_spec, eval_spec, workdir=workdir, apply_fn=apply_fn, params=params
  )
  train_examples = objective.make_examples(
    pipeline.read_jsonl_files(train_spec, objective.fields)
  )
  eval_examples = []
  if eval_spec:
    eval_records = pipeline.read_jsonl_files(eval_spec, objective.fields)
    eval_examples = objective.make_examples(eval_records, split="eval")
    objective.eval_setup(eval_records)

  # Objective passes over the data with the initial params (e.g. DPO's
  # reference log-probs), then the input pipelines.
  train_examples = objective.precompute(
    train_examples, apply_fn, params, _batch_runner(mesh)
  )
  eval_examples = (
    objective.precompute(eval_examples, apply_fn, params, _batch_runner(mesh))
    if eval_examples
    else []
  )
  packing = (
    config.data.packing if objective.packing is None else (objective.packing)
  )
  train_iter = pipeline.make_train_iter(
    train_examples,
    seq_len=config.seq_len,
    batch_size=config.batch_size // n_proc,
    seed=config.seed,
    pad_id=tokenizer.pad_id,
    shuffle=config.data.shuffle,
    num_epochs=config.data.num_epochs,
    shard_index=jax.process_index(),
    shard_count=n_proc,
    packing=packing,
  )
  eval_batches = []
  if eval_examples:
    eval_batches = _shard_eval(
      pipeline.make_eval_batches(
        eval_examples,
        seq_len=config.seq_len,
        batch_size=config.eval_batch_size,
        pad_id=tokenizer.pad_id,
        packing=packing,
      ),
      tokenizer.pad_id,
    )

  trainable, frozen = split_params(params, freeze_table(config))
  for path, leaf in flat_paths(trainable).items():
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      raise ValueError(
        f"config.freeze: {path} ({leaf.dtype}) cannot be trained; freeze it"
      )
  ref = objective.reference_params(params)
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
    if not eval_batches:
      return {}
    sums = None
    params = state.params
    for b in eval_batches:
      out = p_eval_step(params, state.ref, sharding.global_batch(b, mesh))
      sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    sums = jax.device_get(sums)
    res = {
      f"eval/{k}": float(s) / max(float(w), 1e-12) for k, (s, w) in sums.items()
    }
    if objective.token_loss:
      res["eval/perplexity"] = math.exp(min(res["eval/loss"], 80.0))
    res.update(objective.host_eval(apply_fn, params))
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
    first.update(getattr(objective, "data_stats", {}))
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
      local = next(train_iter)
      tokens += int(np.sum(local["weights"] > 0))
      state, m = p_train_step(state, sharding.global_batch(local, mesh))
      s = step + 1
      if pending is not None:  # one step behind: keeps dispatch async
        check_finite(*pending)
      pending = (s, m)
      out = {}
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
    export(config, workdir, state, model_cfg, primary)
  if primary and int(state.step) >= config.total_steps:
    report = objective.summary(*metrics.first_and_last(writer.path))
    if report:
      print(report)
      with open(os.path.join(workdir, "summary.md"), "w") as f:
        f.write(report + "\n")
  return last


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


def export(config, workdir: str, state, model_cfg, primary: bool) -> None:
  """End-of-run artefacts: LoRA adapters alone and/or the merged model.

  Every process takes part in gathering sharded params; process 0 writes.
  """
  if not (
    model_cfg.lora_rank
    and (config.lora.save_adapters or (config.lora.save_merged))
  ):
    return
  params = sharding.to_host(state.params)
  if not primary:
    return
  if config.lora.save_adapters:
    lora.save_adapters(os.path.join(workdir, "adapters"), params, model_cfg)
    print(f"adapters: {os.path.join(workdir, 'adapters')}")
  if config.lora.save_merged:
    from jft.interop import hf

    merged = lora.merge(params, model_cfg)
    out = os.path.join(workdir, "merged")
    hf.save_params(out, merged, lora.base_config(model_cfg), overwrite=True)
    print(f"merged model: {out}")
