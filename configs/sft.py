"""Full fine-tuning (SFT) on the built-in tasks' prompt/completion split.

Starts from the result of `configs/pretrain_clm.py`, which runs first (once;
cached under ~/.cache/jft). Logs eval/loss and eval/task_accuracy (greedy
generation on held-out prompts). `arg` picks a model preset for both stages.
  python -m jft.main --config=configs/sft.py
"""

from jft import config as base


def get_config(arg=None):
  c = base.base_config()
  c.objective = "sft"
  c.init = "run:configs/pretrain_clm.py" + (f":{arg}" if arg else "")
  c.model.preset = arg or "tiny"
  c.total_steps = 400
  c.batch_size = 16
  c.seq_len = 128
  c.log_every = 25
  c.eval_every = 200
  c.checkpoint_every = 200
  c.optimizer.lr = 1e-3
  c.optimizer.warmup_steps = 20
  c.optimizer.weight_decay = 0.0
  return c
