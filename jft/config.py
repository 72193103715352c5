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
      rope_theta=ph(float),
      norm_eps=ph(float),
      qkv_bias=ph(bool),
      tie_embeddings=ph(bool),
      causal=ph(bool),
      dtype=ph(str),
      param_dtype=ph(str),
      scan_layers=ph(bool),
      remat=ph(str),
    )
  )


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.objective = "clm"
  c.seed = 0
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
  # checkpoint (its tokenizer too); 'hf:DIR' = Hugging Face safetensors.
  c.init = ""

  c.model = model_config("tiny")

  c.data = ml_collections.ConfigDict()
  # Comma-separated JSONL paths/globs; '' = the built-in task suite.
  c.data.train_files = ""
  c.data.eval_files = ""
  c.data.tokenizer = ""  # .model path; '' = from init, or train one
  c.data.tokenizer_vocab_size = 512
  c.data.shuffle = True
  c.data.num_epochs = config_dict.placeholder(int)  # None = repeat
  c.data.packing = True
  c.data.builtin = ml_collections.ConfigDict(
    dict(tasks="add,copy,reverse,sort", n_train=20000, n_eval=200, seed=0)
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
    )
  )

  # Ordered (regex, label) table over parameter paths; first full match
  # wins and every leaf must match. Labels: 'trainable' | 'frozen'.
  c.freeze = ((".*", "trainable"),)

  c.mesh = ml_collections.ConfigDict(
    dict(data=1, fsdp=-1, tensor=1, rules=DEFAULT_RULES)
  )
  return c
