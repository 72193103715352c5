"""LoRA: target selection, merge/unmerge, adapters-only trees.

Adapters live inside the model's `Linear` layers (`lora_a` [in, r],
`lora_b` [r, out], B = 0 at init so training starts at the base model). These
pure functions work on parameter trees: merge folds `scale * A @ B` into the
kernel (dequantizing a 4-bit base first), so a LoRA or QLoRA run exports a
plain float model; `zero_adapters` gives the base model's output through the
same forward (DPO's reference) without a second copy of the weights.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import traverse_util

from jft.peft import quant
from jft.state import flat_paths


def unflatten(flat: dict) -> dict:
  return traverse_util.unflatten_dict(flat, sep="/")


# Module-path regexes for the usual target sets (paths look like
# `layers/attn/q`, or `layers_3/mlp/up` when layers are not scanned).
ALIASES = {
  "all-linear": r"layers(_\d+)?/(attn/(q|k|v|o)|mlp/(gate|up|down))",
  "attention": r"layers(_\d+)?/attn/(q|k|v|o)",
  "mlp": r"layers(_\d+)?/mlp/(gate|up|down)",
  "qv": r"layers(_\d+)?/attn/(q|v)",
}
LORA_LEAVES = ("lora_a", "lora_b")
# Freeze table for adapter training: adapters train, everything else frozen.
ADAPTER_FREEZE = ((r".*/lora_[ab]", "trainable"), (".*", "frozen"))


def resolve_targets(targets: str) -> str:
  """An alias name or a regex over module paths."""
  return ALIASES.get(targets, targets)


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
    raise ValueError(
      f"config.lora.targets={regex!r} matches no Linear layer; the "
      f"layers are: {paths}"
    )
  return hit


def adapters(params: Mapping) -> dict:
  """Only the LoRA leaves (what `save_adapters` writes)."""
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
    kind=cfg.quant_kind,
    block_size=cfg.quant_block_size,
    dtype=jnp.float32,
  )


def merge(params: Mapping, cfg) -> dict:
  """Folds adapters into kernels: the plain float model's params.

  `cfg` is the TransformerConfig the params belong to. 4-bit kernels are
  dequantized (LoRA or not), so the result loads into
  `base_config(cfg)` and exports as an ordinary checkpoint.
  """
  from jft.models.layers import PeftOptions  # avoid a module cycle

  scale = PeftOptions(
    lora_rank=max(cfg.lora_rank, 1),
    lora_alpha=cfg.lora_alpha,
    lora_rslora=cfg.lora_rslora,
  ).lora_scale
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
  from jft.models.layers import PeftOptions

  scale = PeftOptions(
    lora_rank=cfg.lora_rank,
    lora_alpha=cfg.lora_alpha,
    lora_rslora=cfg.lora_rslora,
  ).lora_scale
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
  return dataclasses.replace(
    cfg, lora_rank=0, lora_targets="", quant_kind="", quant_table=()
  )


def peft_adapter_tensors(params: Mapping, cfg) -> dict[str, jax.Array]:
  """Adapters in Hugging Face PEFT's naming and layout (A [r,in], B [out,r]).

  Stacked (scanned) adapters are split per layer.
  """
  names = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
  }
  out = {}
  for path, v in flat_paths(adapters(params)).items():
    parts = path.split("/")
    leaf = {"lora_a": "lora_A", "lora_b": "lora_B"}[parts[-1]]
    if parts[0] == "lm_head":
      out[f"base_model.model.lm_head.{leaf}.weight"] = v.T
      continue
    mod = names[parts[-2]]

    def key(i, mod=mod, leaf=leaf):
      return f"base_model.model.model.layers.{i}.{mod}.{leaf}.weight"

    if parts[0] == "layers":  # scanned: [L, ...]
      for i in range(v.shape[0]):
        out[key(i)] = v[i].T
    else:
      out[key(int(parts[0].split("_")[1]))] = v.T
  return out


def peft_adapter_config(cfg, base_model: str = "") -> dict:
  """PEFT's adapter_config.json for `peft_adapter_tensors`."""
  mods = sorted(
    {
      m
      for m, rx in (
        ("q_proj", "attn/q"),
        ("k_proj", "attn/k"),
        ("v_proj", "attn/v"),
        ("o_proj", "attn/o"),
        ("gate_proj", "mlp/gate"),
        ("up_proj", "mlp/up"),
        ("down_proj", "mlp/down"),
      )
      if re.fullmatch(cfg.lora_targets, f"layers/{rx}")
    }
  )
  return {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "r": cfg.lora_rank,
    "lora_alpha": cfg.lora_alpha,
    "lora_dropout": cfg.lora_dropout,
    "use_rslora": cfg.lora_rslora,
    "target_modules": mods,
    "bias": "none",
    "base_model_name_or_path": base_model,
    "fan_in_fan_out": False,
  }


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
    elif label not in ("quantize", "float"):
      bad.append(f"{path}: {label!r}")
    elif label == "quantize":
      if not path.endswith("/kernel"):
        bad.append(f"{path}: only Linear kernels can be quantized")
      else:
        hit.append(path)
  if unmatched:
    raise ValueError(
      f"config.quant.table leaves parameter(s) unmatched: {unmatched}; "
      f"table: {list(table)}"
    )
  if bad:
    raise ValueError(
      f"config.quant.table: labels must be 'quantize' or 'float': {bad}"
    )
  return hit


def save_adapters(directory: str, params: Mapping, cfg) -> None:
  """Writes PEFT's `adapter_model.safetensors` + `adapter_config.json`.

  Written to a temporary folder and renamed, so a crash never leaves a
  half-written adapter folder that looks complete.
  """
  import json
  import os
  import shutil

  import numpy as np
  from safetensors.numpy import save_file

  tensors = {
    k: np.ascontiguousarray(np.asarray(v, np.float32))
    for k, v in peft_adapter_tensors(params, cfg).items()
  }
  tmp = directory.rstrip("/") + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"))
  with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
    json.dump(peft_adapter_config(cfg), f, indent=2)
  shutil.rmtree(directory, ignore_errors=True)
  os.replace(tmp, directory)
