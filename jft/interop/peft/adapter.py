"""PEFT adapter directories: write from and read into jft LoRA leaves.

See the package docstring for the format; `targets` decides which modules.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Mapping

import jax
import numpy as np
import safetensors.numpy
from safetensors import safe_open

from jft.interop.hf import weights, writer
from jft.interop.peft.targets import (
  EMBED,
  Target,
  layer_sets,
  module_table,
  selected_modules,
  target_modules,
  targets_regex,
)
from jft.peft.options import PeftOptions

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
PREFIX = "base_model.model."  # PeftModelForCausalLM -> LoraModel -> model
_LEAVES = {"lora_a": "A", "lora_b": "B"}

# Tensor names after PREFIX. LoRA: module, A|B, optional adapter name (the
# in-memory `.default` infix some exporters keep); full embedding weights.
_FULL = re.compile(r"(model\.embed_tokens|lm_head)(\.base_layer)?\.weight")
_KEY = re.compile(
  r"(?P<module>.+?)\.lora_(?P<ab>[AB])(?:\.(?P<name>[^.]+))?\.weight"
)

# adapter_config.json fields this module interprets.
_READ = set(
  "peft_type task_type r lora_alpha lora_dropout use_rslora target_modules "
  "exclude_modules layers_to_transform layers_pattern rank_pattern "
  "alpha_pattern bias fan_in_fan_out init_lora_weights".split()
)
# Metadata and init-only settings: they never change a loaded adapter.
_INERT = set(
  "auto_mapping peft_version base_model_name_or_path revision inference_mode "
  "megatron_core qalora_group_size loftq_config eva_config corda_config "
  "lora_ga_config runtime_config ensure_weight_tying".split()
)
# Every other field must be unset; why the common ones cannot be read.
_WHY = {
  "use_dora": "DoRA's magnitude vector has no jft counterpart",
  "lora_bias": "jft's lora_B has no bias",
  "modules_to_save": "fully trained module copies are not LoRA adapters",
  "trainable_token_indices": "trained embedding rows are not supported",
  "target_parameters": "LoRA on raw parameters is not supported",
  "layer_replication": "replicated layers are not supported",
  "alora_invocation_tokens": "activated LoRA is not supported",
  "use_qalora": "QA-LoRA pooling is not supported",
  "megatron_config": "Megatron-parallel layers are not supported",
}
# init_lora_weights values that leave the base weights alone.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


# ----------------------------------------------------------------- write


def adapter_pairs(params: Mapping, cfg) -> dict[str, tuple[np.ndarray, ...]]:
  """HF module name -> (A [r, in], B [out, r]) from the LoRA leaves present.

  Stacked [L, ...] leaves are split per layer; the leaves must be exactly
  the modules `cfg.peft` adapts, at its rank.
  """
  table = module_table(cfg)
  by_path: dict[str, list[str]] = {}
  for name, t in table.items():
    by_path.setdefault(t.path, []).append(name)
  flat = {
    p: v
    for p, v in writer.flat_params(params).items()
    if p.rsplit("/", 1)[-1] in _LEAVES
  }
  if not flat:
    raise ValueError("params hold no LoRA leaves (lora_a / lora_b)")
  leaves: dict[str, dict[str, np.ndarray]] = {}
  for path, v in flat.items():
    module, leaf = path.rsplit("/", 1)
    if module not in by_path:
      raise ValueError(
        f"LoRA leaf {path!r} is on no Linear PEFT can name; Linear modules: "
        f"{sorted(by_path)}"
      )
    arr = np.asarray(jax.device_get(v), np.float32)
    for name in by_path[module]:
      t = table[name]
      leaves.setdefault(name, {})[_LEAVES[leaf]] = (
        arr[t.layer] if t.stacked else arr
      )
  pairs = {}
  for name in table:
    have, want = name in leaves, cfg.peft.lora_on(table[name].path)
    if have != want:
      raise ValueError(
        f"params {'have' if have else 'lack'} LoRA on {table[name].path!r}, "
        f"but cfg.peft.lora_targets={cfg.peft.lora_targets!r} says "
        f"{'no' if have else 'yes'}"
      )
    if have:
      ab = leaves[name]
      if set(ab) != {"A", "B"}:
        raise ValueError(f"{table[name].path!r} has only lora_{set(ab)}")
      pairs[name] = (ab["A"].T, ab["B"].T)
  _check_pairs(pairs, table, cfg.peft.lora_rank, "params")
  return pairs


def _check_pairs(pairs, table, rank: int, where: str) -> None:
  """A [rank, in] and B [out, rank] against the model's Linear shapes."""
  for name, (a, b) in pairs.items():
    out, inp = table[name].shape
    if a.shape != (rank, inp) or b.shape != (out, rank):
      raise ValueError(
        f"{where}: {name} has lora_A {a.shape} / lora_B {b.shape}; the model "
        f"config expects [{rank}, {inp}] / [{out}, {rank}]"
      )


