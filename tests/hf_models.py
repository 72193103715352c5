"""Tiny random Hugging Face checkpoints, made by transformers itself.

Each case is a real transformers config class instantiated small. Weights
are drawn wider than transformers' default init (std 0.1 instead of 0.02)
and every norm weight and bias is random, so that a wrong detail (a missed
RoPE scaling, a norm offset, a soft-cap) moves the logits well past the
parity tolerance instead of hiding under it.
"""

from __future__ import annotations

import json
import os

import torch
import transformers

VOCAB = 96

_BASE = dict(
  vocab_size=VOCAB,
  hidden_size=32,
  intermediate_size=48,
  num_hidden_layers=3,
  num_attention_heads=4,
  num_key_value_heads=2,
  head_dim=8,
  rms_norm_eps=1e-5,
  initializer_range=0.1,
  bos_token_id=1,
  eos_token_id=2,
  pad_token_id=0,
)

# name -> (config class, kwargs). RoPE bases are small and windows short so
# that scaling and sliding windows act within a 24-token test sequence.
CASES = {
  "llama": ("LlamaConfig", dict(rope_theta=10000.0)),
  "llama_bias": ("LlamaConfig", dict(attention_bias=True)),
  "llama3": (
    "LlamaConfig",
    dict(
      rope_theta=500.0,
      max_position_embeddings=64,
      rope_scaling=dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=16,
      ),
    ),
  ),
  "linear": (
    "LlamaConfig",
    dict(rope_theta=100.0, rope_scaling=dict(rope_type="linear", factor=4.0)),
  ),
  "dynamic": (
    "LlamaConfig",
    dict(
      rope_theta=100.0,
      max_position_embeddings=8,
      rope_scaling=dict(rope_type="dynamic", factor=4.0),
    ),
  ),
  "yarn": (
    "LlamaConfig",
    dict(
      rope_theta=100.0,
      max_position_embeddings=32,
      rope_scaling=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=8
      ),
    ),
  ),
  "mistral": ("MistralConfig", dict(sliding_window=5, rope_theta=1000.0)),
  "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
  "qwen3": ("Qwen3Config", dict(rope_theta=1000.0)),
  "gemma": ("GemmaConfig", dict(rope_theta=1000.0, head_dim=16)),
  "gemma2": (
    "Gemma2Config",
    dict(
      sliding_window=5,
      query_pre_attn_scalar=12,
      attn_logit_softcapping=2.0,
      final_logit_softcapping=3.0,
      rope_theta=1000.0,
    ),
  ),
  "gemma3": (
    "Gemma3TextConfig",
    dict(
      sliding_window=5,
      layer_types=["sliding_attention", "full_attention", "sliding_attention"],
      query_pre_attn_scalar=12,
      rope_local_base_freq=100.0,
      rope_theta=1000.0,
      rope_scaling=dict(rope_type="linear", factor=2.0),
      max_position_embeddings=64,
    ),
  ),
}


def hf_config(case: str, **overrides):
  cls_name, kwargs = CASES[case]
  cls = getattr(transformers, cls_name)
  return cls(**{**_BASE, **kwargs, **overrides})


def randomize(model, seed: int) -> None:
  """Random norm weights and biases (HF initialises them to 1/0 or 0)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith(".bias"):
        p.copy_(
          0.3 * torch.randn(p.shape, generator=gen)
          + (
            1.0
            if "norm" in name and "gemma" not in model.config.model_type
            else 0.0
          )
        )


def make_model(case: str, seed: int = 0, **overrides):
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(
    hf_config(case, **overrides), attn_implementation="eager"
  )
  randomize(model, seed + 1)
  return model.eval().float()


def save(model, directory: str, spelling: str = "v5") -> str:
  """`save_pretrained`, then optionally rewrite config.json in the
  transformers 4 spelling (top-level rope_theta / rope_scaling)."""
  model.save_pretrained(directory, safe_serialization=True)
  if spelling == "v4":
    to_v4_spelling(os.path.join(directory, "config.json"))
  return directory


def to_v4_spelling(file: str) -> None:
  with open(file) as fh:
    c = json.load(fh)
  params = c.pop("rope_parameters", None) or {}
  if "full_attention" in params:  # Gemma 3: per layer type
    full, local = params["full_attention"], params["sliding_attention"]
    c["rope_theta"] = full.pop("rope_theta")
    c["rope_local_base_freq"] = local["rope_theta"]
    c["rope_scaling"] = full if full.get("rope_type") != "default" else None
  else:
    c["rope_theta"] = params.pop("rope_theta")
    c["rope_scaling"] = params if params.get("rope_type") != "default" else None
  with open(file, "w") as fh:
    json.dump(c, fh, indent=2)


def hf_logits(model, tokens, attention_mask=None):
  with torch.no_grad():
    out = model(
      input_ids=torch.as_tensor(tokens),
      attention_mask=None
      if attention_mask is None
      else torch.as_tensor(attention_mask),
    )
  return out.logits.float().numpy()


# A Llama 3 style chat template, written for these tests.
CHAT_TEMPLATE = (
  "{{ bos_token }}{% for m in messages %}"
  "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
  "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
  "{% if add_generation_prompt %}"
  "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
SPECIALS = [
  "<|begin_of_text|>",
  "<|end_of_text|>",
  "<|eot_id|>",
  "<|start_header_id|>",
  "<|end_header_id|>",
]


def write_tokenizer(directory: str, texts, vocab_size: int = 300) -> int:
  """A byte-level BPE tokenizer (Llama 3 style: bos added by the post-
  processor, no pad token, <|eot_id|> ends chat turns) with its
  tokenizer_config.json and generation_config.json; returns its size."""
  from tokenizers import (
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
  )

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(
    list(texts),
    trainers.BpeTrainer(
      vocab_size=vocab_size,
      special_tokens=SPECIALS,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
    ),
  )
  bos = "<|begin_of_text|>"
  tok.post_processor = processors.Sequence(
    [
      processors.ByteLevel(trim_offsets=False),
      processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
      ),
    ]
  )
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  config = {
    "bos_token": bos,
    "eos_token": "<|end_of_text|>",
    "chat_template": CHAT_TEMPLATE,
    "tokenizer_class": "PreTrainedTokenizerFast",
    "model_max_length": 1024,
  }
  gen = {
    "bos_token_id": tok.token_to_id(bos),
    "eos_token_id": [
      tok.token_to_id("<|end_of_text|>"),
      tok.token_to_id("<|eot_id|>"),
    ],
  }
  for name, doc in (
    ("tokenizer_config.json", config),
    ("generation_config.json", gen),
  ):
    with open(os.path.join(directory, name), "w") as fh:
      json.dump(doc, fh)
  return tok.get_vocab_size()
