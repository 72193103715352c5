"""Hugging Face `config.json` <-> jft `TransformerConfig` fields.

Families: `llama` (Llama 1-3.x, SmolLM), `mistral`, `qwen2`, `qwen3`,
`gemma`, `gemma2`, `gemma3_text`. Both spellings found in the wild are read:
top-level `rope_theta` / `rope_scaling` (transformers 4 and most Hub
checkpoints; Gemma 3 adds `rope_local_base_freq`) and `rope_parameters`
(transformers 5; nested per layer type for Gemma 3). A key that is absent
takes the default of that family's transformers config class, as
transformers itself would; an explicit null keeps its meaning (e.g.
`sliding_window: null` = no window). Anything jft does not implement fails
naming the field.

Exports use the transformers 4 spelling, which both major versions read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from jft.models import rope
from jft.models.presets import FAMILY_TRAITS

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"

# model_type -> jft family
MODEL_TYPES = {
  "llama": "llama",
  "mistral": "mistral",
  "qwen2": "qwen2",
  "qwen3": "qwen3",
  "gemma": "gemma",
  "gemma2": "gemma2",
  "gemma3_text": "gemma3",
}
ARCHITECTURES = {
  "llama": "LlamaForCausalLM",
  "mistral": "MistralForCausalLM",
  "qwen2": "Qwen2ForCausalLM",
  "qwen3": "Qwen3ForCausalLM",
  "gemma": "GemmaForCausalLM",
  "gemma2": "Gemma2ForCausalLM",
  "gemma3": "Gemma3ForCausalLM",
}
# Reward models (jft head 'score'): one-label sequence classifiers.
SEQ_CLS_ARCHITECTURES = {
  "llama": "LlamaForSequenceClassification",
  "mistral": "MistralForSequenceClassification",
  "qwen2": "Qwen2ForSequenceClassification",
  "qwen3": "Qwen3ForSequenceClassification",
  "gemma": "GemmaForSequenceClassification",
  "gemma2": "Gemma2ForSequenceClassification",
  "gemma3": "Gemma3TextForSequenceClassification",
}
_MODEL_TYPE = {v: k for k, v in MODEL_TYPES.items()}

# Defaults of transformers' config classes for keys a config.json may omit.
_COMMON = dict(
  rms_norm_eps=1e-6,
  rope_theta=10000.0,
  tie_word_embeddings=False,
  head_dim=None,
  attention_bias=False,
  mlp_bias=False,
  hidden_act="silu",
)
_GEMMA = dict(_COMMON, head_dim=256, tie_word_embeddings=True)
DEFAULTS = {
  "llama": dict(_COMMON, max_position_embeddings=2048),
  "mistral": dict(
    _COMMON, max_position_embeddings=4096 * 32, sliding_window=4096
  ),
  "qwen2": dict(
    _COMMON,
    max_position_embeddings=32768,
    use_sliding_window=False,
    sliding_window=4096,
    max_window_layers=28,
  ),
  "qwen3": dict(
    _COMMON,
    head_dim=128,
    max_position_embeddings=32768,
    use_sliding_window=False,
    sliding_window=4096,
    max_window_layers=28,
  ),
  "gemma": dict(
    _GEMMA, max_position_embeddings=8192, hidden_act="gelu_pytorch_tanh"
  ),
  "gemma2": dict(
    _GEMMA,
    max_position_embeddings=8192,
    hidden_activation="gelu_pytorch_tanh",
    query_pre_attn_scalar=256,
    sliding_window=4096,
    final_logit_softcapping=30.0,
    attn_logit_softcapping=50.0,
  ),
  "gemma3": dict(
    _GEMMA,
    max_position_embeddings=131072,
    hidden_activation="gelu_pytorch_tanh",
    query_pre_attn_scalar=256,
    sliding_window=4096,
    final_logit_softcapping=None,
    rope_theta=1_000_000.0,
    rope_local_base_freq=10_000.0,
    sliding_window_pattern=6,
  ),
}


def load_hf_config(path: str) -> dict:
  """The `config.json` of an HF checkpoint directory, as a dict."""
  file = os.path.join(path, CONFIG_FILE)
  if not os.path.exists(file):
    raise FileNotFoundError(f"no {CONFIG_FILE} in Hugging Face dir {path!r}")
  with open(file, encoding="utf-8") as fh:
    try:
      return json.load(fh)
    except json.JSONDecodeError as e:
      raise ValueError(f"{file}: not valid JSON ({e})") from None


def family_of(hf: Mapping, where: str = CONFIG_FILE) -> str:
  model_type = hf.get("model_type")
  if model_type == "gemma3" or "text_config" in hf:
    raise ValueError(
      f"{where}: model_type {model_type!r} is a multimodal checkpoint; jft "
      "reads text models (for Gemma 3: model_type 'gemma3_text', e.g. "
      "gemma-3-1b)"
    )
  if model_type not in MODEL_TYPES:
    raise ValueError(
      f"{where}: model_type {model_type!r} is not supported; jft reads "
      f"{sorted(MODEL_TYPES)} (SmolLM is 'llama')"
    )
  return MODEL_TYPES[model_type]


def _getter(hf: Mapping, family: str):
  """`get(key)`: the config's value (null included) or the family default."""
  defaults = DEFAULTS[family]

  def get(key, fallback=None):
    if key in hf:
      return hf[key]
    return defaults.get(key, fallback)

  return get


