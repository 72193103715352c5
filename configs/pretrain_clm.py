"""CLM pretraining of a small Llama-style model on the built-in task corpus.

Runs with no flags on a 2-core CPU in a few minutes:
  python -m jft.main --config=configs/pretrain_clm.py
`arg` picks a model preset, e.g. `--config=configs/pretrain_clm.py:ref-5M`.
"""

from jft import config as base


def get_config(arg=None):
  c = base.base_config()
  c.objective = "clm"
  c.model.preset = arg or "tiny"
  c.total_steps = 600
  c.batch_size = 16
  c.seq_len = 128
  c.log_every = 25
  c.eval_every = 200
  c.checkpoint_every = 200
  c.optimizer.lr = 3e-3
  c.optimizer.warmup_steps = 50
  return c
