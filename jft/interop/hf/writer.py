"""Writing a Hugging Face checkpoint directory (safetensors + JSON files).

Tensors are laid out as `weights.tensor_specs` says (jft kernels [in, out]
become HF's [out, in], stacked layers are split), packed into shards like
`save_pretrained`'s, and the whole directory is written to a temporary
sibling and renamed into place, so a crash never leaves a half-written
export that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping

import flax
import jax
import numpy as np
import safetensors.numpy
from flax import traverse_util

from jft.interop.hf.weights import (
  INDEX_FILE,
  WEIGHTS_FILE,
  as_numpy_dtype,
  jft_path,
  tensor_specs,
)

MAX_SHARD_BYTES = 2 * 1024**3  # HF's default `max_shard_size` is "5GB"


def flat_params(params: Mapping) -> dict[str, object]:
  params = flax.linen.unbox(params)
  return traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")


def _fsync(file: str) -> None:
  fd = os.open(file, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def plan_shards(sizes: Mapping[str, int], max_bytes: int) -> list[list[str]]:
  """Consecutive tensors packed greedily into files of <= max_bytes."""
  shards, size = [[]], 0
  for name, n in sizes.items():
    if shards[-1] and size + n > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += n
  return shards


def write_dir_atomic(
  path: str, write: Callable[[str], None], *, overwrite: bool = False
) -> None:
  """Runs `write(tmp_dir)`, then renames tmp_dir to `path`.

  A crash never leaves a half-written directory that looks complete. An
  existing non-empty `path` needs `overwrite=True`.
  """
  path = os.path.abspath(path)
  if os.path.exists(path) and not overwrite:
    if not os.path.isdir(path) or os.listdir(path):
      raise FileExistsError(f"{path!r} exists; pass overwrite=True")
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
  try:
    write(tmp)
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


def save_params(
  path: str,
  params: Mapping,
  model_cfg,
  *,
  hf_config: Mapping,
  dtype: str | None = "bfloat16",
  max_shard_bytes: int = MAX_SHARD_BYTES,
  extra_json: Mapping[str, Mapping] | None = None,
  after_write: Callable[[str], None] | None = None,
  overwrite: bool = False,
) -> None:
  """Writes `params` as an HF checkpoint directory with `hf_config`.

  `dtype=None` keeps each param's dtype. Files over `max_shard_bytes` are
  split into `model-0000X-of-0000Y.safetensors` + index json, as
  `save_pretrained` does. `extra_json` maps file names to dicts to write
  (e.g. `generation_config.json`); `after_write(tmp_dir)` adds more files
  (the tokenizer's) before the directory is renamed into place. Params the
  HF model has no place for (e.g. unmerged LoRA factors or quantized
  kernels) raise, listed.
  """
  flat = flat_params(params)
  specs = tensor_specs(model_cfg)
  scan = model_cfg.scan_layers
  wanted = {jft_path(s, scan) for s in specs.values()}
  extra = sorted(set(flat) - wanted)
  if extra:
    raise ValueError(
      f"params {extra[:10]} have no Hugging Face tensor (merge LoRA "
      "adapters / dequantize first)"
    )
  missing = sorted(wanted - set(flat))
  if missing:
    raise ValueError(f"params lack {missing[:10]} for {model_cfg}")

  def out_dtype(name):
    src = flat[jft_path(specs[name], scan)].dtype
    return as_numpy_dtype(src if dtype is None else dtype)

  def tensor(name: str) -> np.ndarray:
    spec = specs[name]
    arr = np.asarray(jax.device_get(flat[jft_path(spec, scan)]))
    if spec.layer is not None and scan:
      arr = arr[spec.layer]
    arr = arr.T if spec.transpose else arr
    if arr.shape != spec.hf_shape:
      raise ValueError(
        f"param {jft_path(spec, scan)} gives {name!r} shape {arr.shape}, "
        f"the model config expects {spec.hf_shape}"
      )
    return np.ascontiguousarray(arr.astype(out_dtype(name)))

  sizes = {
    n: int(np.prod(s.hf_shape)) * out_dtype(n).itemsize
    for n, s in specs.items()
  }
  shards = plan_shards(sizes, max_shard_bytes)

  def write(tmp):
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
    docs = {"config.json": hf_config, **(extra_json or {})}
    for name, doc in docs.items():
      with open(os.path.join(tmp, name), "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=2)
    if after_write is not None:
      after_write(tmp)

  write_dir_atomic(path, write, overwrite=overwrite)