def _with_original_max(d: dict | None, get) -> dict | None:
  """llama3 / yarn: `original_max_position_embeddings` defaults as HF's."""
  if not d:
    return d
  d = dict(d)
  kind = d.get("rope_type", d.get("type"))
  if kind in ("llama3", "yarn") and "original_max_position_embeddings" not in d:
    d["original_max_position_embeddings"] = get(
      "original_max_position_embeddings"
    ) or get("max_position_embeddings")
  return d


def _rope_fields(hf: Mapping, family: str, get, where: str) -> dict:
  """rope_theta, rope_scaling and (Gemma 3) rope_local_theta."""
  params = hf.get("rope_parameters")
  out = {}
  if family == "gemma3":
    if params and ("full_attention" in params or "sliding_attention" in params):
      full = params.get("full_attention") or {}
      local = params.get("sliding_attention") or {}
    else:  # transformers 4: rope_scaling applies to the global layers
      full = dict(hf.get("rope_scaling") or params or {})
      full.setdefault("rope_theta", get("rope_theta"))
      local = {"rope_theta": get("rope_local_base_freq")}
    local_kind = local.get("rope_type", local.get("type", "default"))
    if local_kind != "default":
      raise ValueError(
        f"{where}: RoPE scaling {local_kind!r} on sliding layers is not "
        "supported"
      )
    out["rope_local_theta"] = float(
      local.get("rope_theta") or get("rope_local_base_freq")
    )
    theta = full.get("rope_theta") or get("rope_theta")
    scaling = full
  else:
    scaling = hf.get("rope_scaling") or params or {}
    theta = (params or {}).get("rope_theta") or get("rope_theta")
  out["rope_theta"] = float(theta)
  out["rope_scaling"] = rope.from_hf(_with_original_max(scaling, get), where)
  return out


def _layer_types(hf: Mapping, family: str, get, n_layers: int, window):
  """Per-layer 'full' / 'sliding', as each family's config class derives."""
  if window is None:
    return ()
  given = hf.get("layer_types")
  if given:
    return tuple(
      "sliding" if t == "sliding_attention" else "full" for t in given
    )
  if family == "gemma2":
    every = 2
  elif family == "gemma3":
    every = hf.get("sliding_window_pattern") or hf.get(
      "_sliding_window_pattern", get("sliding_window_pattern")
    )
  elif family in ("qwen2", "qwen3"):
    first = get("max_window_layers")
    return tuple("sliding" if i >= first else "full" for i in range(n_layers))
  else:
    return ()  # Mistral: every layer slides
  return tuple(
    "full" if (i + 1) % every == 0 else "sliding" for i in range(n_layers)
  )


def _check_activation(hf, family, get, where):
  if family.startswith("gemma"):
    key = "hidden_act" if family == "gemma" else "hidden_activation"
    act = get(key)
    # Gemma 1's legacy "gelu" means the tanh approximation (as transformers).
    ok = (
      ("gelu_pytorch_tanh", "gelu")
      if family == "gemma"
      else ("gelu_pytorch_tanh",)
    )
    if act not in ok:
      raise ValueError(f"{where}: {key} {act!r}; jft's Gemma MLP is tanh GELU")
    return "gelu_tanh"
  act = get("hidden_act")
  if act != "silu":
    raise ValueError(f"{where}: hidden_act {act!r}; jft's MLP is SwiGLU")
  return "silu"


