"""Hugging Face PEFT LoRA adapter directories <-> jft adapter leaves.

A PEFT adapter directory is `adapter_config.json` plus
`adapter_model.safetensors` holding, per adapted HF module (`model.layers.3.
self_attn.q_proj`, `lm_head`), `base_model.model.<module>.lora_A.weight`
[r, in] and `.lora_B.weight` [out, r]. jft keeps `<module path>/lora_a`
[in, r] and `lora_b` [r, out], stacked [L, ...] under `layers/` when layers
are scanned. One table (`targets.module_table`) maps the names both ways.

Both directions are exact: which modules carry LoRA is decided as PEFT's
own loader decides it from `target_modules` (its rules are mirrored in
`targets.selected_modules`), so PEFT rebuilds the modules jft trained and
jft loads the modules PEFT trained. Read: plain LoRA on any subset of the
Linear layers and an untied LM head, one rank and alpha (`rank_pattern` /
`alpha_pattern` only where they resolve to that), rsLoRA,
`layers_to_transform`, `exclude_modules`. A setting that would change the
function some other way (DoRA, biases, embedding LoRA, `modules_to_save`,
a base-modifying init, ...) is an error naming file and field: never
silently dropped.

API: `save_adapter(directory, params, cfg, base_model='')`;
`read_adapter_config(directory, cfg) -> (PeftOptions, config)` (the JSON
only, to build a model config); `load_adapter(directory, cfg) ->
(PeftOptions, flat leaves)`.
"""

from jft.interop.peft.adapter import (
  CONFIG_FILE,
  WEIGHTS_FILE,
  adapter_config,
  load_adapter,
  read_adapter_config,
  save_adapter,
)
from jft.interop.peft.targets import (
  module_table,
  selected_modules,
  target_modules,
  targets_regex,
)

__all__ = [
  "CONFIG_FILE",
  "WEIGHTS_FILE",
  "adapter_config",
  "load_adapter",
  "module_table",
  "read_adapter_config",
  "save_adapter",
  "selected_modules",
  "target_modules",
  "targets_regex",
]
