"""DPO on the built-in tasks, starting from the SFT model.

With no flags: pretraining (configs/pretrain_clm.py) and SFT (configs/sft.py)
run first, once, cached under ~/.cache/jft (or $JFT_CACHE). The SFT model
then answers suite prompts (greedy + sampled); its wrong answers become the
rejected side of the pairs (WORKDIR/data/onpolicy_*.jsonl). DPO trains with
a frozen reference copy and ends with a before/after table of held-out
preference accuracy and greedy task accuracy (also in WORKDIR/summary.md).
  python -m jft.main --config=configs/dpo.py
Variants and techniques by config keys:
  --config.dpo.loss_type=ipo|robust|hinge|simpo  --config.dpo.beta=...
  --config.dpo.loss_type=orpo --config.dpo.rpo_alpha=0  (ORPO has its NLL)
  --config.lora.rank=8                    (LoRA: reference = adapters off)
  --config.lora.rank=8 --config.quant.kind=nf4             (QLoRA)
  --config.dpo.precompute_ref=True        (full FT without a reference copy)
  --config.dpo.builtin_pairs=synthetic    (made-up near misses, no mining)
"""

from jft import config as base


def get_config(arg=None):
  preset = arg or "mini"  # tiny is too weak to gain from DPO (see README)
  c = base.base_config()
  c.objective = "dpo"
  c.init = f"run:configs/sft.py:{preset}"
  c.model.preset = preset
  c.total_steps = 1200
  c.batch_size = 16  # preference pairs per step
  c.eval_batch_size = 32
  c.seq_len = 32  # built-in pairs are at most 21 tokens
  c.log_every = 25
  c.eval_every = 200
  c.checkpoint_every = 200
  c.dpo.beta = 0.5  # 0.1 forgets more here (README: beta sweep)
  # Built-in pairs are the SFT model's own wrong answers (config.dpo
  # .builtin_pairs='on_policy'), mined once before training. RPO keeps the
  # chosen answer likely; without it DPO lowers both sides and greedy
  # accuracy falls (README).
  c.dpo.rpo_alpha = 1.0
  c.optimizer.lr = 5e-5
  c.optimizer.warmup_steps = 20
  c.optimizer.weight_decay = 0.0
  c.optimizer.schedule = "constant"
  return c
