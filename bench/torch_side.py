"""A plain PyTorch training loop on a transformers `LlamaForCausalLM`
(+ PEFT LoRA); imports PyTorch, transformers and PEFT only, never JAX.

Used by bench/compare.py (side by side with jft) and bench/memory.py
(each system in its own process, so its peak RSS is its own).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import time

import peft
import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_util import HF_LORA_TARGETS, LORA_ALPHA, LORA_RANK, LR, Shape  # noqa: E402


def hf_model(shape: Shape, seed: int):
  """A random `LlamaForCausalLM` of the shape, float32 weights."""
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(
    vocab_size=shape.vocab_size,
    hidden_size=shape.d_model,
    intermediate_size=shape.mlp_dim,
    num_hidden_layers=shape.n_layers,
    num_attention_heads=shape.n_heads,
    num_key_value_heads=shape.n_kv_heads,
    max_position_embeddings=max(2048, shape.seq),
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    attention_bias=False,
    mlp_bias=False,
  )
  return transformers.LlamaForCausalLM(cfg)


def lora_config():
  return peft.LoraConfig(
    r=LORA_RANK,
    lora_alpha=LORA_ALPHA,
    lora_dropout=0.0,
    target_modules=list(HF_LORA_TARGETS),
    task_type="CAUSAL_LM",
  )


def dtype_probe(model) -> list:
  """Records the output dtype of the first q projection's forwards."""
  seen = []
  q = next(m for n, m in model.named_modules() if n.endswith("q_proj"))
  q.register_forward_hook(lambda mod, i, out: seen.append(out.dtype))
  return seen


def cosine_lambda(total: int, warmup: int = 50):
  def f(step):
    if step < warmup:
      return (step + 1) / warmup
    p = min((step - warmup) / max(total - warmup, 1), 1.0)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))

  return f


def count_params(model) -> tuple[int, int]:
  ps = list(model.parameters())
  total = sum(p.numel() for p in ps)
  return total, sum(p.numel() for p in ps if p.requires_grad)


class TorchSystem:
  """A plain PyTorch training loop on a transformers model (+ PEFT)."""

  def __init__(self, workload: str, dtype: str, shape: Shape, seed: int = 0):
    model = hf_model(shape, seed)
    self.name = "transformers"
    if workload == "lora":
      model = peft.get_peft_model(model, lora_config())
      self.name = "transformers + PEFT"
    model.train()
    self.model = model
    self.params_total, self.params_trainable = count_params(model)
    params = [p for p in model.parameters() if p.requires_grad]
    # Trainer's default optimizer (adamw_torch_fused), jft's AdamW settings.
    self.opt = torch.optim.AdamW(
      params, lr=LR, betas=(0.9, 0.95), weight_decay=0.1, fused=True
    )
    self.sched = torch.optim.lr_scheduler.LambdaLR(
      self.opt, cosine_lambda(1000)
    )
    self.params = params
    g = torch.Generator().manual_seed(seed)
    self.ids = torch.randint(
      0, shape.vocab_size, (shape.batch, shape.seq), generator=g
    )
    self.autocast = (
      functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)
      if dtype == "bfloat16"
      else contextlib.nullcontext
    )
    self.seen = dtype_probe(model)
    self.loss = math.nan

  def step(self) -> float:
    t0 = time.perf_counter()
    with self.autocast():
      loss = self.model(input_ids=self.ids, labels=self.ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.params, 1.0)
    self.opt.step()
    self.sched.step()
    self.opt.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    self.loss = float(loss.detach())
    return dt

  def state_bytes(self) -> tuple[int, int]:
    """Bytes of every parameter (frozen ones too), and of the optimizer's
    state (allocated by its first step)."""
    params = sum(p.numel() * p.element_size() for p in self.model.parameters())
    opt = sum(
      t.numel() * t.element_size()
      for st in self.opt.state.values()
      for t in st.values()
      if torch.is_tensor(t)
    )
    return params, opt

  def close(self):
    pass
