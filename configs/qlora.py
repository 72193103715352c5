"""QLoRA SFT: LoRA adapters on a frozen base whose kernels are 4-bit NF4.

The base comes from configs/pretrain_clm.py (float), is quantized at load
(block 64, double-quantized scales), and only the adapters train.
`--config.quant.kind=int4` picks symmetric int4 instead.
  python -m jft.main --config=configs/qlora.py
"""

import os

from jft import init


def get_config(arg=None):
  here = os.path.join(os.path.dirname(__file__), "lora.py")
  c = init.load_config_file(here + (f":{arg}" if arg else ""))
  c.quant.kind = "nf4"
  c.quant.block_size = 64
  c.quant.double_quant = True
  return c
