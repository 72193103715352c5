"""One export path: a jft model -> a Hugging Face checkpoint directory.

Used by the CLI (`python -m jft.interop.hf export`), by runs with
`lora.save_merged`, and by `jft.load(...).save_hf`. The directory gets the
weights (LoRA merged, 4-bit kernels dequantized), a `config.json` that
carries the source checkpoint's fields (RoPE scaling, max positions, tie
flag, special-token ids), `generation_config.json`, and the tokenizer's own
files, written to a temporary directory and renamed into place.

A reward model (`head='score'`) exports as the family's
`*ForSequenceClassification` (one label, `score.weight`, no LM head and no
generation_config.json), loadable by `AutoModelForSequenceClassification`;
its `pad_token_id` must be set and differ from eos (`_check_score_pad`).

dtype: by default the source checkpoint's (`torch_dtype`), else the
parameters' own. A float32 export of float32 params is bit-exact; an export
narrower than the params is rounded, and says so.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
from flax import traverse_util

from jft.interop.hf import config as hf_config
from jft.interop.hf import weights, writer
from jft.interop.hf.writer import flat_params as weights_flat

SOURCE_DIR = "source"  # WORKDIR/source/{config,generation_config}.json


def source_configs(directory: str | None) -> tuple[dict | None, dict | None]:
  """(config.json, generation_config.json) dicts found in `directory`."""
  out = []
  for name in (hf_config.CONFIG_FILE, hf_config.GENERATION_CONFIG_FILE):
    file = os.path.join(directory, name) if directory else ""
    if file and os.path.exists(file):
      with open(file, encoding="utf-8") as fh:
        out.append(json.load(fh))
    else:
      out.append(None)
  return out[0], out[1]


def _dtype_name(x) -> str:
  return str(np.dtype(x)) if np.dtype(x).name != "bfloat16" else "bfloat16"


def special_ids(tokenizer) -> dict:
  """bos/eos/pad ids for config.json, from the tokenizer."""
  if tokenizer is None:
    return {}
  eos = list(getattr(tokenizer, "eos_ids", None) or [tokenizer.eos_id])
  return dict(
    bos_token_id=tokenizer.bos_id,
    eos_token_id=eos[0] if len(eos) == 1 else eos,
    pad_token_id=tokenizer.pad_id,
  )


def export_model(
  out: str,
  params,
  model_cfg,
  *,
  tokenizer=None,
  source: str | None = None,
  dtype: str | None = None,
  max_shard_bytes: int = writer.MAX_SHARD_BYTES,
  overwrite: bool = False,
  quiet: bool = False,
) -> str:
  """Writes `params` (of `model_cfg`, LoRA/4-bit allowed) as an HF dir.

  `source` is a directory holding the source checkpoint's config.json and
  generation_config.json (an HF dir, or a run's `source/`). `dtype=None`
  takes the source's dtype, else the params'.
  """
  from jft.peft import lora

  if model_cfg.head == "lm+value":  # a PPO policy exports as its LM
    flat = weights_flat(params)
    flat.pop("value_head/kernel", None)
    params = traverse_util.unflatten_dict(flat, sep="/")
    model_cfg = dataclasses.replace(model_cfg, head="lm")
  if model_cfg.peft.active:
    params = jax.tree.map(np.asarray, lora.merge(params, model_cfg))
    model_cfg = lora.base_config(model_cfg)
  src_cfg, src_gen = source_configs(source)
  param_dtype = _dtype_name(model_cfg.param_dtype)
  if dtype == "keep":
    dtype = param_dtype
  if dtype is None:
    dtype = (src_cfg or {}).get("dtype") or (src_cfg or {}).get("torch_dtype")
    dtype = dtype or param_dtype
  if np.dtype(_np(dtype)).itemsize < np.dtype(_np(param_dtype)).itemsize:
    if not quiet:
      print(
        f"export: {param_dtype} parameters are rounded to {dtype} in {out} "
        "(pass --dtype=float32 for an exact copy)"
      )
  ids = special_ids(tokenizer)
  score = model_cfg.head == "score"
  if src_cfg is not None and src_cfg.get("pad_token_id") is None and not score:
    ids.pop("pad_token_id", None)  # jft pads with eos; the source has none
  config = hf_config.config_to_hf(
    model_cfg, dtype=dtype, source=src_cfg, special_ids=ids
  )
  extra = {}
  if score:
    _check_score_pad(config, quiet)
  else:  # a sequence classifier does not generate
    gen = dict(src_gen or {})
    gen.update({k: v for k, v in ids.items() if v is not None})
    gen.setdefault("transformers_version", "4.45.0")
    extra[hf_config.GENERATION_CONFIG_FILE] = gen

  def write_tokenizer(tmp):
    if tokenizer is not None:
      tokenizer.save(tmp)

  writer.save_params(
    out,
    params,
    model_cfg,
    hf_config=config,
    dtype=dtype,
    max_shard_bytes=max_shard_bytes,
    extra_json=extra,
    after_write=write_tokenizer,
    overwrite=overwrite,
  )
  return out


def _check_score_pad(config: dict, quiet: bool) -> None:
  """A reward model's pad id: transformers' sequence classifiers read the
  score at each row's last token that is not `pad_token_id`; jft reads it
  at the last token (the eos). Without a pad id transformers refuses
  batches; with pad == eos it reads the token before a trailing eos."""
  pad, eos = config.get("pad_token_id"), config.get("eos_token_id")
  if pad is None:
    raise ValueError(
      "a reward model (head 'score') exports as a sequence classifier, "
      "which needs pad_token_id: pass the run's tokenizer (or a source "
      "config.json that has one)"
    )
  eos_ids = eos if isinstance(eos, list) else [eos]
  if pad in eos_ids and not quiet:
    print(
      f"export: pad_token_id {pad} is an eos id, so transformers' sequence "
      "classifier scores the token before a trailing eos, not the eos jft "
      "scores; give the tokenizer a pad token of its own"
    )


def _np(name: str):
  return weights.as_numpy_dtype(name)
