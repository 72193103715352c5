"""KTO on the built-in tasks, from the SFT model, with thumbs up/down data.

With no flags: pretraining and SFT run first (cached); the SFT model's
answers are mined as for configs/dpo.py, and each pair becomes two unpaired
rows: the true answer desirable, the model's wrong one undesirable
(WORKDIR/data/onpolicy_*_kto.jsonl). KTO (TRL's loss and metrics) trains
with a frozen reference copy; the run ends with a before/after table.
  python -m jft.main --config=configs/kto.py
Your data: --config.data.train_files=fb.jsonl --config.data.eval_files=...
({"prompt","completion","label"} rows, label true/false).
"""

from jft import config as base


def get_config(arg=None):
  preset = arg or "mini"
  c = base.base_config()
  c.objective = "kto"
  c.init = f"run:configs/sft.py:{preset}"
  c.model.preset = preset
  c.total_steps = 600
  c.batch_size = 32
  c.eval_batch_size = 32
  c.seq_len = 32
  c.log_every = 25
  c.eval_every = 200
  c.checkpoint_every = 200
  c.kto.beta = 0.1
  c.optimizer.lr = 5e-5
  c.optimizer.warmup_steps = 20
  c.optimizer.weight_decay = 0.0
  c.optimizer.schedule = "constant"
  return c
