"""Which modules carry LoRA: HF module names, PEFT's matching, jft regexes.

`module_table` maps every HF Linear module a LoRA adapter can sit on to its
jft module path; `selected_modules` mirrors PEFT 0.21's rules for which
modules a `target_modules` config selects (`check_target_module_exists`:
a string is a full-match regex; list entries match a module named exactly
so or ending in '.' + entry, then `layers_to_transform` filters by layer
index unless the entry was a full name); `target_modules` and
`targets_regex` encode a set of modules exactly for PEFT and for
`PeftOptions.lora_targets`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from jft.interop.hf import weights

LM_HEAD = "lm_head"
EMBED = "model.embed_tokens"


class Target(NamedTuple):
  """Where an HF Linear module lives in jft."""

  path: str  # jft module path: 'layers/attn/q', 'layers_3/attn/q', 'lm_head'
  layer: int | None  # its decoder layer (None: the LM head)
  stacked: bool  # its leaves carry a leading [L] axis (scanned layers)
  shape: tuple[int, int]  # the HF weight [out, in]


def module_table(cfg) -> dict[str, Target]:
  """HF module name -> Target, for every Linear LoRA can adapt, in order."""
  specs = weights.tensor_specs(cfg)
  out = {}
  for i in range(cfg.n_layers):
    prefix = "layers" if cfg.scan_layers else f"layers_{i}"
    for jft_mod, hf_mod in weights.LINEAR_MODULES.items():
      name = f"model.layers.{i}.{hf_mod}"
      shape = specs[f"{name}.weight"].hf_shape
      out[name] = Target(f"{prefix}/{jft_mod}", i, cfg.scan_layers, shape)
  if "lm_head.weight" in specs:  # untied, and not a reward model's score
    out[LM_HEAD] = Target(
      LM_HEAD, None, False, specs["lm_head.weight"].hf_shape
    )
  return out


def _layer_index(key: str, pattern) -> int | None:
  """The layer index PEFT reads off a module name (`layers_to_transform`)."""
  if not pattern:
    m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
  else:
    m = None
    for p in [pattern] if isinstance(pattern, str) else pattern:
      m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
      if m:
        break
  return int(m["idx"]) if m else None


def _selects(config: Mapping, key: str) -> bool:
  """PEFT 0.21's `check_target_module_exists`, for the fields jft reads."""
  exclude = config.get("exclude_modules")
  if exclude:
    if isinstance(exclude, str):
      if re.fullmatch(exclude, key):
        return False
    elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
      return False
  targets = config["target_modules"]
  if isinstance(targets, str):
    return bool(re.fullmatch(targets, key))
  if key in targets:  # a full name: layers_to_transform does not apply
    return True
  if not any(key.endswith(f".{t}") for t in targets):
    return False
  layers = config.get("layers_to_transform")
  if layers is None or layers == []:
    return True
  idx = _layer_index(key, config.get("layers_pattern"))
  if idx is None:
    return False
  return idx == layers if isinstance(layers, int) else idx in layers


def selected_modules(config: Mapping, cfg) -> list[str]:
  """The HF modules PEFT puts LoRA on for `config`, in table order.

  Candidates are the model's Linear modules plus the embedding (and a tied
  LM head), so a config that targets those fails loudly instead of being
  read as a smaller adapter.
  """
  names = list(module_table(cfg))
  targets = config["target_modules"]
  if isinstance(targets, str) and targets.lower() == "all-linear":
    # PEFT expands it to every Linear but the output layer, as full names.
    config = {**config, "target_modules": [n for n in names if n != LM_HEAD]}
  extra = [EMBED] + ([LM_HEAD] if cfg.tie_embeddings else [])
  return [n for n in names + extra if _selects(config, n)]


def target_modules(names: Iterable[str], cfg) -> list[str]:
  """`target_modules` under which PEFT adapts exactly `names`.

  Short names (`q_proj`) when every layer adapts the same set, else the full
  module names (`model.layers.1.self_attn.q_proj`), as PEFT itself saves an
  'all-linear' config; `lm_head` by its own name. PEFT selects a module when
  its name equals an entry or ends with '.' + entry, so both are exact.
  """
  names = set(names)
  table = module_table(cfg)
  sets = layer_sets(names, cfg)
  if all(s == sets[0] for s in sets):
    out = [h.rsplit(".", 1)[-1] for h in sets[0]]
  else:
    out = [n for n in table if n in names and n != LM_HEAD]
  return out + ([LM_HEAD] if LM_HEAD in names else [])


def layer_sets(names: set[str], cfg) -> list[tuple[str, ...]]:
  """Per layer, the HF module suffixes (`self_attn.q_proj`) in `names`."""
  return [
    tuple(
      hf_mod
      for hf_mod in weights.LINEAR_MODULES.values()
      if f"model.layers.{i}.{hf_mod}" in names
    )
    for i in range(cfg.n_layers)
  ]


def targets_regex(paths: Iterable[str]) -> str:
  """An exact `lora_targets` regex: it fully matches `paths` and no other.

  Layers sharing a module set are grouped, e.g. `layers/(?:attn/q|attn/v)|
  lm_head` or `layers_(?:0|2)/mlp/down|layers_1/attn/q`.
  """

  def alt(xs):
    xs = [re.escape(x) for x in xs]
    return xs[0] if len(xs) == 1 else "(?:" + "|".join(xs) + ")"

  heads: dict[str, list[str]] = {}
  for p in dict.fromkeys(paths):
    head, _, rest = p.partition("/")
    heads.setdefault(head, []).append(rest)
  groups: dict[tuple[str, ...], list[str]] = {}
  for head, rests in heads.items():
    groups.setdefault(tuple(rests), []).append(head)
  return "|".join(
    alt(hs) if rests == ("",) else f"{alt(hs)}/{alt(rests)}"
    for rests, hs in groups.items()
  )
