"""Shared by the benchmarks: what machine the figures come from, host
memory, and the workload constants jft and PyTorch are built to alike."""

from __future__ import annotations

import platform
import resource
from typing import NamedTuple

# LoRA on both sides: r=8, alpha 16 on all 7 linear projections per layer.
HF_LORA_TARGETS = (
  "q_proj",
  "k_proj",
  "v_proj",
  "o_proj",
  "gate_proj",
  "up_proj",
  "down_proj",
)
LORA_RANK, LORA_ALPHA = 8, 16.0
DPO_BETA = 0.1
LR = 1e-4


class Shape(NamedTuple):
  """Model and batch shape of one benchmark size."""

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  mlp_dim: int
  batch: int  # rows (full, lora) or pairs (dpo)
  seq: int  # tokens per row (dpo: prompt + completion)
  prompt: int  # dpo prompt tokens

  def model_fields(self) -> dict:
    return {
      k: getattr(self, k)
      for k in (
        "vocab_size",
        "d_model",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "mlp_dim",
      )
    }

  def tokens(self, workload: str) -> int:
    """Tokens through the model per step (DPO: chosen + rejected)."""
    return self.batch * self.seq * (2 if workload == "dpo" else 1)


def cpu_name() -> str:
  """The CPU model (figures are only comparable on the same one)."""
  try:
    with open("/proc/cpuinfo") as fh:
      for line in fh:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def rss_mib() -> float:
  """This process's resident set now (Linux), MiB."""
  with open("/proc/self/status") as fh:
    for line in fh:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def peak_mib() -> float:
  """This process's peak resident set so far, MiB."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
