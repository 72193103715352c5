"""PEFT options: the LoRA and 4-bit settings of one model, as one object.

A `TransformerConfig` carries a single `PeftOptions` (field `peft`); every
`Linear` matches its own module path against it. Built once from the run's
`config.lora` / `config.quant` (`from_run_config`), so the options are not
copied field by field through several layers.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from jft.errors import ConfigError

# Module-path regexes for the usual target sets (paths look like
# `layers/attn/q`, or `layers_3/mlp/up` when layers are not scanned).
ALIASES = {
  "all-linear": r"layers(_\d+)?/(attn/(q|k|v|o)|mlp/(gate|up|down))",
  "attention": r"layers(_\d+)?/attn/(q|k|v|o)",
  "mlp": r"layers(_\d+)?/mlp/(gate|up|down)",
  "qv": r"layers(_\d+)?/attn/(q|v)",
}
QUANT_KINDS = ("int4", "nf4")


def resolve_targets(targets: str) -> str:
  """An alias name or a regex over module paths."""
  return ALIASES.get(targets, targets)


@dataclasses.dataclass(frozen=True)
class PeftOptions:
  """LoRA adapters and 4-bit frozen kernels; hashable (a static jit arg).

  LoRA goes on the Linear layers whose module path (e.g. `layers/attn/q`)
  fully matches `lora_targets`; a kernel is 4-bit where the first
  `(regex, 'quantize'|'float')` row of `quant_table` matching its path
  (e.g. `layers/attn/q/kernel`) says 'quantize'.
  """

  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0
  lora_rslora: bool = False
  lora_targets: str = ""  # regex over module paths
  quant_kind: str = ""  # '' | 'int4' | 'nf4'
  quant_table: tuple = ()  # ((regex over kernel path, label),)
  quant_block_size: int = 64
  quant_double: bool = False

  def __post_init__(self):
    table = tuple(tuple(r) for r in self.quant_table)
    object.__setattr__(self, "quant_table", table)
    if self.lora_rank < 0:
      raise ConfigError(f"config.lora.rank must be >= 0, got {self.lora_rank}")
    if self.quant_kind and self.quant_kind not in QUANT_KINDS:
      raise ConfigError(
        f"config.quant.kind: unknown {self.quant_kind!r}; expected '' or "
        f"one of {QUANT_KINDS}"
      )

  def lora_on(self, path: str) -> bool:
    return self.lora_rank > 0 and bool(re.fullmatch(self.lora_targets, path))

  def quantized(self, kernel_path: str) -> bool:
    if not self.quant_kind:
      return False
    for rx, label in self.quant_table:
      if re.fullmatch(rx, kernel_path):
        return label == "quantize"
    return False

  @property
  def lora_scale(self) -> float:
    """alpha / r, or alpha / sqrt(r) for rsLoRA (Kalajdzievskas 2023)."""
    r = max(self.lora_rank, 1)
    return self.lora_alpha / (r**0.5 if self.lora_rslora else r)

  @property
  def active(self) -> bool:
    return bool(self.lora_rank or self.quant_kind)


NONE = PeftOptions()


def from_run_config(config) -> PeftOptions:
  """The options a run's `config.lora` and `config.quant` ask for."""
  lo, qu = config.lora, config.quant
  kw = {}
  if lo.rank:
    kw.update(
      lora_rank=lo.rank,
      lora_alpha=lo.alpha,
      lora_dropout=lo.dropout,
      lora_rslora=lo.rslora,
      lora_targets=resolve_targets(lo.targets),
    )
  if qu.kind:
    kw.update(
      quant_kind=qu.kind,
      quant_table=qu.table,
      quant_block_size=qu.block_size,
      quant_double=qu.double_quant,
    )
  return PeftOptions(**kw)


def from_dict(d: Mapping | PeftOptions | None) -> PeftOptions:
  """From a saved `config.json` (`model.peft` is a dict there)."""
  if d is None:
    return NONE
  if isinstance(d, PeftOptions):
    return d
  unknown = sorted(set(d) - {f.name for f in dataclasses.fields(PeftOptions)})
  if unknown:
    raise ValueError(f"model.peft: unknown key(s) {unknown}")
  return PeftOptions(**d)
