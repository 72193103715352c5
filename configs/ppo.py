"""RLHF with PPO on the built-in tasks: SFT, a reward model, then PPO.

With no flags, from nothing: pretraining, SFT (configs/sft.py) and the
reward model (configs/reward.py, Bradley-Terry on pairs mined from the SFT
model) run first, once, cached; then PPO trains the SFT model against the
reward model's score with a per-token KL penalty to the SFT model. The
critic is a separate model started from the reward model (TRL's choice;
`ppo.critic='shared'` puts a value head on the policy's trunk instead, see
jft/objectives/ppo.py). Held-out greedy task accuracy is evaluated and the
run ends with a before/after table (WORKDIR/summary.md).
  python -m jft.main --config=configs/ppo.py
Variants:
  --config.rl.reward_funcs=task          (the suite's checker instead of the
                                          reward model)
  --config.ppo.critic=shared --config.model.head=lm+value
                                         (value head on the policy trunk)
  --config.ppo.adaptive_kl=True --config.ppo.kl_target=1.0
  --config.lora.rank=8                   (LoRA; reference = adapters off)
"""

from jft import config as base


def get_config(arg=None):
  preset = arg or "mini"
  c = base.base_config()
  c.objective = "ppo"
  c.init = f"run:configs/sft.py:{preset}"
  c.model.preset = preset
  c.model.head = "lm"
  c.ppo.critic = "reward_model"  # a second model, from rl.reward_model
  c.total_steps = 200
  c.batch_size = 32  # completions per minibatch
  c.seq_len = 32
  c.log_every = 10
  c.eval_every = 50
  c.checkpoint_every = 50
  c.rl.prompts_per_rollout = 64
  c.rl.epochs = 2  # PPO epochs over each rollout
  c.rl.max_new_tokens = 12
  c.rl.reward_funcs = "reward_model"
  c.rl.reward_model = f"run:configs/reward.py:{preset}"
  c.ppo.kl_coef = 0.05
  c.optimizer.lr = 1e-5
  c.optimizer.warmup_steps = 10
  c.optimizer.weight_decay = 0.0
  c.optimizer.schedule = "constant"
  return c