def adapter_config(names: Iterable[str], cfg, base_model: str = "") -> dict:
  """adapter_config.json for LoRA on the HF modules `names`."""
  names = set(names)
  p = cfg.peft
  alpha = p.lora_alpha
  config = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "r": p.lora_rank,
    "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
    "lora_dropout": p.lora_dropout,
    "use_rslora": p.lora_rslora,
    "target_modules": target_modules(names, cfg),
    "bias": "none",
    "fan_in_fan_out": False,
    "init_lora_weights": True,
    "base_model_name_or_path": base_model or None,
    "inference_mode": True,
  }
  if selected_modules(config, cfg) != [
    n for n in module_table(cfg) if n in names
  ]:
    raise AssertionError(f"target_modules does not round-trip: {config}")
  return config


def save_adapter(
  directory: str,
  params: Mapping,
  cfg,
  base_model: str = "",
  *,
  overwrite: bool = True,
) -> str:
  """Writes the LoRA leaves of `params` as a PEFT adapter directory.

  `params` is a full or adapters-only tree of the model `cfg` describes;
  `base_model` goes to `base_model_name_or_path` (what
  `AutoPeftModelForCausalLM` loads: a Hub id or a local HF directory).
  Written to a temporary directory and renamed, so a crash never leaves a
  complete-looking half adapter; an existing directory is replaced unless
  `overwrite=False`.
  """
  if cfg.head == "score":
    raise ValueError(
      "a reward model (head 'score') trains its score head next to the "
      "LoRA adapters, and jft's PEFT adapters hold LoRA only (no "
      "modules_to_save); set config.lora.save_adapters=False and "
      "config.lora.save_merged=True to export the merged model"
    )
  pairs = adapter_pairs(params, cfg)
  tensors = {
    f"{PREFIX}{name}.lora_{ab}.weight": np.ascontiguousarray(x)
    for name, pair in pairs.items()
    for ab, x in zip("AB", pair, strict=True)
  }
  config = adapter_config(pairs, cfg, base_model)

  def write(tmp):
    safetensors.numpy.save_file(
      tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"}
    )
    with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as fh:
      json.dump(config, fh, indent=2)

  writer.write_dir_atomic(directory, write, overwrite=overwrite)
  return directory


# ----------------------------------------------------------------- read


def _checked_config(directory: str) -> dict:
  """adapter_config.json, checked: plain LoRA for a causal LM, or an error
  naming the file and the field."""
  file = os.path.join(directory, CONFIG_FILE)
  if not os.path.exists(file):
    raise FileNotFoundError(f"no {CONFIG_FILE} in {directory!r}")
  with open(file, encoding="utf-8") as fh:
    try:
      config = json.load(fh)
    except json.JSONDecodeError as e:
      raise ValueError(f"{file}: not valid JSON ({e})") from None

  def bad(field, why):
    return ValueError(f"{file}: {field}={config.get(field)!r}: {why}")

  if config.get("peft_type") != "LORA":
    raise bad("peft_type", "only LORA adapters are read")
  if config.get("task_type") not in ("CAUSAL_LM", None):
    raise bad("task_type", "only CAUSAL_LM adapters are read")
  if config.get("bias", "none") != "none":
    raise bad("bias", "trained biases are not supported; only 'none'")
  if config.get("fan_in_fan_out"):
    raise bad("fan_in_fan_out", "only nn.Linear ([out, in]) layouts are read")
  if config.get("init_lora_weights", True) not in _PLAIN_INITS:
    raise bad(
      "init_lora_weights",
      "this init changes the base weights; re-save the adapter with PEFT's "
      "path_initial_model_for_weight_conversion to get plain LoRA",
    )
  for field, value in config.items():
    if field not in _READ | _INERT and value:  # set: it would matter
      raise bad(field, _WHY.get(field, "not supported by jft's LoRA"))
  r = config.get("r")
  if not isinstance(r, int) or r <= 0:
    raise bad("r", "must be a positive int")
  if not isinstance(config.get("lora_alpha"), int | float):
    raise bad("lora_alpha", "must be a number")
  targets = config.get("target_modules")
  if not targets or not isinstance(targets, str | list):
    raise bad("target_modules", "must be a non-empty list or regex string")
  return config


