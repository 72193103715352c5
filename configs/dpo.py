"""DPO on the built-in preference split, starting from the SFT model.

With no flags: pretraining (configs/pretrain_clm.py) and SFT (configs/sft.py)
run first, once, cached under ~/.cache/jft (or $JFT_CACHE); then DPO with a
frozen reference copy, ending with a before/after table of held-out
preference accuracy and greedy task accuracy (also in WORKDIR/summary.md).
  python -m jft.main --config=configs/dpo.py
Variants and techniques by config keys:
  --config.dpo.loss_type=ipo|robust|hinge|simpo|orpo  --config.dpo.beta=...
  --config.lora.rank=8                    (LoRA: reference = adapters off)
  --config.lora.rank=8 --config.quant.kind=nf4             (QLoRA)
  --config.dpo.precompute_ref=True        (full FT without a reference copy)
"""

from jft import config as base


def get_config(arg=None):
  c = base.base_config()
  c.objective = "dpo"
  c.init = "run:configs/sft.py" + (f":{arg}" if arg else "")
  c.model.preset = arg or "tiny"
  c.total_steps = 300
  c.batch_size = 16  # preference pairs per step
  c.eval_batch_size = 32
  c.seq_len = 64
  c.log_every = 25
  c.eval_every = 100
  c.checkpoint_every = 100
  c.dpo.beta = 0.1
  c.optimizer.lr = 3e-4
  c.optimizer.warmup_steps = 20
  c.optimizer.weight_decay = 0.0
  c.optimizer.schedule = "constant"
  return c