def config_from_hf(hf: Mapping, where: str = CONFIG_FILE) -> dict:
  """jft `TransformerConfig` fields (for `config_from_dict`) from config.json.

  Raises ValueError naming the field for anything jft's model lacks (an
  MLP bias, another activation, bidirectional attention, partial RoPE, an
  unknown RoPE scaling).
  """
  family = family_of(hf, where)
  get = _getter(hf, family)
  mlp_act = _check_activation(hf, family, get, where)
  if get("mlp_bias"):
    raise ValueError(f"{where}: mlp_bias=true is not supported")
  if get("use_bidirectional_attention"):
    raise ValueError(f"{where}: use_bidirectional_attention is not supported")
  for key in ("num_attention_heads", "hidden_size", "num_hidden_layers"):
    if key not in hf:
      raise ValueError(f"{where}: missing {key!r}")
  n_heads = int(hf["num_attention_heads"])
  n_layers = int(hf["num_hidden_layers"])
  head_dim = get("head_dim") or int(hf["hidden_size"]) // n_heads
  window = get("sliding_window")
  if family in ("qwen2", "qwen3") and not get("use_sliding_window"):
    window = None
  if family in ("llama", "gemma"):
    window = None
  fields = dict(FAMILY_TRAITS[family])
  fields.update(
    vocab_size=int(hf["vocab_size"]),
    d_model=int(hf["hidden_size"]),
    n_layers=n_layers,
    n_heads=n_heads,
    n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
    head_dim=int(head_dim),
    mlp_dim=int(hf["intermediate_size"]),
    mlp_act=mlp_act,
    max_position_embeddings=get("max_position_embeddings"),
    norm_eps=float(get("rms_norm_eps")),
    tie_embeddings=bool(get("tie_word_embeddings")),
    sliding_window=int(window) if window else None,
    layer_types=_layer_types(hf, family, get, n_layers, window),
    **_rope_fields(hf, family, get, where),
  )
  if family != "qwen2" and get("attention_bias"):
    fields.update(qkv_bias=True, o_bias=True)  # q/k/v *and* o_proj
  if family in ("gemma2", "gemma3"):
    fields["query_pre_attn_scalar"] = float(get("query_pre_attn_scalar"))
    cap = get("final_logit_softcapping")
    fields["final_softcap"] = float(cap) if cap else None
  if family == "gemma2":
    cap = get("attn_logit_softcapping")
    fields["attn_softcap"] = float(cap) if cap else None
  # Gemma 3's attention does not apply attn_logit_softcapping (transformers
  # keeps the field but never passes it on), so neither does jft.
  if _is_sequence_classifier(hf):
    labels = len(hf.get("id2label") or {}) or hf.get("num_labels", 2)
    if labels != 1:
      raise ValueError(
        f"{where}: a sequence classifier with {labels} labels; jft reads "
        "reward models (num_labels 1, head 'score')"
      )
    fields["head"] = "score"
  return fields


def _is_sequence_classifier(hf: Mapping) -> bool:
  return any(
    str(a).endswith("ForSequenceClassification")
    for a in hf.get("architectures") or ()
  )


def model_config_dict(path: str, overrides: Mapping) -> dict:
  """`config.model` dict for a run with `init='hf:PATH'`.

  Fields come from PATH's config.json; those set (not None) in `overrides`
  (e.g. dtype or remat) win.
  """
  d = config_from_hf(load_hf_config(path), os.path.join(path, CONFIG_FILE))
  d.update({k: v for k, v in overrides.items() if v is not None})
  d["preset"] = ""
  return d


def flags_for(fields: Mapping) -> list[str]:
  """`--config.model.K=V` flags that rebuild `fields` without the files."""
  out = ["--config.model.preset="]
  for k, v in fields.items():
    if isinstance(v, rope.RopeScaling):
      hf = v.to_hf()
      if hf is None:
        continue
      v = "'" + json.dumps(hf, separators=(",", ":")) + "'"
    elif isinstance(v, tuple):
      if not v:
        continue
      v = ",".join(v)
    elif v is None:
      continue
    out.append(f"--config.model.{k}={v}")
  return out


