"""LoRA: target selection, merge/unmerge, adapters-only trees.

Adapters live inside the model's `Linear` layers (`lora_a` [in, r],
`lora_b` [r, out], B = 0 at init so training starts at the base model). These
pure functions work on parameter trees: merge folds `scale * A @ B` into the
kernel (dequantizing a 4-bit base first), so a LoRA or QLoRA run exports a
plain float model; `zero_adapters` gives the base model's output through the
same forward (DPO's reference) without a second copy of the weights. The
PEFT adapter file format, both ways, is `jft.interop.peft`'s.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

import jax.numpy as jnp
from flax import traverse_util

from jft.errors import ConfigError
from jft.peft import options, quant
from jft.state import flat_paths


def unflatten(flat: dict) -> dict:
  return traverse_util.unflatten_dict(flat, sep="/")


ALIASES = options.ALIASES
resolve_targets = options.resolve_targets
LORA_LEAVES = ("lora_a", "lora_b")
# config.quant.table labels.
QUANT_LABELS = ("quantize", "float")
# Freeze table for adapter training: adapters train, and so do the new
# scalar heads of a reward model or PPO policy (PEFT's `modules_to_save`);
# everything else is frozen.
ADAPTER_FREEZE = (
  (r".*/lora_[ab]", "trainable"),
  (r"(score|value_head)/kernel", "trainable"),
  (".*", "frozen"),
)


def linear_paths(params: Mapping) -> list[str]:
  """Module paths of every Linear (`.../kernel` or `.../kernel_packed`)."""
  out = []
  for path in traverse_util.flatten_dict(dict(params), sep="/"):
    for suffix in ("/kernel", "/kernel_packed"):
      if path.endswith(suffix):
        out.append(path[: -len(suffix)])
  return sorted(out)


def check_targets(regex: str, base_params: Mapping) -> list[str]:
  """The module paths LoRA will adapt; an error lists them when none match."""
  paths = linear_paths(base_params)
  hit = [p for p in paths if re.fullmatch(regex, p)]
  if not hit:
    raise ConfigError(
      f"config.lora.targets={regex!r} matches no Linear layer; the "
      f"layers are: {paths}"
    )
  return hit


def adapters(params: Mapping) -> dict:
  """Only the LoRA leaves (what `jft.interop.peft.save_adapter` writes)."""
  return unflatten(
    {
      p: v
      for p, v in flat_paths(params).items()
      if p.rsplit("/", 1)[-1] in LORA_LEAVES
    }
  )


def zero_adapters(params: Mapping) -> dict:
  """Same tree with every `lora_b` zeroed: the frozen base's function."""
  return unflatten(
    {
      p: jnp.zeros_like(v) if p.endswith("/lora_b") else v
      for p, v in flat_paths(params).items()
    }
  )


def _delta(a, b, scale):
  return scale * jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32))


def _float_kernel(flat, module, cfg):
  if f"{module}/kernel" in flat:
    return flat[f"{module}/kernel"]
  q = {
    k[len(module) + len("/kernel_") :]: v
    for k, v in flat.items()
    if k.startswith(f"{module}/kernel_")
  }
  return quant.dequantize(
    q,
    kind=cfg.peft.quant_kind,
    block_size=cfg.peft.quant_block_size,
    dtype=jnp.float32,
  )


def merge(params: Mapping, cfg) -> dict:
  """Folds adapters into kernels: the plain float model's params.

  `cfg` is the TransformerConfig the params belong to. 4-bit kernels are
  dequantized (LoRA or not), so the result loads into
  `base_config(cfg)` and exports as an ordinary checkpoint.
  """
  scale = cfg.peft.lora_scale
  flat = flat_paths(params)
  modules = sorted(
    {
      p.rsplit("/", 1)[0]
      for p in flat
      if p.rsplit("/", 1)[-1].startswith(("kernel", "lora_"))
    }
  )
  out = {
    p: v
    for p, v in flat.items()
    if p.rsplit("/", 1)[-1] not in LORA_LEAVES
    and not p.rsplit("/", 1)[-1].startswith("kernel")
  }
  dtype = jnp.dtype(cfg.param_dtype)
  for m in modules:
    w = _float_kernel(flat, m, cfg).astype(jnp.float32)
    if f"{m}/lora_a" in flat:
      w = w + _delta(flat[f"{m}/lora_a"], flat[f"{m}/lora_b"], scale)
    out[f"{m}/kernel"] = w.astype(dtype)
  return unflatten(out)


def unmerge(merged: Mapping, adapter_tree: Mapping, cfg) -> dict:
  """Inverse of `merge` for a float base: kernel - scale * A @ B, + adapters."""
  scale = cfg.peft.lora_scale
  flat, ad = flat_paths(merged), flat_paths(adapter_tree)
  out = dict(flat)
  for p, a in ad.items():
    if p.endswith("/lora_a"):
      m = p[: -len("/lora_a")]
      w = flat[f"{m}/kernel"].astype(jnp.float32)
      out[f"{m}/kernel"] = (w - _delta(a, ad[f"{m}/lora_b"], scale)).astype(
        flat[f"{m}/kernel"].dtype
      )
  out.update(ad)
  return unflatten(out)


def base_config(cfg):
  """The plain float model `merge` produces: no adapters, no 4-bit."""
  return dataclasses.replace(cfg, peft=options.NONE)


def check_quant_table(
  table: Sequence[tuple[str, str]], base_params: Mapping
) -> list[str]:
  """Kernel paths the table quantizes; errors name unmatched/invalid leaves."""
  compiled = [(re.compile(rx), label) for rx, label in table]
  unmatched, bad, hit = [], [], []
  for path in flat_paths(base_params):
    label = next((lb for rx, lb in compiled if rx.fullmatch(path)), None)
    if label is None:
      unmatched.append(path)
    elif label not in QUANT_LABELS:
      bad.append(f"{path}: {label!r}")
    elif label == "quantize":
      if not path.endswith("/kernel"):
        bad.append(f"{path}: only Linear kernels can be quantized")
      else:
        hit.append(path)
  if unmatched:
    raise ConfigError(
      f"config.quant.table leaves parameter(s) unmatched: {unmatched}; "
      f"table: {list(table)}"
    )
  if bad:
    raise ConfigError(
      f"config.quant.table: labels must be 'quantize' or 'float': {bad}"
    )
  return hit
