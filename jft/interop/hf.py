"""Hugging Face Llama / Qwen2 checkpoints <-> jft params (safetensors).

Reads a Hub-style directory (`config.json`, `model.safetensors` or shards
`model-0000X-of-0000Y.safetensors` + `model.safetensors.index.json`) into a
jft param tree, and writes one back that `transformers.AutoModelForCausalLM.
from_pretrained` reads. SmolLM / SmolLM2 are `model_type: llama`.

Layout differences handled here: HF `nn.Linear` stores [out, in], jft
kernels are [in, out] (transposed both ways); jft stacks layers on a leading
axis when `scan_layers`. RoPE needs no q/k permutation: HF Llama checkpoints
already use the rotate-half convention jft implements (tests check this
against an independent numpy forward).

Not implemented, so refused by `config_from_hf` unless asked to approximate:
RoPE scaling (Llama 3 `rope_type: llama3`, linear, dynamic, yarn, ...).
With `allow_rope_scaling=True` the weights load and jft runs plain RoPE:
logits are close to HF's on short sequences and drift on long ones.

CLI: `python -m jft.interop.hf export --workdir=RUN --out=DIR` writes a jft
run's latest checkpoint as an HF directory; `python -m jft.interop.hf flags
DIR` prints the `--config.model.*` flags that reproduce DIR's config.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import traverse_util
from safetensors import safe_open

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.model"
MAX_SHARD_BYTES = 2 * 1024**3  # HF's default `max_shard_size` is "5GB"

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# Buffers some older exports carry; recomputed by every implementation.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


@dataclasses.dataclass(frozen=True)
class _Spec:
  """Where one HF tensor lives in jft and how it is laid out."""

  path: str  # jft path under the layer prefix (or the root)
  layer: int | None  # None: not a per-layer tensor
  transpose: bool  # HF Linear [out, in] <-> jft kernel [in, out]
  hf_shape: tuple[int, ...]


def _specs(cfg) -> dict[str, _Spec]:
  """HF tensor name -> spec for a jft `TransformerConfig`, in HF order."""
  d, v, f = cfg.d_model, cfg.vocab_size, cfg.mlp_dim
  q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
  per_layer = [
    ("input_layernorm.weight", "attn_norm/scale", False, (d,)),
    ("self_attn.q_proj.weight", "attn/q/kernel", True, (q_dim, d)),
    ("self_attn.k_proj.weight", "attn/k/kernel", True, (kv_dim, d)),
    ("self_attn.v_proj.weight", "attn/v/kernel", True, (kv_dim, d)),
  ]
  if cfg.qkv_bias:
    per_layer += [
      ("self_attn.q_proj.bias", "attn/q/bias", False, (q_dim,)),
      ("self_attn.k_proj.bias", "attn/k/bias", False, (kv_dim,)),
      ("self_attn.v_proj.bias", "attn/v/bias", False, (kv_dim,)),
    ]
  per_layer += [
    ("self_attn.o_proj.weight", "attn/o/kernel", True, (d, q_dim)),
    ("post_attention_layernorm.weight", "mlp_norm/scale", False, (d,)),
    ("mlp.gate_proj.weight", "mlp/gate/kernel", True, (f, d)),
    ("mlp.up_proj.weight", "mlp/up/kernel", True, (f, d)),
    ("mlp.down_proj.weight", "mlp/down/kernel", True, (d, f)),
  ]
  embed = _Spec("embed/embedding", None, False, (v, d))
  specs = {"model.embed_tokens.weight": embed}
  for i in range(cfg.n_layers):
    for name, path, transpose, shape in per_layer:
      specs[f"model.layers.{i}.{name}"] = _Spec(path, i, transpose, shape)
  specs["model.norm.weight"] = _Spec("final_norm/scale", None, False, (d,))
  if not cfg.tie_embeddings:
    specs["lm_head.weight"] = _Spec("lm_head/kernel", None, True, (v, d))
  return specs


def _jft_path(spec: _Spec, scan_layers: bool) -> str:
  if spec.layer is None:
    return spec.path
  if scan_layers:
    return f"layers/{spec.path}"
  return f"layers_{spec.layer}/{spec.path}"


# ----------------------------------------------------------------- config


def load_hf_config(path: str) -> dict:
  """The `config.json` of an HF checkpoint directory, as a dict."""
  file = os.path.join(path, CONFIG_FILE)
  if not os.path.exists(file):
    raise FileNotFoundError(f"no {CONFIG_FILE} in Hugging Face dir {path!r}")
  with open(file) as fh:
    return json.load(fh)


def _rope_type(hf_config: Mapping) -> str:
  """'default' or the name of the RoPE scaling the checkpoint uses.

  transformers < 5 writes `rope_scaling` (None for plain RoPE), >= 5 writes
  `rope_parameters` (with `rope_type: default` for plain RoPE).
  """
  for key in ("rope_scaling", "rope_parameters"):
    scaling = hf_config.get(key)
    if scaling:
      kind = scaling.get("rope_type", scaling.get("type", "default"))
      if kind != "default":
        return kind
  return "default"


def config_from_hf(
  hf_config: Mapping, *, allow_rope_scaling: bool = False
) -> dict:
  """jft `TransformerConfig` fields (for `config_from_dict`) from config.json.

  Raises ValueError for a `model_type` other than llama / qwen2 and for
  features jft's model lacks (an o_proj or MLP bias, a non-SiLU MLP, sliding
  window attention). RoPE scaling (e.g. Llama 3's `rope_type: llama3`) is a
  ValueError too unless `allow_rope_scaling=True`, which only warns: jft then
  runs plain RoPE, so logits drift from HF's on long sequences.
  """
  model_type = hf_config.get("model_type")
  if model_type not in _ARCHITECTURES:
    raise ValueError(
      f"config.json: model_type {model_type!r} is not supported; jft reads "
      f"{sorted(_ARCHITECTURES)} (SmolLM is 'llama')"
    )
  act = hf_config.get("hidden_act", "silu")
  if act != "silu":
    raise ValueError(f"config.json: hidden_act {act!r}; jft's MLP is SwiGLU")
  if hf_config.get("mlp_bias"):
    raise ValueError("config.json: mlp_bias=true is not supported")
  if model_type == "llama" and hf_config.get("attention_bias"):
    # HF Llama's attention_bias also puts a bias on o_proj; jft has none.
    raise ValueError(
      "config.json: attention_bias=true (q/k/v *and* o_proj biases) is not "
      "supported; jft supports q/k/v biases only (Qwen2)"
    )
  if hf_config.get("use_sliding_window"):
    raise ValueError("config.json: use_sliding_window=true is not supported")
  rope = _rope_type(hf_config)
  if rope != "default":
    msg = (
      f"config.json: RoPE scaling {rope!r} is not implemented in jft; "
      "its plain RoPE makes logits drift from the original model's, more so "
      "on long sequences"
    )
    if not allow_rope_scaling:
      raise ValueError(
        msg + ". Pass allow_rope_scaling=True (in a jft run: name the model "
        "shape with --config.model.preset or model fields) to load anyway."
      )
    warnings.warn(msg, stacklevel=2)
  n_heads = hf_config["num_attention_heads"]
  theta = hf_config.get("rope_theta")
  if theta is None:
    theta = (hf_config.get("rope_parameters") or {}).get("rope_theta", 1e4)
  return dict(
    vocab_size=int(hf_config["vocab_size"]),
    d_model=int(hf_config["hidden_size"]),
    n_layers=int(hf_config["num_hidden_layers"]),
    n_heads=int(n_heads),
    n_kv_heads=int(hf_config.get("num_key_value_heads") or n_heads),
    head_dim=int(
      hf_config.get("head_dim") or hf_config["hidden_size"] // n_heads
    ),
    mlp_dim=int(hf_config["intermediate_size"]),
    rope_theta=float(theta),
    norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
    qkv_bias=model_type == "qwen2" or bool(hf_config.get("attention_bias")),
    tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
  )


def model_config_dict(path: str, overrides: Mapping) -> dict:
  """`config.model` dict for a run with `init='hf:PATH'` and no preset.

  Fields come from PATH's config.json; those set (not None) in `overrides`
  (the run's `config.model`, e.g. dtype or remat) win.
  """
  d = config_from_hf(load_hf_config(path))
  d.update({k: v for k, v in overrides.items() if v is not None})
  d["preset"] = ""
  return d


def config_to_hf(
  cfg, *, dtype: str, max_position_embeddings: int = 4096
) -> dict:
  """HF config.json for a jft config: Qwen2 when it has q/k/v biases."""
  if not cfg.causal:
    raise ValueError("only causal (decoder) models export to Llama / Qwen2")
  model_type = "qwen2" if cfg.qkv_bias else "llama"
  d = dict(
    architectures=[_ARCHITECTURES[model_type]],
    model_type=model_type,
    vocab_size=cfg.vocab_size,
    hidden_size=cfg.d_model,
    intermediate_size=cfg.mlp_dim,
    num_hidden_layers=cfg.n_layers,
    num_attention_heads=cfg.n_heads,
    num_key_value_heads=cfg.n_kv_heads,
    head_dim=cfg.head_dim,
    hidden_act="silu",
    max_position_embeddings=max_position_embeddings,
    rms_norm_eps=cfg.norm_eps,
    rope_theta=cfg.rope_theta,
    rope_scaling=None,
    tie_word_embeddings=cfg.tie_embeddings,
    attention_dropout=0.0,
    initializer_range=0.02,
    use_cache=True,
    torch_dtype=dtype,
  )
  if model_type == "llama":
    d.update(attention_bias=False, mlp_bias=False)
  else:
    d.update(use_sliding_window=False, sliding_window=None)
  return d


# ----------------------------------------------------------------- import


def _tensor_files(path: str) -> dict[str, str]:
  """Tensor name -> file name, from the files' own headers.

  With an index json, the files it names are read and every tensor it
  lists must be in its file; otherwise `model.safetensors`, else every
  `*.safetensors` in the directory.
  """
  index = os.path.join(path, INDEX_FILE)
  if os.path.exists(index):
    with open(index) as fh:
      weight_map = json.load(fh)["weight_map"]
    files = sorted(set(weight_map.values()))
  elif os.path.exists(os.path.join(path, WEIGHTS_FILE)):
    weight_map, files = None, [WEIGHTS_FILE]
  else:
    weight_map = None
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
      raise FileNotFoundError(f"no *.safetensors files in {path!r}")
  where = {}
  for file in files:
    full = os.path.join(path, file)
    if not os.path.exists(full):
      raise FileNotFoundError(f"{INDEX_FILE} names {file!r}, not in {path!r}")
    with safe_open(full, framework="numpy") as fh:
      for name in fh.keys():  # noqa: SIM118 (safe_open is not a dict)
        if name in where:
          raise ValueError(
            f"tensor {name!r} is in both {where[name]} and {file} ({path})"
          )
        where[name] = file
  for name, file in (weight_map or {}).items():
    if where.get(name) != file:
      raise ValueError(
        f"{INDEX_FILE} puts tensor {name!r} in {file}, which lacks it ({path})"
      )
  return where


def _check_config_json(path: str, cfg) -> None:
  """Warns where config.json disagrees with `cfg` on non-shape numerics.

  Shapes are checked tensor by tensor; rope_theta / norm_eps would only
  show up as slightly wrong logits.
  """
  if not os.path.exists(os.path.join(path, CONFIG_FILE)):
    return
  hf = config_from_hf(load_hf_config(path), allow_rope_scaling=True)
  for key in ("rope_theta", "norm_eps"):
    if not np.isclose(hf[key], getattr(cfg, key), rtol=1e-6, atol=0):
      warnings.warn(
        f"{path}/{CONFIG_FILE} has {key}={hf[key]}, the jft model config "
        f"{getattr(cfg, key)}; the model config is used",
        stacklevel=3,
      )


def _listing(names: Sequence[str], where: Mapping[str, str], n=10) -> str:
  shown = [f"{x} ({where[x]})" if x in where else x for x in names[:n]]
  more = f" ... and {len(names) - n} more" if len(names) > n else ""
  return ", ".join(shown) + more


def load_params(path: str, model_cfg) -> dict:
  """Host numpy param tree for `model_cfg` from an HF safetensors dir.

  Every tensor the model needs must be present with its HF shape, and no
  other tensor may be (errors name tensor and file). A tied model accepts an
  `lm_head.weight` only if it equals the embedding (some exporters write the
  tied copy); rotary `inv_freq` buffers are skipped. Values are cast to
  `model_cfg.param_dtype` (bf16 files load).
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"Hugging Face checkpoint dir {path!r} not found")
  _check_config_json(path, model_cfg)
  specs = _specs(model_cfg)
  where = _tensor_files(path)
  missing = [n for n in specs if n not in where]
  if missing:
    raise ValueError(
      f"{path}: missing tensors {_listing(missing, where)} "
      f"(files: {sorted(set(where.values()))})"
    )
  extra = [n for n in where if n not in specs and not _IGNORED.fullmatch(n)]
  tied_copy = model_cfg.tie_embeddings and "lm_head.weight" in where
  if tied_copy:
    extra.remove("lm_head.weight")
  if extra:
    raise ValueError(
      f"{path}: unexpected tensors {_listing(sorted(extra), where)}; the "
      f"model config ({model_cfg.n_layers} layers, qkv_bias="
      f"{model_cfg.qkv_bias}, tie_embeddings={model_cfg.tie_embeddings}) "
      "has no place for them"
    )
  dtype = jnp.dtype(model_cfg.param_dtype)
  n_layers, scan = model_cfg.n_layers, model_cfg.scan_layers
  flat: dict[str, np.ndarray] = {}
  with contextlib.ExitStack() as stack:
    handles = {
      f: stack.enter_context(
        safe_open(os.path.join(path, f), framework="numpy")
      )
      for f in sorted(set(where.values()))
    }
    for name, spec in specs.items():
      handle = handles[where[name]]
      shape = tuple(handle.get_slice(name).get_shape())
      if shape != spec.hf_shape:
        raise ValueError(
          f"{path}/{where[name]}: tensor {name!r} has shape {shape}, the "
          f"model config expects {spec.hf_shape}"
        )
      arr = handle.get_tensor(name)
      arr = (arr.T if spec.transpose else arr).astype(dtype)
      key = _jft_path(spec, scan)
      if spec.layer is not None and scan:
        if key not in flat:
          flat[key] = np.empty((n_layers, *arr.shape), dtype)  # [L, ...]
        flat[key][spec.layer] = arr
      else:
        flat[key] = np.ascontiguousarray(arr)
    if tied_copy:
      file = where["lm_head.weight"]
      head = handles[file].get_tensor("lm_head.weight").astype(dtype)
      if not np.array_equal(head, flat["embed/embedding"]):
        raise ValueError(
          f"{path}/{file}: tensor 'lm_head.weight' differs from the "
          "embedding, but the model config has tie_embeddings=True"
        )
  return traverse_util.unflatten_dict(flat, sep="/")


# ----------------------------------------------------------------- export


def _flat_params(params: Mapping) -> dict[str, object]:
  import flax

  params = flax.linen.unbox(params)
  return traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")


def _fsync(file: str) -> None:
  fd = os.open(file, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _plan_shards(
  specs: Mapping[str, _Spec], itemsize: Mapping[str, int], max_bytes: int
) -> list[list[str]]:
  """Consecutive tensors packed greedily into files of <= max_bytes."""
  shards, size = [[]], 0
  for name, spec in specs.items():
    n = int(np.prod(spec.hf_shape)) * itemsize[name]
    if shards[-1] and size + n > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += n
  return shards


def save_params(
  path: str,
  params: Mapping,
  model_cfg,
  *,
  dtype: str | None = "bfloat16",
  max_shard_bytes: int = MAX_SHARD_BYTES,
  extra_files: Mapping[str, str] | None = None,
  hf_config_overrides: Mapping | None = None,
  overwrite: bool = False,
) -> None:
  """Writes `params` as an HF Llama / Qwen2 checkpoint directory.

  `dtype=None` keeps each param's dtype. Files over `max_shard_bytes` are
  split into `model-0000X-of-0000Y.safetensors` + index json, as
  `save_pretrained` does. `extra_files` maps names in `path` to files to
  copy there (a tokenizer). Everything is written to a temporary sibling
  directory first and renamed into place, so a crash never leaves a
  half-written export that looks complete. An existing non-empty `path`
  needs `overwrite=True`.
  Params the HF model has no place for (e.g. unmerged LoRA factors or
  quantized kernels) raise, listed.
  """
  flat = _flat_params(params)
  specs = _specs(model_cfg)
  scan = model_cfg.scan_layers
  wanted = {_jft_path(s, scan) for s in specs.values()}
  extra = sorted(set(flat) - wanted)
  if extra:
    raise ValueError(
      f"params {extra[:10]} have no Hugging Face tensor (merge LoRA "
      "adapters / dequantize first)"
    )
  missing = sorted(wanted - set(flat))
  if missing:
    raise ValueError(f"params lack {missing[:10]} for {model_cfg}")

  def tensor(name: str) -> np.ndarray:
    spec = specs[name]
    arr = np.asarray(jax.device_get(flat[_jft_path(spec, scan)]))
    if spec.layer is not None and scan:
      arr = arr[spec.layer]
    arr = arr.T if spec.transpose else arr
    if arr.shape != spec.hf_shape:
      raise ValueError(
        f"param {_jft_path(spec, scan)} gives {name!r} shape {arr.shape}, "
        f"the model config expects {spec.hf_shape}"
      )
    out_dtype = arr.dtype if dtype is None else jnp.dtype(dtype)
    return np.ascontiguousarray(arr.astype(out_dtype))

  itemsize = {
    n: (
      np.dtype(flat[_jft_path(s, scan)].dtype)
      if dtype is None
      else jnp.dtype(dtype)
    ).itemsize
    for n, s in specs.items()
  }
  shards = _plan_shards(specs, itemsize, max_shard_bytes)
  dtype_name = str(
    jnp.dtype(dtype if dtype is not None else model_cfg.param_dtype)
  )
  hf_config = config_to_hf(model_cfg, dtype=dtype_name)
  hf_config.update(hf_config_overrides or {})

  path = os.path.abspath(path)
  if os.path.exists(path) and not overwrite:
    if not os.path.isdir(path) or os.listdir(path):
      raise FileExistsError(f"{path!r} exists; pass overwrite=True")
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
  try:
    weight_map, total = {}, 0
    for k, names in enumerate(shards):
      file = (
        WEIGHTS_FILE
        if len(shards) == 1
        else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
      )
      tensors = {n: tensor(n) for n in names}
      safetensors.numpy.save_file(
        tensors, os.path.join(tmp, file), metadata={"format": "pt"}
      )
      _fsync(os.path.join(tmp, file))
      total += sum(t.nbytes for t in tensors.values())
      weight_map.update(dict.fromkeys(names, file))
      del tensors
    if len(shards) > 1:
      with open(os.path.join(tmp, INDEX_FILE), "w") as fh:
        json.dump(
          {"metadata": {"total_size": total}, "weight_map": weight_map},
          fh,
          indent=2,
        )
    with open(os.path.join(tmp, CONFIG_FILE), "w") as fh:
      json.dump(hf_config, fh, indent=2)
    for name, src in (extra_files or {}).items():
      shutil.copyfile(src, os.path.join(tmp, name))
    if os.path.exists(path):
      old = tmp + ".old"
      os.rename(path, old)
      os.rename(tmp, path)
      shutil.rmtree(old)
    else:
      os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


# -------------------------------------------------------------------- CLI


def _run_tokenizer(workdir: str, run_config: Mapping) -> str | None:
  """The tokenizer a jft run used, in `jft.data.sources` order."""
  data = run_config.get("data", {})
  init = run_config.get("init", "") or ""
  candidates = [
    data.get("tokenizer") or None,
    os.path.join(init, TOKENIZER_FILE)
    if init and not init.startswith("hf:")
    else None,
    os.path.join(init[3:], TOKENIZER_FILE) if init.startswith("hf:") else None,
    os.path.join(workdir, TOKENIZER_FILE),
  ]
  return next((c for c in candidates if c and os.path.exists(c)), None)


def export_run(
  workdir: str,
  out: str,
  *,
  step: int | None = None,
  dtype: str | None = "bfloat16",
  max_shard_bytes: int = MAX_SHARD_BYTES,
  overwrite: bool = False,
) -> str:
  """Writes a jft run's checkpoint (latest or `step`) as an HF dir."""
  import ml_collections

  from jft import checkpoint, sharding
  from jft.data.tokenizer import Tokenizer
  from jft.models import transformer

  with open(os.path.join(workdir, CONFIG_FILE)) as fh:
    run_config = json.load(fh)
  model_cfg = transformer.config_from_dict(run_config["model"])
  mesh = sharding.make_mesh(
    ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  )
  params = checkpoint.load_params(workdir, mesh, step)
  if model_cfg.lora_rank or model_cfg.quant_kind:  # export the merged model
    from jft.peft import lora

    params = jax.tree.map(np.asarray, lora.merge(params, model_cfg))
    model_cfg = lora.base_config(model_cfg)
  tok_path = _run_tokenizer(workdir, run_config)
  overrides = {}
  if tok_path:
    tok = Tokenizer.load(tok_path)
    overrides = dict(
      bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id
    )
  else:
    warnings.warn(f"no tokenizer found for run {workdir!r}", stacklevel=2)
  save_params(
    out,
    params,
    model_cfg,
    dtype=dtype,
    max_shard_bytes=max_shard_bytes,
    extra_files={TOKENIZER_FILE: tok_path} if tok_path else None,
    hf_config_overrides=overrides,
    overwrite=overwrite,
  )
  return out


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
    prog="python -m jft.interop.hf", description=__doc__.split("\n")[0]
  )
  sub = parser.add_subparsers(dest="command", required=True)
  exp = sub.add_parser("export", help="jft run checkpoint -> HF directory")
  exp.add_argument("--workdir", required=True, help="jft run directory")
  exp.add_argument("--out", required=True, help="HF directory to write")
  exp.add_argument("--step", type=int, default=None, help="default: latest")
  exp.add_argument(
    "--dtype",
    default="bfloat16",
    choices=["bfloat16", "float16", "float32", "keep"],
  )
  exp.add_argument("--max_shard_gb", type=float, default=2.0)
  exp.add_argument("--overwrite", action="store_true")
  flg = sub.add_parser("flags", help="print --config.model.* for an HF dir")
  flg.add_argument("dir")
  flg.add_argument("--allow_rope_scaling", action="store_true")
  args = parser.parse_args(argv)
  if args.command == "export":
    export_run(
      args.workdir,
      args.out,
      step=args.step,
      dtype=None if args.dtype == "keep" else args.dtype,
      max_shard_bytes=int(args.max_shard_gb * 1024**3),
      overwrite=args.overwrite,
    )
    print(f"wrote {args.out}")
  else:
    fields = config_from_hf(
      load_hf_config(args.dir), allow_rope_scaling=args.allow_rope_scaling
    )
    flags = ["--config.model.preset="]
    flags += [f"--config.model.{k}={v}" for k, v in fields.items()]
    print(" ".join(flags))


if __name__ == "__main__":
  main(sys.argv[1:])
