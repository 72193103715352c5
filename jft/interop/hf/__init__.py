"""Hugging Face checkpoints in and out: config mapping, weights, export.

`config` maps config.json to jft model fields and back; `weights` reads
safetensors tensor by tensor (`tensor_file` does the reads), `writer`
writes them; `export` writes a whole checkpoint directory (weights,
config, generation config, tokenizer). The CLI is
`python -m jft.interop.hf {export,flags}`.
"""

from jft.interop.hf.config import (
  CONFIG_FILE,
  config_from_hf,
  config_to_hf,
  load_hf_config,
  model_config_dict,
)
from jft.interop.hf.export import export_model
from jft.interop.hf.weights import (
  INDEX_FILE,
  QuantPlan,
  load_params,
  tensor_specs,
)
from jft.interop.hf.writer import save_params

__all__ = [
  "CONFIG_FILE",
  "INDEX_FILE",
  "QuantPlan",
  "config_from_hf",
  "config_to_hf",
  "export_model",
  "load_hf_config",
  "load_params",
  "model_config_dict",
  "save_params",
  "tensor_specs",
]
