"""jft's train step on a Llama-shaped model, built from its own pieces as
`jft/train.py` builds it; imports jft (JAX) only, never PyTorch.

Used by bench/compare.py (side by side with PyTorch) and bench/memory.py
(each system in its own process, so its peak RSS is its own).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_util import DPO_BETA, LORA_ALPHA, LORA_RANK, LR, Shape  # noqa: E402

from jft import config as base_config  # noqa: E402
from jft import init, objectives, optim, sharding, steps, train  # noqa: E402
from jft.models import transformer  # noqa: E402
from jft.peft import options as peft_options  # noqa: E402
from jft.state import TrainState, split_params  # noqa: E402


def jft_config(workload: str):
  """The run config the workload's jft step is built from."""
  c = base_config.base_config()
  c.objective = "dpo" if workload == "dpo" else "clm"
  c.optimizer.lr = LR
  c.sft.template = "table"  # DPO without a tokenizer: no chat template
  c.dpo.beta = DPO_BETA
  if workload == "lora":
    c.lora.rank = LORA_RANK
    c.lora.alpha = LORA_ALPHA
    c.lora.targets = "all-linear"  # q, k, v, o, gate, up, down
  return c


def jft_batch(workload: str, shape: Shape, rng: np.random.Generator):
  """One batch in the pipeline's format (DPO: `pair_example`'s fields)."""
  b, t, v = shape.batch, shape.seq, shape.vocab_size
  positions = np.tile(np.arange(t, dtype=np.int32), (b, 1))  # [B, T]
  batch = {"positions": positions, "segment_ids": np.ones((b, t), np.int32)}
  if workload != "dpo":
    ids = rng.integers(0, v, (b, t + 1)).astype(np.int32)  # [B, T + 1]
    batch["inputs"], batch["targets"] = ids[:, :-1], ids[:, 1:]  # [B, T]
    batch["weights"] = np.ones((b, t), np.float32)  # [B, T]
    return batch
  prompt = rng.integers(0, v, (b, shape.prompt))  # [B, P]
  # Targets from the last prompt position on are completion tokens.
  w = (np.arange(t) >= shape.prompt - 1).astype(np.float32)  # [T]
  for pre in ("", "rej_"):
    comp = rng.integers(0, v, (b, t + 1 - shape.prompt))  # [B, T + 1 - P]
    ids = np.concatenate([prompt, comp], axis=1).astype(np.int32)
    batch[pre + "inputs"] = ids[:, :-1]  # [B, T]
    batch[pre + "targets"] = ids[:, 1:]  # [B, T]
    batch[pre + "weights"] = np.tile(w, (b, 1))  # [B, T]
  batch["ref_c"] = np.zeros((b, t), np.float32)  # unused: a reference copy
  batch["ref_r"] = np.zeros((b, t), np.float32)
  return batch


def random_params(model: nn.Module, seed: int):
  """Params of the shapes and dtypes `model.init` makes, drawn with numpy:
  normal(0, 0.02) kernels and embeddings, unit norm scales, zero LoRA `B`
  (as PEFT starts). jft's own init costs an XLA compile of its RNG (seconds
  per model), and speed does not depend on the values."""
  shapes = nn.unbox(
    jax.eval_shape(
      model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)
    )["params"]
  )
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = jax.tree_util.keystr(path[-1:], simple=True)
    if name == "scale":
      x = np.ones(s.shape)
    elif name == "lora_b":
      x = np.zeros(s.shape)
    else:
      x = rng.normal(0.0, 0.02, s.shape)
    return jnp.asarray(x, s.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


class JftSystem:
  """jft's train step, built from its own pieces as `jft/train.py` does.

  `fast_compile`: XLA backend optimisation level 0 (smoke runs: compiles
  take half the time, the step is no longer representative).
  `overrides`: dotted run-config keys on top of the workload's
  (`quant.kind`; `model.*` go to the model config, e.g. `model.remat`).
  `jft_init`: parameters from `jft.init.init_params` (a random float base,
  4-bit kernels quantized from it, then adapters: what a run holds) rather
  than drawn with numpy in the final shapes (no init compile)."""

  name = "jft"

  def __init__(
    self,
    workload: str,
    dtype: str,
    shape: Shape,
    seed: int = 0,
    fast_compile: bool = False,
    overrides: dict | None = None,
    jft_init: bool = False,
  ):
    c = jft_config(workload)
    model_dict = {"preset": "ref-5M", "dtype": dtype, **shape.model_fields()}
    for key, value in (overrides or {}).items():
      *head, last = key.split(".")
      if head == ["model"]:
        model_dict[last] = value
        continue
      node = c
      for h in head:
        node = node[h]
      node[last] = value
    model_cfg = transformer.config_from_dict(model_dict)
    model_cfg = dataclasses.replace(
      model_cfg, peft=peft_options.from_run_config(c)
    )
    model = transformer.Transformer(model_cfg)
    if jft_init:
      c.seed = seed
      c.mesh.num_devices = 1
      mesh = sharding.make_mesh(c.mesh)
      rules = sharding.rules_from_config(c.mesh)
      params = init.init_params(c, model_cfg, mesh, rules)
    else:
      params = random_params(model, seed)
    trainable, frozen = split_params(params, train.freeze_table(c, model_cfg))
    objective = objectives.get(c.objective)(c, tokenizer=None)
    optimizer, schedule = optim.make_optimizer(
      c.optimizer, c.total_steps, trainable
    )
    state = TrainState(
      step=jnp.zeros((), jnp.int32),
      trainable=trainable,
      frozen=frozen,
      opt_state=optimizer.init(trainable),
      rng=jax.random.PRNGKey(seed + 1),
      ref=objective.reference_params(params, trainable),
    )
    step_fn = steps.make_train_step(
      objective, train.make_apply_fn(model), optimizer, schedule, 1
    )
    rng = np.random.default_rng(seed)
    self.batch = jax.device_put(jft_batch(workload, shape, rng))
    opts = {"xla_backend_optimization_level": 0} if fast_compile else None
    lowered = jax.jit(step_fn, donate_argnums=(0,)).lower(state, self.batch)
    self.compiled = lowered.compile(compiler_options=opts)
    self.state = state
    self.params_total = transformer.param_count(params)
    self.params_trainable = transformer.param_count(trainable)
    self.param_bytes = transformer.param_bytes(params)
    self.opt_bytes = transformer.param_bytes(state.opt_state)
    # XLA's plan for the step's temporaries (activations kept for the
    # backward pass among them): what `model.remat` changes.
    mem = self.compiled.memory_analysis()
    self.temp_bytes = getattr(mem, "temp_size_in_bytes", None)
    self.loss = math.nan

  def step(self) -> float:
    t0 = time.perf_counter()
    self.state, metrics = self.compiled(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))
    dt = time.perf_counter() - t0
    self.loss = float(metrics["train/loss"])
    return dt

  def close(self):
    pass
