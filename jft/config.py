"""The base ConfigDict every experiment in `configs/` starts from.

Every key a run may read exists here with its default, so with
`lock_config=True` a mistyped `--config.KEY` fails and names the key, and a
value of the wrong type fails too.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

# Logical parameter axis -> mesh axes. FSDP shards the `embed` dim of every
# weight; tensor parallelism splits heads / MLP / vocab.
DEFAULT_RULES = (
  ("batch", ("data", "fsdp")),
  ("embed", "fsdp"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("kv", "tensor"),
  ("vocab", "tensor"),
  ("layers", None),
  ("length", None),  # activations only: sequence positions stay whole
)


def model_config(preset: str = "tiny") -> ml_collections.ConfigDict:
  """Model keys; None means 'take the preset's value'."""
  ph = config_dict.placeholder
  return ml_collections.ConfigDict(
    dict(
      preset=preset,
      vocab_size=ph(int),
      d_model=ph(int),
      n_layers=ph(int),
      n_heads=ph(int),
      n_kv_heads=ph(int),
      head_dim=ph(int),
      mlp_dim=ph(int),
      # HF architecture: llama | mistral | qwen2 | qwen3 | gemma | gemma2 |
      # gemma3 (see jft/models/transformer.py for what each field does).
      family=ph(str),
      rope_theta=ph(float),
      rope_scaling=ph(str),  # JSON in HF's spelling: '{"rope_type": ...}'
      rope_local_theta=ph(float),
      max_position_embeddings=ph(int),
      norm_eps=ph(float),
      norm_plus_one=ph(bool),
      qkv_bias=ph(bool),
      o_bias=ph(bool),
      qk_norm=ph(bool),
      mlp_act=ph(str),  # silu | gelu_tanh
      sandwich_norm=ph(bool),
      embed_scale=ph(bool),
      query_pre_attn_scalar=ph(float),
      attn_softcap=ph(float),
      final_softcap=ph(float),
      sliding_window=ph(int),
      layer_types=ph(str),  # comma-separated: full | sliding, one per layer
      tie_embeddings=ph(bool),
      causal=ph(bool),
      head=ph(str),  # lm | score (reward model) | lm+value (PPO)
      dtype=ph(str),
      param_dtype=ph(str),
      scan_layers=ph(bool),
      # Layers per iteration of the scanned stack's loop; 0 (None) = all
      # of them (no loop: faster, same numbers up to float rounding), 1
      # with remat or QLoRA.
      scan_unroll=ph(int),
      remat=ph(str),
      # CLM/SFT/MLM losses run the LM head fused with the log-softmax,
      # at most this many float32 logits (tokens x vocab) at once; 0 =
      # full [B, T, V] logits. Same numbers; None = 2**26 (256 MiB).
      logits_chunk=ph(int),
      # The attention core's hand-written backward (jft/models/attend.py):
      # faster, same gradients to float rounding; off = the einsum path.
      attention_vjp=ph(bool),
      # The same for the gated MLP's activation (jft/models/gated.py).
      mlp_vjp=ph(bool),
    )
  )


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.objective = "clm"
  c.seed = 0
  # Optimizer steps; 0 = as many as data.num_epochs passes over the training
  # rows take (rows per epoch / batch_size, rounded up: the last batch is
  # padded, not dropped). With both set, the run stops at whichever comes
  # first, and the learning-rate schedule spans that many steps.
  c.total_steps = 1000
  c.batch_size = 32  # global, in rows of seq_len tokens
  c.grad_accum_steps = 1  # micro-batches per step (batch_size divisible)
  c.seq_len = 128
  c.log_every = 50
  c.eval_every = 250
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  c.eval_batch_size = 32
  # Where weights come from: '' = random init; a jft workdir = its latest
  # checkpoint (its tokenizer too); 'hf:DIR' = a Hugging Face checkpoint
  # (config.json, safetensors and its own tokenizer; see jft/init.py);
  # 'run:configs/X.py[:ARG]' = the result of that config's run, trained once
  # and cached under `stage_cache` (how sft.py starts from pretraining).
  c.init = ""
  c.stage_cache = ""  # '' = $JFT_CACHE or ~/.cache/jft
  # A PEFT LoRA adapter directory (adapter_config.json + adapter_model.
  # safetensors) put on the `init` base: its r, alpha and targets become
  # config.lora's, and training continues from it (or evaluate it).
  c.init_adapter = ""
  # Keys a resume may change beyond jft/resume.py's MAY_CHANGE list
  # (comma-separated dotted keys, e.g. 'optimizer.lr,seed'); anything else
  # that differs from WORKDIR/config.json is an error.
  c.allow_config_change = ""

  c.model = model_config("tiny")

  c.data = ml_collections.ConfigDict()
  # Comma-separated JSONL paths/globs; '' = the built-in task suite.
  c.data.train_files = ""
  c.data.eval_files = ""
  # A tokenizer file (.model / tokenizer.json) or directory; '' = the one
  # `init` names, else (random init only) one trained on the training text.
  c.data.tokenizer = ""
  c.data.tokenizer_vocab_size = 512
  c.data.shuffle = True
  # Passes over the training data; None = repeat until total_steps. Not for
  # online RL (ppo, grpo: rollouts have no epochs).
  c.data.num_epochs = config_dict.placeholder(int)
  c.data.packing = True
  # Read, parse and tokenize the training files lazily (jft/data/stream.py):
  # each process only its own shard, as training consumes it, so a large
  # corpus starts training in seconds and host memory stays flat. For clm
  # and mlm; trains for total_steps (no num_epochs: counting steps would
  # read everything). Eval files are still read up front.
  c.data.streaming = False
  # Threads that read and tokenize ahead of the train step when streaming.
  c.data.read_threads = 1
  # A tokenizer trained for a random init sees at most this many MB of the
  # training text (its start, in file order; counted in characters); 0 =
  # all of it.
  c.data.tokenizer_train_mb = 64
  c.data.builtin = ml_collections.ConfigDict(
    dict(tasks="add,copy,reverse,sort", n_train=8000, n_eval=200, seed=0)
  )

  # Supervised fine-tuning on {"prompt","completion"} or {"messages"} rows.
  c.sft = ml_collections.ConfigDict(
    dict(
      # Rows longer than seq_len + 1 tokens: 'truncate_prompt' (drop prompt
      # tokens from the left) or 'skip'; both are counted and reported.
      truncation="truncate_prompt",
      # How {"messages"} rows become text: 'auto' (the tokenizer's own chat
      # template when it has one, as Hugging Face checkpoints do, else the
      # role table below), 'tokenizer' (its template; an error if none) or
      # 'table'. See jft/objectives/sft.py.
      template="auto",
      # Chat template as data: (role, prefix, suffix) rows. Assistant content
      # (plus eos) is trained; everything else is prompt. A JSON file with
      # {"roles": [[role, prefix, suffix], ...]} may replace it.
      chat_template=(
        ("system", "<|system|>\n", "\n"),
        ("user", "<|user|>\n", "\n"),
        ("assistant", "<|assistant|>\n", "\n"),
      ),
      template_file="",
      # Greedy generations on held-out prompts for eval/task_accuracy.
      max_eval_generations=400,
      max_new_tokens=16,
    )
  )

  # Masked-LM: select mask_rate of each document's tokens; replace 80% with
  # [MASK], 10% with a random token, leave 10% (BERT's recipe).
  c.mlm = ml_collections.ConfigDict(
    dict(mask_rate=0.15, mask_token_rate=0.8, random_token_rate=0.1)
  )

  # Preference optimisation ({"prompt","chosen","rejected"} rows).
  c.dpo = ml_collections.ConfigDict(
    dict(
      # sigmoid | robust | ipo | hinge | dpop | simpo | orpo
      loss_type="sigmoid",
      beta=0.1,
      label_smoothing=0.0,  # cDPO / rDPO noise rate
      simpo_gamma=0.5,  # SimPO target margin (reward units)
      # RPO: + rpo_alpha * per-token NLL of the chosen completion. Keeps the
      # chosen answer (and its eos) likely while the margin grows.
      rpo_alpha=0.0,
      dpop_lambda=50.0,  # DPO-Positive penalty weight (loss_type='dpop')
      # Which completion tokens carry the preference: 'full' (DPO) or
      # 'first_divergence' (Step-DPO style: from the first differing token
      # on; the rejected side only that token, its error).
      mask="full",
      # Full fine-tuning reference: False = a frozen copy in the state;
      # True = log-probs computed once before training and cached on disk
      # (STAGE_CACHE/ref_logps, keyed by the weights and the data: reruns
      # and resumes reuse them; jft/data/refcache.py). (LoRA/QLoRA always
      # use the base with adapters off; simpo/orpo need no reference.)
      precompute_ref=False,
      # Pack whole pairs into rows of 2 * seq_len tokens (each pair's chosen
      # and rejected side by side, attending only within themselves), not a
      # pair a row padded to its longer side: the same per-pair losses, less
      # padding; a batch row then holds one pair or more.
      pack_pairs=False,
      truncation="truncate_prompt",  # or 'skip'; counted and reported
      on_invalid="error",  # empty/missing/identical chosen-rejected: or 'skip'
      # Built-in pairs (data.train_files == ''): 'on_policy' = the starting
      # model's own wrong answers to suite prompts (greedy, then
      # `mine_samples` draws at `mine_temperature`) against the true ones,
      # mined once into WORKDIR/data; 'synthetic' = made-up near misses;
      # 'on_policy+synthetic' = both to train on, the mined ones held out.
      builtin_pairs="on_policy",
      mine_prompts=8000,  # training prompts to mine (0 = all); eval: all
      mine_samples=2,
      mine_temperature=1.0,
      mine_pairs="first",  # or 'all': a pair per distinct wrong answer
    )
  )

  # Reward model (objective 'reward', model.head 'score'): Bradley-Terry on
  # the same rows as DPO, plus an optional numeric "margin" column (TRL's).
  c.reward = ml_collections.ConfigDict(
    dict(
      # TRL's center_rewards_coefficient: + coef * (r_chosen + r_rejected)^2
      # per pair, pulling rewards towards mean 0; 0 = off.
      center_rewards_coefficient=0.0,
      truncation="truncate_prompt",  # or 'skip'; counted and reported
      on_invalid="error",  # a bad pair or margin: or 'skip' (counted)
    )
  )

  # KTO ({"prompt","completion","label"} rows; TRL's KTOTrainer).
  c.kto = ml_collections.ConfigDict(
    dict(
      beta=0.1,
      desirable_weight=1.0,
      undesirable_weight=1.0,
      loss_type="kto",  # kto | apo_zero_unpaired
    )
  )

  # Online RL (objectives 'ppo' and 'grpo'): the rollout phase, a data
  # source of the one training loop (jft/rl/rollouts.py). Prompts are
  # {"prompt"} rows (+ reference fields reward functions read); built in:
  # the task suite's SFT prompts.
  c.rl = ml_collections.ConfigDict(
    dict(
      prompts_per_rollout=64,  # prompts sampled per rollout
      epochs=1,  # passes over each rollout (PPO epochs / GRPO iterations)
      max_new_tokens=16,
      temperature=1.0,
      top_k=0,
      top_p=1.0,
      # task | format | reward_model | module:function, comma-separated
      reward_funcs="task",
      reward_weights="",  # comma-separated floats; '' = 1 each
      format_regex=r" \S.*",  # the 'format' reward's pattern
      # A jft reward-model run (model.head='score') or run:configs/X.py;
      # scores rollouts for the 'reward_model' reward function.
      reward_model="",
      samples_to_log=8,  # rollouts per round written to rollouts/samples
      # DAPO's dynamic sampling (groups of > 1 sample: GRPO, PPO with
      # num_generations > 1): more prompts are sampled, up to
      # max_gen_batches batches a rollout, until every group's rewards
      # differ; a group of equal rewards carries no advantage.
      filter_groups=False,
      max_gen_batches=4,
    )
  )
  # PPO (policy with a value head on its trunk: model.head='lm+value').
  c.ppo = ml_collections.ConfigDict(
    dict(
      kl_coef=0.05,  # per-token KL penalty to the reference (k1)
      adaptive_kl=False,  # Ziegler et al.'s controller towards kl_target
      kl_target=6.0,
      kl_horizon=10000,
      gamma=1.0,
      lam=0.95,
      clip=0.2,  # policy ratio clip
      vf_clip=0.2,  # value clip
      vf_coef=0.1,
      missing_eos_penalty=0.0,  # subtracted from the score without an eos
      # Updates at the start in which only the critic learns (advantages
      # zeroed): a critic that has not yet learnt the per-prompt baseline
      # turns every low-scoring prompt into a push away from all sampled
      # answers (OpenRLHF's freezing_actor_steps).
      critic_warmup_steps=0,
      # Samples per prompt; > 1 subtracts from each score the mean of its
      # prompt's other samples (RLOO) before GAE: the critic then learns
      # only what is left, not every prompt's level.
      num_generations=1,
      # With num_generations > 1: 'rloo' subtracts the others' mean from each
      # score; 'group_norm' is GRPO's (score - group mean) / group std
      # (OpenRLHF's group_norm), so every prompt's group weighs the same
      # whatever the spread of its scores.
      group_baseline="rloo",
      # 'shared': value head on the policy trunk (model.head='lm+value');
      # 'reward_model': a separate critic from rl.reward_model (TRL's).
      critic="shared",
    )
  )
  # GRPO: group-normalised advantages, clipped ratio, k3 KL to the reference.
  c.grpo = ml_collections.ConfigDict(
    dict(
      num_generations=8,  # samples per prompt (the group)
      beta=0.04,  # KL weight; 0 = no reference at all
      eps_low=0.2,
      eps_high=0.2,  # DAPO's clip-higher: e.g. 0.28
      loss_type="grpo",  # grpo | dr_grpo | dapo
      scale_rewards="auto",  # auto (not for dr_grpo) | true | false
      # 'sft_on_correct': the control, NLL on the rollouts whose reward is
      # positive (rejection sampling) through the same loop; '' = GRPO.
      control="",
    )
  )

  c.optimizer = ml_collections.ConfigDict(
    dict(
      name="adamw",
      lr=1e-3,
      schedule="cosine",
      warmup_steps=50,
      min_lr_ratio=0.1,
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.1,
      grad_clip_norm=1.0,
      # Leaves whose path matches get no weight decay: norms and biases.
      no_decay=r"(^|/)(scale|bias)$",
      # "REGEX=FACTOR,...": matching leaves take FACTOR x the learning rate.
      lr_scale="",
    )
  )

  # Ordered (regex, label) table over parameter paths; first full match
  # wins and every leaf must match. Labels: 'trainable' | 'frozen'.
  # Empty = automatic: only LoRA adapters train when lora.rank > 0, else all.
  c.freeze = ()

  # LoRA adapters on the Linear layers whose module path matches `targets`
  # (an alias: all-linear | attention | mlp | qv, or a regex such as
  # `layers/attn/(q|v)`); rank 0 = off. Scale alpha/rank (rslora: /sqrt).
  c.lora = ml_collections.ConfigDict(
    dict(
      rank=0,
      alpha=16.0,
      dropout=0.0,
      rslora=False,
      targets="all-linear",
      save_adapters=True,  # WORKDIR/adapters: PEFT-format adapters alone
      save_merged=False,  # WORKDIR/merged: HF safetensors, adapters merged
    )
  )
  # QLoRA: a frozen base with 4-bit kernels. kind '' = off, 'int4' | 'nf4';
  # `table` is an ordered (regex over param paths, 'quantize' | 'float')
  # table; embeddings and norms stay float by default.
  c.quant = ml_collections.ConfigDict(
    dict(
      kind="",
      block_size=64,
      double_quant=False,
      table=(
        (r"layers(_\d+)?/(attn|mlp)/\w+/kernel", "quantize"),
        (r"lm_head/kernel", "quantize"),
        (r".*", "float"),
      ),
    )
  )

  # Weights & Biases, beside metrics.jsonl and TensorBoard (jft/metrics.py):
  # off unless enabled (then `pip install 'jft[wandb]'`); mode online |
  # offline | disabled; name '' = the workdir's name; dir '' = the workdir.
  c.wandb = ml_collections.ConfigDict(
    dict(
      enabled=False,
      project="jft",
      entity="",
      name="",
      group="",
      mode="online",
      dir="",
    )
  )

  # Axis sizes (one may be -1 = the rest) over the first `num_devices`
  # devices (0 = all; a subset only in single-process runs).
  c.mesh = ml_collections.ConfigDict(
    dict(data=1, fsdp=-1, tensor=1, num_devices=0, rules=DEFAULT_RULES)
  )
  return c