def config_to_hf(
  cfg,
  *,
  dtype: str,
  source: Mapping | None = None,
  special_ids: Mapping | None = None,
) -> dict:
  """HF config.json for a jft model config.

  `source` is the config.json the run started from, if any: its other
  fields (e.g. `initializer_range`, `bos_token_id`) are carried over, and
  jft's own fields (shape, RoPE, tie flag, window, dtype) overwrite them.
  `special_ids` (`bos_token_id`, `eos_token_id`, `pad_token_id`) come from
  the run's tokenizer.

  A reward model (`cfg.head == 'score'`) becomes the family's
  `*ForSequenceClassification` with one label (`num_labels`, and
  `id2label`/`label2id` as transformers writes them) and no LM head
  (`tie_word_embeddings` false). transformers reads its score at each row's
  last token that is not `pad_token_id`, so the pad id must be set and
  differ from eos for that token to be the eos jft reads.
  """
  if not cfg.causal:
    raise ValueError("only causal (decoder) models export to Hugging Face")
  family = cfg.family
  model_type = _MODEL_TYPE[family]
  d = {}
  if source and source.get("model_type") == model_type:
    drop = ("rope_parameters", "rope_scaling", "layer_types")
    if _is_sequence_classifier(source) and cfg.head != "score":
      drop += ("num_labels", "id2label", "label2id", "problem_type")
    d = {k: v for k, v in source.items() if k not in drop}
  score = cfg.head == "score"
  d.update(
    architectures=[(SEQ_CLS_ARCHITECTURES if score else ARCHITECTURES)[family]],
    model_type=model_type,
    vocab_size=cfg.vocab_size,
    hidden_size=cfg.d_model,
    intermediate_size=cfg.mlp_dim,
    num_hidden_layers=cfg.n_layers,
    num_attention_heads=cfg.n_heads,
    num_key_value_heads=cfg.n_kv_heads,
    head_dim=cfg.head_dim,
    rms_norm_eps=cfg.norm_eps,
    rope_theta=cfg.rope_theta,
    rope_scaling=cfg.rope_scaling.to_hf(),
    tie_word_embeddings=cfg.tie_embeddings,
    torch_dtype=dtype,  # transformers 4 reads this key,
    dtype=dtype,  # transformers 5 this one: both, so neither disagrees
  )
  if cfg.max_position_embeddings:
    d["max_position_embeddings"] = cfg.max_position_embeddings
  else:
    d.setdefault("max_position_embeddings", 4096)
  d.setdefault("initializer_range", 0.02)
  d.setdefault("attention_dropout", 0.0)
  d.setdefault("use_cache", True)
  if family.startswith("gemma"):
    key = "hidden_act" if family == "gemma" else "hidden_activation"
    d[key] = "gelu_pytorch_tanh"
  else:
    d["hidden_act"] = "silu"
  if family in ("llama", "mistral", "qwen3", "gemma", "gemma2", "gemma3"):
    if cfg.qkv_bias != cfg.o_bias:
      raise ValueError(
        f"{family} has one attention_bias flag for q/k/v and o; the model "
        f"has qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias}"
      )
    if family != "mistral":
      d["attention_bias"] = cfg.qkv_bias
    elif cfg.qkv_bias:
      raise ValueError("Mistral has no attention biases")
  if family == "llama":
    d["mlp_bias"] = False
  if family == "qwen2" and (not cfg.qkv_bias or cfg.o_bias):
    raise ValueError("Qwen2 has q/k/v biases and no o_proj bias")
  _window_fields(d, cfg)
  if family in ("gemma2", "gemma3"):
    qpas = cfg.query_pre_attn_scalar  # transformers types it as int
    d["query_pre_attn_scalar"] = int(qpas) if float(qpas).is_integer() else qpas
    d["final_logit_softcapping"] = cfg.final_softcap
    d["attn_logit_softcapping"] = cfg.attn_softcap
  if family == "gemma3":
    d["rope_local_base_freq"] = cfg.rope_local_theta or cfg.rope_theta
  if score:
    d.update(
      num_labels=1,
      id2label={"0": "LABEL_0"},
      label2id={"LABEL_0": 0},
      tie_word_embeddings=False,
    )
  d.update({k: v for k, v in (special_ids or {}).items() if v is not None})
  return d


def _window_fields(d: dict, cfg) -> None:
  """sliding_window / layer_types in each family's own spelling, the layer
  types always written out (an empty jft `layer_types` with a window means
  every layer slides, which no family's default would reproduce)."""
  family, window = cfg.family, cfg.sliding_window
  sliding = cfg.sliding_layers
  types = [("sliding" if s else "full") + "_attention" for s in sliding]
  if family == "mistral":
    if window is not None and not all(sliding):
      raise ValueError("Mistral slides on every layer or on none")
    d["sliding_window"] = window
  elif family in ("qwen2", "qwen3"):
    d["use_sliding_window"] = window is not None
    d["sliding_window"] = window
    if window is not None:
      d["layer_types"] = types
      d["max_window_layers"] = (
        sliding.index(True) if any(sliding) else (cfg.n_layers)
      )
  elif family in ("gemma2", "gemma3"):
    d["sliding_window"] = window
    d["layer_types"] = types
  elif window is not None:
    raise ValueError(f"{family} has no sliding-window attention")