def _read_tensors(directory: str) -> dict[str, np.ndarray]:
  file = os.path.join(directory, WEIGHTS_FILE)
  if not os.path.exists(file):
    pickle = os.path.join(directory, PICKLE_FILE)
    if os.path.exists(pickle):
      raise ValueError(
        f"{pickle}: torch pickles are not read (loading one can run "
        "arbitrary code); re-save the adapter as safetensors (PEFT's "
        "save_pretrained does by default)"
      )
    raise FileNotFoundError(f"no {WEIGHTS_FILE} in {directory!r}")
  try:
    with safe_open(file, framework="numpy") as fh:
      return {k: fh.get_tensor(k) for k in fh.keys()}
  except Exception as e:  # safetensors raises its own error types
    raise ValueError(f"{file}: not a readable safetensors file ({e})") from None


def _split_tensors(tensors: Mapping, file: str) -> tuple[dict, dict]:
  """(HF module -> (A, B) float32, HF weight name -> full weight) by name.

  Full weights are the embedding / LM-head copies PEFT saves next to the
  adapter (`save_embedding_layers`, automatic when lm_head is a target).
  """
  found: dict[str, dict[str, np.ndarray]] = {}
  full, names, unknown = {}, set(), []
  for key, value in tensors.items():
    short = key.removeprefix(PREFIX)
    m = _KEY.fullmatch(short)
    if key.startswith(PREFIX) and _FULL.fullmatch(short):
      full[short.replace(".base_layer", "")] = value
    elif not key.startswith(PREFIX) or not m:
      unknown.append(key)
    else:
      names.add(m["name"])
      ab = found.setdefault(m["module"], {})
      if m["ab"] in ab:
        raise ValueError(
          f"{file}: two lora_{m['ab']} tensors for {m['module']}"
        )
      ab[m["ab"]] = np.asarray(value, np.float32)
  if unknown:
    embed = [k for k in unknown if "lora_embedding" in k]
    why = "LoRA on embeddings is not supported" if embed else "not LoRA A/B"
    raise ValueError(f"{file}: unexpected tensors {sorted(unknown)[:6]}: {why}")
  if len(names - {None}) > 1:
    raise ValueError(f"{file}: holds several adapters {sorted(names - {None})}")
  for module, ab in found.items():
    if set(ab) != {"A", "B"}:
      raise ValueError(f"{file}: {module} has lora_{set(ab)} only")
  return {m: (ab["A"], ab["B"]) for m, ab in found.items()}, full


def _full_leaves(full: Mapping, cfg, file: str) -> dict[str, np.ndarray]:
  """jft base leaves replaced by saved embedding / LM-head weights."""
  specs = weights.tensor_specs(cfg)
  out = {}
  for name, value in full.items():
    embed = full.get(f"{EMBED}.weight")
    if name == "lm_head.weight" and cfg.tie_embeddings and embed is not None:
      if np.array_equal(value, embed):
        continue  # the tied copy
    if name not in specs:
      raise ValueError(
        f"{file}: has {name!r}, which this model (tied embeddings: "
        f"{cfg.tie_embeddings}) has no place for"
      )
    spec = specs[name]
    if tuple(value.shape) != spec.hf_shape:
      raise ValueError(
        f"{file}: {name} has shape {tuple(value.shape)}; the model config "
        f"expects {spec.hf_shape} (a resized vocabulary?)"
      )
    value = value.T if spec.transpose else value
    out[spec.path] = np.ascontiguousarray(value.astype(cfg.weight_dtype))
  return out


def _one_value(config, field, pattern, names, file):
  """The single rank/alpha the patterns give every adapted module."""
  default = config[field]
  pats = config.get(pattern) or {}
  values = {}
  for name in names:
    key = next(
      (k for k in pats if re.match(rf"(.*\.)?({k})$", name)), None
    )  # PEFT's get_pattern_key: the first pattern matching a suffix
    values[name] = pats.get(key, default)
  if len(set(values.values())) > 1:
    raise ValueError(
      f"{file}: {pattern}={pats!r} gives the adapted modules different "
      f"{field} values {sorted(set(values.values()))}; jft's LoRA has one"
    )
  return next(iter(values.values()))


