"""LoRA SFT: rank-8 adapters on every linear layer of a frozen base.

Same data and starting point as configs/sft.py; only adapters train. Writes
WORKDIR/adapters (PEFT format) at the end; `--config.lora.save_merged=True`
also writes the merged model as Hugging Face safetensors.
  python -m jft.main --config=configs/lora.py
"""

import os

from jft import init


def get_config(arg=None):
  here = os.path.join(os.path.dirname(__file__), "sft.py")
  c = init.load_config_file(here + (f":{arg}" if arg else ""))
  c.lora.rank = 8
  c.lora.alpha = 16.0
  c.lora.targets = "all-linear"
  c.optimizer.lr = 3e-3
  return c
