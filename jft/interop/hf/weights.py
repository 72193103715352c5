"""Hugging Face safetensors -> jft param trees, tensor by tensor.

Reads a Hub-style directory (`model.safetensors`, or shards
`model-0000X-of-0000Y.safetensors` + `model.safetensors.index.json`);
`writer.py` writes one back. `tensor_specs` is the name and layout map both
directions use.

Layout differences: HF `nn.Linear` stores [out, in], jft
kernels are [in, out] (transposed both ways); jft stacks layers on a leading
axis when `scan_layers`. RoPE needs no q/k permutation: HF checkpoints
already use the rotate-half convention jft implements.

Loading never builds the whole model as float on one host: each parameter
is assembled straight into its target sharding from the slices each device
needs (`jax.make_array_from_callback` over plain reads of the rows each
slice covers, `tensor_file.TensorFile`, not a memory map), and
kernels that QLoRA keeps in 4 bits are quantized layer by layer as they are
read, so peak host memory stays near the final size plus the largest
single parameter (`bench/load_memory.py` measures it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from jft.interop.hf.tensor_file import TensorFile
from jft.peft import quant

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Buffers some older exports carry; recomputed by every implementation.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

# jft Linear module (under a layer) -> HF module name (also PEFT's).
LINEAR_MODULES = {
  "attn/q": "self_attn.q_proj",
  "attn/k": "self_attn.k_proj",
  "attn/v": "self_attn.v_proj",
  "attn/o": "self_attn.o_proj",
  "mlp/gate": "mlp.gate_proj",
  "mlp/up": "mlp.up_proj",
  "mlp/down": "mlp.down_proj",
}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """Where one HF tensor lives in jft and how it is laid out."""

  path: str  # jft path under the layer prefix (or the root)
  layer: int | None  # None: not a per-layer tensor
  transpose: bool  # HF Linear [out, in] <-> jft kernel [in, out]
  hf_shape: tuple[int, ...]


def tensor_specs(cfg) -> dict[str, TensorSpec]:
  """HF tensor name -> spec for a jft `TransformerConfig`, in HF order.

  A reward model (`cfg.head == 'score'`) is a `*ForSequenceClassification`
  with one label: `score.weight` [1, D] (jft's `score/kernel` [D, 1]) takes
  the place of `lm_head.weight`, tied or not.
  """
  d, v, f = cfg.d_model, cfg.vocab_size, cfg.mlp_dim
  dh = cfg.head_dim
  q_dim, kv_dim = cfg.n_heads * dh, cfg.n_kv_heads * dh
  out_dims = {"attn/q": q_dim, "attn/k": kv_dim, "attn/v": kv_dim}
  out_dims.update({"attn/o": d, "mlp/gate": f, "mlp/up": f, "mlp/down": d})
  in_dims = {m: d for m in LINEAR_MODULES}
  in_dims.update({"attn/o": q_dim, "mlp/down": f})

  per_layer = [("input_layernorm.weight", "attn_norm/scale", False, (d,))]
  for m in ("attn/q", "attn/k", "attn/v"):
    hf = LINEAR_MODULES[m]
    per_layer.append((f"{hf}.weight", f"{m}/kernel", True, (out_dims[m], d)))
    if cfg.qkv_bias:
      per_layer.append((f"{hf}.bias", f"{m}/bias", False, (out_dims[m],)))
  if cfg.qk_norm:
    per_layer += [
      ("self_attn.q_norm.weight", "attn/q_norm/scale", False, (dh,)),
      ("self_attn.k_norm.weight", "attn/k_norm/scale", False, (dh,)),
    ]
  per_layer.append(
    ("self_attn.o_proj.weight", "attn/o/kernel", True, (d, q_dim))
  )
  if cfg.o_bias:
    per_layer.append(("self_attn.o_proj.bias", "attn/o/bias", False, (d,)))
  if cfg.sandwich_norm:  # Gemma 2/3: HF's post_attention_layernorm is post
    per_layer += [
      ("post_attention_layernorm.weight", "post_attn_norm/scale", False, (d,)),
      ("pre_feedforward_layernorm.weight", "mlp_norm/scale", False, (d,)),
      ("post_feedforward_layernorm.weight", "post_mlp_norm/scale", False, (d,)),
    ]
  else:
    per_layer.append(
      ("post_attention_layernorm.weight", "mlp_norm/scale", False, (d,))
    )
  for m in ("mlp/gate", "mlp/up", "mlp/down"):
    per_layer.append(
      (
        f"{LINEAR_MODULES[m]}.weight",
        f"{m}/kernel",
        True,
        (out_dims[m], in_dims[m]),
      )
    )
  specs = {
    "model.embed_tokens.weight": TensorSpec(
      "embed/embedding", None, False, (v, d)
    )
  }
  for i in range(cfg.n_layers):
    for name, path, transpose, shape in per_layer:
      specs[f"model.layers.{i}.{name}"] = TensorSpec(path, i, transpose, shape)
  specs["model.norm.weight"] = TensorSpec("final_norm/scale", None, False, (d,))
  if cfg.head == "score":  # *ForSequenceClassification: no LM head
    specs["score.weight"] = TensorSpec("score/kernel", None, True, (1, d))
  elif not cfg.tie_embeddings:
    specs["lm_head.weight"] = TensorSpec("lm_head/kernel", None, True, (v, d))
  return specs


def jft_path(spec: TensorSpec, scan_layers: bool) -> str:
  if spec.layer is None:
    return spec.path
  if scan_layers:
    return f"layers/{spec.path}"
  return f"layers_{spec.layer}/{spec.path}"


def leaf_specs(cfg) -> dict[str, list[tuple[str, TensorSpec]]]:
  """jft leaf path -> its HF tensors in layer order (one unless stacked)."""
  out: dict[str, list] = {}
  for name, spec in tensor_specs(cfg).items():
    out.setdefault(jft_path(spec, cfg.scan_layers), []).append((name, spec))
  return out


# ----------------------------------------------------------------- files


def tensor_files(path: str) -> dict[str, str]:
  """Tensor name -> file name, from the files' own headers.

  With an index json, the files it names are read and every tensor it
  lists must be in its file; otherwise `model.safetensors`, else every
  `*.safetensors` in the directory.
  """
  index = os.path.join(path, INDEX_FILE)
  if os.path.exists(index):
    with open(index, encoding="utf-8") as fh:
      weight_map = json.load(fh)["weight_map"]
    files = sorted(set(weight_map.values()))
  elif os.path.exists(os.path.join(path, WEIGHTS_FILE)):
    weight_map, files = None, [WEIGHTS_FILE]
  else:
    weight_map = None
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    files = [f for f in files if not f.startswith("adapter_model")]
    if not files:
      raise FileNotFoundError(f"no *.safetensors files in {path!r}")
  where = {}
  for file in files:
    full = os.path.join(path, file)
    if not os.path.exists(full):
      raise FileNotFoundError(f"{INDEX_FILE} names {file!r}, not in {path!r}")
    with TensorFile(full) as fh:
      names = fh.keys()
    for name in names:
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


def _listing(names: Sequence[str], where: Mapping[str, str], n=10) -> str:
  shown = [f"{x} ({where[x]})" if x in where else x for x in names[:n]]
  more = f" ... and {len(names) - n} more" if len(names) > n else ""
  return ", ".join(shown) + more


def _check_names(path, specs, where, cfg) -> bool:
  """Every needed tensor present, none unplaced; returns `tied_copy`."""
  missing = [n for n in specs if n not in where]
  if missing:
    raise ValueError(
      f"{path}: missing tensors {_listing(missing, where)} "
      f"(files: {sorted(set(where.values()))})"
    )
  extra = [n for n in where if n not in specs and not _IGNORED.fullmatch(n)]
  tied_copy = (
    cfg.tie_embeddings and cfg.head != "score" and "lm_head.weight" in where
  )
  if tied_copy:
    extra.remove("lm_head.weight")
  if extra:
    raise ValueError(
      f"{path}: unexpected tensors {_listing(sorted(extra), where)}; the "
      f"model config ({cfg.family}, head {cfg.head!r}, {cfg.n_layers} "
      f"layers, qkv_bias="
      f"{cfg.qkv_bias}, qk_norm={cfg.qk_norm}, tie_embeddings="
      f"{cfg.tie_embeddings}) has no place for them"
    )
  return tied_copy


def as_numpy_dtype(dtype) -> np.dtype:
  dt = jnp.dtype(dtype)
  return np.dtype(ml_dtypes.bfloat16) if dt == jnp.bfloat16 else np.dtype(dt)


class _Reader:
  """Open safetensors files; reads (slices of) jft leaves from them."""

  def __init__(self, path: str, where: Mapping[str, str], stack):
    self.path, self.where = path, where
    self.files = {
      f: stack.enter_context(TensorFile(os.path.join(path, f)))
      for f in sorted(set(where.values()))
    }

  def shape(self, name: str) -> tuple[int, ...]:
    return self.files[self.where[name]].shape(name)

  def hf_block(self, name: str, spec: TensorSpec, index, dtype, out=None):
    """The jft-layout slice `index` (over one layer's dims) of a tensor,
    cast to `dtype`, written into `out` when given (no temporaries beyond
    the raw rows read)."""
    file = self.files[self.where[name]]
    idx = tuple(index) or (slice(None),) * len(spec.hf_shape)
    if spec.transpose:
      arr = file.read(name, (idx[1], idx[0])).T  # [out, in] -> [in, out]
    else:
      arr = file.read(name, idx)
    if out is None:
      out = np.empty(arr.shape, dtype)
    out[...] = arr
    return out

  def leaf_block(self, tensors, stacked: bool, index, dtype) -> np.ndarray:
    """A slice of a (possibly stacked [L, ...]) jft leaf."""
    if not stacked:
      name, spec = tensors[0]
      return self.hf_block(name, spec, index, dtype)
    layers = range(len(tensors))[index[0]]
    first = self.hf_block(*tensors[layers[0]], index[1:], dtype)
    out = np.empty((len(layers), *first.shape), dtype)
    out[0] = first
    del first
    for j, i in enumerate(layers[1:], 1):
      self.hf_block(*tensors[i], index[1:], dtype, out=out[j])
    return out


def _full_index(shape) -> tuple[slice, ...]:
  return tuple(slice(0, n) for n in shape)


def _check_config_json(path: str, cfg) -> None:
  """Warns where config.json disagrees with `cfg` on non-shape numerics.

  Shapes are checked tensor by tensor; rope_theta / norm_eps would only
  show up as slightly wrong logits.
  """
  from jft.interop.hf import config as hf_config

  if not os.path.exists(os.path.join(path, hf_config.CONFIG_FILE)):
    return
  try:
    hf = hf_config.config_from_hf(hf_config.load_hf_config(path))
  except ValueError:
    return
  for key in ("rope_theta", "norm_eps"):
    if not np.isclose(hf[key], getattr(cfg, key), rtol=1e-6, atol=0):
      warnings.warn(
        f"{path}/{hf_config.CONFIG_FILE} has {key}={hf[key]}, the jft model "
        f"config {getattr(cfg, key)}; the model config is used",
        stacklevel=3,
      )


@dataclasses.dataclass(frozen=True)
class QuantPlan:
  """Which kernels to keep in 4 bits while loading, and how."""

  kernels: frozenset  # jft `.../kernel` paths
  kind: str
  block_size: int
  double_quant: bool


def load_params(
  path: str,
  model_cfg,
  *,
  shardings: Mapping[str, jax.sharding.Sharding] | None = None,
  quant_plan: QuantPlan | None = None,
) -> dict:
  """Param tree for `model_cfg` (a float base) from an HF safetensors dir.

  Every tensor the model needs must be present with its HF shape, and no
  other tensor may be (errors name tensor and file). A tied model accepts an
  `lm_head.weight` only if it equals the embedding (some exporters write the
  tied copy); rotary `inv_freq` buffers are skipped. Values are cast to
  `model_cfg.param_dtype` (bf16 files load).

  `shardings` (flat jft path -> sharding, for the leaves as returned) puts
  each leaf straight into place; without it leaves are host numpy arrays.
  With `quant_plan`, those kernels come back as 4-bit leaves
  (`X/kernel_packed`, `X/kernel_scale*`), quantized one layer at a time.
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"Hugging Face checkpoint dir {path!r} not found")
  _check_config_json(path, model_cfg)
  specs = tensor_specs(model_cfg)
  where = tensor_files(path)
  tied_copy = _check_names(path, specs, where, model_cfg)
  dtype = as_numpy_dtype(model_cfg.param_dtype)
  scan = model_cfg.scan_layers
  flat = {}
  with contextlib.ExitStack() as stack:
    reader = _Reader(path, where, stack)
    for name, spec in specs.items():
      got = reader.shape(name)
      if got != spec.hf_shape:
        raise ValueError(
          f"{path}/{where[name]}: tensor {name!r} has shape {got}, the "
          f"model config expects {spec.hf_shape}"
        )
    for leaf, tensors in leaf_specs(model_cfg).items():
      stacked = scan and tensors[0][1].layer is not None
      one = tensors[0][1]
      layer_shape = (
        (one.hf_shape[1], one.hf_shape[0]) if one.transpose else one.hf_shape
      )
      shape = ((len(tensors),) if stacked else ()) + layer_shape
      if quant_plan and leaf in quant_plan.kernels:
        q = _load_quantized(reader, tensors, stacked, quant_plan)
        for k, v in q.items():
          key = f"{leaf}_{k}"
          flat[key] = _place(v, (shardings or {}).get(key))
        continue

      def block(index, tensors=tensors, stacked=stacked):
        return reader.leaf_block(tensors, stacked, index, dtype)

      sharding = (shardings or {}).get(leaf)
      if sharding is None:
        flat[leaf] = block(_full_index(shape))
      else:
        flat[leaf] = jax.make_array_from_callback(shape, sharding, block)
    if tied_copy:
      _check_tied_copy(reader, flat["embed/embedding"], dtype)
  return traverse_util.unflatten_dict(flat, sep="/")


def _place(value: np.ndarray, sharding):
  if sharding is None:
    return value
  return jax.make_array_from_callback(value.shape, sharding, lambda i: value[i])


_quantize_jit = jax.jit(
  quant.quantize, static_argnames=("kind", "block_size", "double_quant")
)


def _load_quantized(reader, tensors, stacked, plan: QuantPlan) -> dict:
  """4-bit leaves of one kernel, quantized layer by layer into host arrays."""
  out = None
  for i, (name, spec) in enumerate(tensors):
    w = reader.hf_block(name, spec, (), np.float32)  # one layer [in, out]
    q = jax.device_get(
      _quantize_jit(
        w,
        kind=plan.kind,
        block_size=plan.block_size,
        double_quant=plan.double_quant,
      )
    )
    del w
    if not stacked:
      return {k: np.asarray(v) for k, v in q.items()}
    if out is None:
      out = {
        k: np.empty((len(tensors), *v.shape), v.dtype) for k, v in q.items()
      }
    for k, v in q.items():
      out[k][i] = v
  return out


def _check_tied_copy(reader, embedding, dtype) -> None:
  file = reader.where["lm_head.weight"]
  head = reader.files[file].read("lm_head.weight").astype(dtype)
  if not np.array_equal(head, np.asarray(jax.device_get(embedding))):
    raise ValueError(
      f"{reader.path}/{file}: tensor 'lm_head.weight' differs from the "
      "embedding, but the model config has tie_embeddings=True"
    )