def read_adapter_config(directory: str, cfg) -> tuple[PeftOptions, dict]:
  """The options an adapter directory's config gives the model `cfg`.

  Reads only adapter_config.json (cheap: for building the model config).
  Returns `(options, config)`: `cfg.peft` with the adapter's rank, alpha,
  dropout, rsLoRA flag and an exact `lora_targets` regex (other fields,
  e.g. 4-bit settings, kept), and the checked JSON. Scanned layers share
  one module set, so a per-layer adapter needs `scan_layers=False`.
  """
  config = _checked_config(directory)
  file = os.path.join(directory, CONFIG_FILE)
  table = module_table(cfg)
  wanted = selected_modules(config, cfg)
  targets = f"target_modules={config['target_modules']!r}"
  if EMBED in wanted:
    raise ValueError(
      f"{file}: {targets} selects {EMBED}: LoRA on embeddings is not supported"
    )
  if any(n not in table for n in wanted):
    raise ValueError(
      f"{file}: {targets} selects lm_head, which this model ties to the "
      "embeddings: jft has no separate LM head to adapt"
    )
  if not wanted:
    raise ValueError(
      f"{file}: {targets} selects no Linear module of this model (e.g. "
      f"{next(iter(table))})"
    )
  sets = layer_sets(set(wanted), cfg)
  if cfg.scan_layers and any(s != sets[0] for s in sets):
    per = "; ".join(f"layer {i}: {list(s)}" for i, s in enumerate(sets))
    raise ValueError(
      f"{file}: the adapter covers different modules per layer ({per}); "
      "scanned layers share one set: load it with scan_layers=False "
      "(config.model.scan_layers=False)"
    )
  options = dataclasses.replace(
    cfg.peft,
    lora_rank=_one_value(config, "r", "rank_pattern", wanted, file),
    lora_alpha=float(
      _one_value(config, "lora_alpha", "alpha_pattern", wanted, file)
    ),
    lora_dropout=float(config.get("lora_dropout") or 0.0),
    lora_rslora=bool(config.get("use_rslora")),
    lora_targets=targets_regex(table[n].path for n in wanted),
  )
  return options, config


def load_adapter(directory: str, cfg) -> tuple[PeftOptions, dict]:
  """Reads a PEFT LoRA adapter directory for the model `cfg` describes.

  Returns `(options, leaves)`: options as `read_adapter_config` gives them
  and a flat dict jft path -> float32 array (`layers/attn/q/lora_a`
  [L, in, r] scanned, `layers_3/attn/q/lora_a` [in, r] not). Use
  `dataclasses.replace(cfg, peft=options)` for the model and `base | leaves`
  for its params: embedding / LM-head weights PEFT saved with the adapter
  (it does whenever lm_head is a target) come back as `embed/embedding` /
  `lm_head/kernel` (in `cfg.param_dtype`) and replace the base's, as PEFT's
  loader does.
  """
  options, config = read_adapter_config(directory, cfg)
  table = module_table(cfg)
  wanted = selected_modules(config, cfg)
  file = os.path.join(directory, WEIGHTS_FILE)
  pairs, full = _split_tensors(_read_tensors(directory), file)
  extra = sorted(set(pairs) - set(wanted))
  if extra:
    raise ValueError(
      f"{file}: has LoRA for {extra[:6]}, which target_modules="
      f"{config['target_modules']!r} in {CONFIG_FILE} does not select"
    )
  missing = [n for n in wanted if n not in pairs]
  if missing:
    raise ValueError(
      f"{file}: lacks lora_A/lora_B for {missing[:6]}, which {CONFIG_FILE} "
      "selects"
    )
  _check_pairs(pairs, table, options.lora_rank, file)
  return options, _jft_leaves(pairs, table) | _full_leaves(full, cfg, file)


def _jft_leaves(pairs: Mapping, table: Mapping[str, Target]) -> dict:
  """Flat jft path -> [in, r] / [r, out] leaves, stacked per scanned path."""
  parts: dict[str, list] = {}
  for name in table:
    if name in pairs:
      a, b = pairs[name]
      parts.setdefault(table[name].path, []).append((table[name], a.T, b.T))
  out = {}
  for path, items in parts.items():
    for k, leaf in ((1, "lora_a"), (2, "lora_b")):
      arrs = [it[k] for it in items]
      out[f"{path}/{leaf}"] = np.stack(arrs) if items[0][0].stacked else arrs[0]
  return out
