"""Hugging Face checkpoints: parity with transformers itself, both ways.

Every family (Llama with each RoPE scaling, Mistral with a sliding window,
Qwen2, Qwen3, Gemma 1/2/3) is built small by transformers
(`tests/hf_models.py`), saved with `save_pretrained` in both config
spellings, read by jft, and compared with transformers' own logits and
greedy `generate`; jft's exports are read back by transformers.
"""

import dataclasses
import functools
import json
import os
import shlex
import sys

import hf_models
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from absl import flags
from ml_collections import config_flags

from jft import config as base_config
from jft import generate, sharding, train
from jft.interop import hf
from jft.interop.hf import __main__ as hf_cli
from jft.interop.hf import config as hf_config
from jft.models import rope, transformer
from jft.peft import quant
from jft.state import flat_paths

ATOL = 1e-4
TOKENS = np.random.default_rng(9).integers(3, hf_models.VOCAB, (2, 24))
FAMILY_CASES = [
  "llama",
  "mistral",
  "qwen2",
  "qwen3",
  "gemma",
  "gemma2",
  "gemma3",
]
ALL_CASES = list(hf_models.CASES)


@functools.cache
def _checkpoint(case: str, root: str):
  """(hf model, v5 dir, v4 dir) for a case, made once per session."""
  model = hf_models.make_model(case)
  v5 = hf_models.save(model, os.path.join(root, case, "v5"), "v5")
  v4 = hf_models.save(model, os.path.join(root, case, "v4"), "v4")
  return model, v5, v4


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return str(tmp_path_factory.mktemp("hf"))


@functools.cache
def _forward(cfg):
  model = transformer.Transformer(cfg)
  return jax.jit(lambda p, t: model.apply({"params": p}, t))


def _load(path, **overrides):
  fields = hf.config_from_hf(hf.load_hf_config(path))
  cfg = transformer.config_from_dict({**fields, **overrides})
  return cfg, hf.load_params(path, cfg)


def _logits(cfg, params, tokens=TOKENS):
  return np.asarray(_forward(cfg)(params, jnp.asarray(tokens)))


# What each case adds; switching it off must move the logits well past the
# tolerance, so the parity check could fail.
FEATURE_OFF = {
  "llama3": dict(rope_scaling=rope.DEFAULT),
  "linear": dict(rope_scaling=rope.DEFAULT),
  "dynamic": dict(rope_scaling=rope.DEFAULT),
  "yarn": dict(rope_scaling=rope.DEFAULT),
  "mistral": dict(sliding_window=None),
  "gemma2": dict(attn_softcap=None),
  "gemma3": dict(rope_local_theta=1000.0),
}


@pytest.mark.parametrize("case", ALL_CASES)
def test_import_matches_transformers(case, root):
  model, v5, v4 = _checkpoint(case, root)
  want = hf_models.hf_logits(model, TOKENS)
  cfg, params = _load(v5)
  got = _logits(cfg, params)
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
  # The transformers 4 spelling names the same model.
  cfg4, params4 = _load(v4)
  assert cfg4 == cfg
  jax.tree.map(np.testing.assert_array_equal, params4, params)
  again = transformers.AutoModelForCausalLM.from_pretrained(
    v4, attn_implementation="eager"
  )
  np.testing.assert_allclose(
    hf_models.hf_logits(again, TOKENS), want, atol=1e-6
  )
  if case in FEATURE_OFF:
    off = dataclasses.replace(cfg, **FEATURE_OFF[case])
    assert np.abs(_logits(off, params) - want).max() > 100 * ATOL


@pytest.mark.parametrize("case", FAMILY_CASES + ["llama3", "dynamic"])
def test_greedy_generation_matches_transformers(case, root):
  """Batched prompts of different lengths, left-padded on both sides."""
  _, v5, _ = _checkpoint(case, root)
  model = hf_models.make_model(case)  # fresh: dynamic RoPE keeps state
  cfg, params = _load(v5)
  rng = np.random.default_rng(1)
  prompts = [list(rng.integers(3, hf_models.VOCAB, n)) for n in (5, 11, 3)]
  longest = max(map(len, prompts))
  ids = [[0] * (longest - len(p)) + p for p in prompts]
  mask = [[0] * (longest - len(p)) + [1] * len(p) for p in prompts]
  with torch.no_grad():
    out = model.generate(
      input_ids=torch.tensor(ids),
      attention_mask=torch.tensor(mask),
      max_new_tokens=12,
      do_sample=False,
      pad_token_id=0,
      eos_token_id=2,
    )[:, longest:]
  apply_fn = train.make_apply_fn(transformer.Transformer(cfg))
  gen = generate.Generator(
    apply_fn, cfg, max_new=12, eos_ids=[2], pad_id=0, vocab_size=cfg.vocab_size
  )
  got = np.asarray(gen.generate(params, prompts))
  assert out.shape[1] > 3  # not all rows ended at once
  np.testing.assert_array_equal(got[:, : out.shape[1]], out.numpy())


def _perturbed(params, seed):
  """Params moved off the source checkpoint (as training would)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda x: (x + 0.05 * rng.standard_normal(x.shape)).astype(x.dtype),
    params,
  )


@pytest.mark.parametrize("case", FAMILY_CASES + ["llama3", "yarn"])
def test_export_loads_in_transformers(case, root, tmp_path):
  _, v5, _ = _checkpoint(case, root)
  cfg, params = _load(v5)
  params = _perturbed(params, seed=3)
  out = str(tmp_path / "export")
  hf.export_model(out, params, cfg, source=v5, dtype="float32")
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
    out, attn_implementation="eager"
  )
  np.testing.assert_allclose(
    hf_models.hf_logits(reloaded, TOKENS),
    _logits(cfg, params),
    atol=ATOL,
    rtol=0,
  )
  written, source = hf.load_hf_config(out), hf.load_hf_config(v5)
  for key in ("max_position_embeddings", "bos_token_id", "eos_token_id"):
    assert written[key] == source[key], key
  assert written["torch_dtype"] == "float32"
  # Read back by jft: the same config, the params bit for bit.
  cfg2, params2 = _load(out)
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_bf16_export_says_so_and_rounds(root, tmp_path, capsys):
  _, v5, _ = _checkpoint("qwen2", root)
  cfg, params = _load(v5)
  out = str(tmp_path / "bf16")
  hf.export_model(out, params, cfg, dtype="bfloat16", max_shard_bytes=6000)
  assert "rounded to bfloat16" in capsys.readouterr().out
  files = sorted(os.listdir(out))
  n = sum(f.startswith("model-") for f in files)
  assert n > 1 and hf.INDEX_FILE in files and "model.safetensors" not in files
  assert hf.load_hf_config(out)["torch_dtype"] == "bfloat16"
  with open(os.path.join(out, hf.INDEX_FILE)) as fh:
    index = json.load(fh)["weight_map"]
  name = "model.layers.1.mlp.up_proj.weight"
  got = safetensors.numpy.load_file(os.path.join(out, index[name]))[name]
  want = params["layers"]["mlp"]["up"]["kernel"][1].T
  np.testing.assert_array_equal(got, want.astype(ml_dtypes.bfloat16))


@pytest.mark.parametrize("case", ["qwen3", "gemma2"])
def test_sliding_windows_export_as_they_run(case, root, tmp_path):
  """Every layer sliding (jft's empty `layer_types` with a window) exports
  as every layer sliding, not as the family's default pattern."""
  _, v5, _ = _checkpoint(case, root)
  cfg, params = _load(v5)
  cfg = dataclasses.replace(cfg, sliding_window=4, layer_types=())
  assert cfg.sliding_layers == (True, True, True)
  out = str(tmp_path / "export")
  hf.export_model(out, params, cfg, source=v5, dtype="float32")
  theirs = transformers.AutoModelForCausalLM.from_pretrained(
    out, attn_implementation="eager"
  )
  np.testing.assert_allclose(
    hf_models.hf_logits(theirs, TOKENS), _logits(cfg, params), atol=ATOL
  )
  assert _load(out)[0].sliding_layers == cfg.sliding_layers


def test_export_dtype_keys_agree(root, tmp_path):
  """transformers 5 reads `dtype`, 4 reads `torch_dtype`: both say bf16."""
  _, v5, _ = _checkpoint("llama", root)
  assert hf.load_hf_config(v5).get("dtype") == "float32"
  cfg, params = _load(v5)
  out = str(tmp_path / "bf16")
  hf.export_model(out, params, cfg, source=v5, dtype="bfloat16", quiet=True)
  written = hf.load_hf_config(out)
  assert written["dtype"] == written["torch_dtype"] == "bfloat16"
  auto = transformers.AutoConfig.from_pretrained(out)
  assert str(auto.dtype).endswith("bfloat16")


def test_reads_loop_over_short_preads(root, monkeypatch):
  """The OS returns at most ~2 GB per read: every read must loop."""
  from jft.interop.hf import tensor_file

  _, v5, _ = _checkpoint("llama", root)
  cfg, want = _load(v5)
  real = os.preadv
  monkeypatch.setattr(
    tensor_file.os,
    "preadv",
    lambda fd, bufs, off: real(fd, [bufs[0][:5]], off),
  )
  jax.tree.map(np.testing.assert_array_equal, hf.load_params(v5, cfg), want)


def test_sharded_and_quantized_loading_equal_the_plain_path(root):
  """Straight into FSDP shardings, and QLoRA kernels quantized per layer
  while reading, give what loading then placing / quantizing gives."""
  _, v5, _ = _checkpoint("gemma2", root)
  cfg, host = _load(v5)
  mesh = sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1))
  model = transformer.Transformer(cfg)
  boxed = jax.eval_shape(
    lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
  )["params"]
  rules = (("embed", "fsdp"), ("mlp", None), ("heads", None), ("kv", None))
  rules += (("vocab", None), ("layers", None))
  flat = flat_paths(sharding.param_shardings(boxed, mesh, rules))
  placed = hf.load_params(v5, cfg, shardings=flat)
  assert placed["embed"]["embedding"].sharding == flat["embed/embedding"]
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
    placed,
    host,
  )
  kernels = {"layers/mlp/up/kernel", "layers/attn/q/kernel"}
  plan = hf.QuantPlan(frozenset(kernels), "nf4", 16, True)
  q = hf.load_params(v5, cfg, quant_plan=plan)
  want = quant.quantize_params(
    host, kernels, kind="nf4", block_size=16, double_quant=True
  )
  got, want = flat_paths(q), flat_paths(want)
  assert sorted(got) == sorted(want)
  for path, w in want.items():
    a, b = np.asarray(got[path]), np.asarray(w)
    if a.dtype.kind in "iu":  # the 4-bit and int8 codes: identical
      np.testing.assert_array_equal(a, b, err_msg=path)
    else:  # float scales: per-layer vs stacked reductions, 1 ulp apart
      np.testing.assert_allclose(a, b, rtol=1e-6, err_msg=path)


# ------------------------------------------------------------- config.json


def test_config_fields_and_both_spellings():
  llama3 = hf_models.hf_config("llama3").to_dict()
  got = hf.config_from_hf(llama3)
  assert got["rope_scaling"] == rope.RopeScaling(
    "llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,
  )
  assert (got["rope_theta"], got["max_position_embeddings"]) == (500.0, 64)
  # transformers 4 spelling, with the older `type` key.
  v4 = {k: v for k, v in llama3.items() if k != "rope_parameters"}
  v4.update(rope_theta=500.0, rope_scaling=dict(llama3["rope_parameters"]))
  v4["rope_scaling"]["type"] = v4["rope_scaling"].pop("rope_type")
  del v4["rope_scaling"]["rope_theta"]
  assert hf.config_from_hf(v4) == got
  gemma3 = hf.config_from_hf(hf_models.hf_config("gemma3").to_dict())
  assert gemma3["layer_types"] == ("sliding", "full", "sliding")
  assert gemma3["rope_local_theta"] == 100.0
  assert gemma3["rope_scaling"].kind == "linear"
  assert "attn_softcap" not in gemma3  # transformers ignores it there
  # Keys a config.json leaves out take the family class's default.
  mistral = {
    k: v
    for k, v in hf_models.hf_config("mistral").to_dict().items()
    if k != "sliding_window"
  }
  assert hf.config_from_hf(mistral)["sliding_window"] == 4096
  mistral["sliding_window"] = None  # explicit null: no window
  assert hf.config_from_hf(mistral)["sliding_window"] is None


@pytest.mark.parametrize(
  "change, match",
  [
    (dict(model_type="falcon"), "model_type 'falcon' is not supported"),
    (dict(model_type="gemma3", text_config={}), "multimodal"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(mlp_bias=True), "mlp_bias"),
    (
      dict(rope_parameters=dict(rope_type="longrope", rope_theta=1.0)),
      "'longrope' is not supported",
    ),
    (
      dict(
        rope_parameters=dict(
          rope_type="linear",
          factor=2.0,
          rope_theta=1.0,
          partial_rotary_factor=0.5,
        )
      ),
      "partial_rotary_factor",
    ),
    (
      dict(rope_parameters=dict(rope_type="linear", rope_theta=1.0, zeta=1)),
      r"field\(s\) \['zeta'\]",
    ),
  ],
)
def test_unsupported_config_names_the_field(change, match):
  c = {**hf_models.hf_config("llama").to_dict(), **change}
  with pytest.raises(ValueError, match=match):
    hf.config_from_hf(c, "DIR/config.json")


def test_flags_rebuild_the_config(root, capsys, monkeypatch):
  """The printed flags, parsed as `python -m jft.main` parses them."""
  _, v5, _ = _checkpoint("gemma3", root)
  hf_cli.main(["flags", v5])
  argv = shlex.split(capsys.readouterr().out)
  monkeypatch.setattr(sys, "argv", ["prog", *argv])  # config_flags reads it
  fv = flags.FlagValues()
  config_flags.DEFINE_config_dict(
    "config", base_config.base_config(), flag_values=fv, lock_config=True
  )
  fv(["prog", *argv])
  want = transformer.config_from_dict(hf.config_from_hf(hf.load_hf_config(v5)))
  assert transformer.config_from_dict(fv.config.model.to_dict()) == want


# ------------------------------------------------------------ tensor files


def _rewrite(path, file, fn):
  full = os.path.join(path, file)
  tensors = safetensors.numpy.load_file(full)
  fn(tensors)
  safetensors.numpy.save_file(tensors, full, metadata={"format": "pt"})


def test_load_errors_name_tensor_and_file(root, tmp_path):
  _, v5, _ = _checkpoint("llama", root)
  cfg, _ = _load(v5)
  import shutil

  def copy(name):
    return shutil.copytree(v5, tmp_path / name)

  path = copy("missing")
  name = "model.layers.1.mlp.up_proj.weight"
  _rewrite(path, "model.safetensors", lambda t: t.pop(name))
  with pytest.raises(ValueError, match=rf"missing tensors {name}"):
    hf.load_params(path, cfg)

  path = copy("extra")
  extra = "model.layers.0.self_attn.o_proj.bias"
  _rewrite(path, "model.safetensors", lambda t: t.update({extra: np.ones(32)}))
  with pytest.raises(
    ValueError, match=rf"unexpected tensors {extra} \(model.safetensors\)"
  ):
    hf.load_params(path, cfg)

  path = copy("shape")
  bad = "model.layers.0.self_attn.k_proj.weight"
  _rewrite(
    path, "model.safetensors", lambda t: t.update({bad: np.ones((8, 32))})
  )
  with pytest.raises(
    ValueError,
    match=rf"model.safetensors: tensor '{bad}' has shape \(8, 32\).*"
    r"expects \(16, 32\)",
  ):
    hf.load_params(path, cfg)

  path = copy("tied")  # a tied config refuses a real, different lm_head
  tied = dataclasses.replace(cfg, tie_embeddings=True)
  with pytest.raises(ValueError, match="'lm_head.weight' differs"):
    hf.load_params(path, tied)

  path = copy("corrupt")
  with open(os.path.join(path, "model.safetensors"), "wb") as fh:
    fh.write(b"not a safetensors file")
  with pytest.raises(ValueError, match="model.safetensors: not a safetensors"):
    hf.load_params(path, cfg)

  path = copy("truncated")  # a download cut short
  file = os.path.join(path, "model.safetensors")
  with open(file, "r+b") as fh:
    fh.truncate(os.path.getsize(file) - 100)
  with pytest.raises(ValueError, match="runs past the end of the file"):
    hf.load_params(path, cfg)


def test_save_is_atomic_and_refuses_to_clobber(root, tmp_path, monkeypatch):
  _, v5, _ = _checkpoint("llama", root)
  cfg, params = _load(v5)
  config = hf_config.config_to_hf(cfg, dtype="float32")
  real = safetensors.numpy.save_file
  calls = []

  def crash_on_second(*a, **k):
    calls.append(1)
    if len(calls) == 2:
      raise OSError("disk full")
    return real(*a, **k)

  monkeypatch.setattr(safetensors.numpy, "save_file", crash_on_second)
  out = tmp_path / "out"
  with pytest.raises(OSError, match="disk full"):
    hf.save_params(
      str(out), params, cfg, hf_config=config, max_shard_bytes=4000
    )
  assert not out.exists() and os.listdir(tmp_path) == []  # no temp dir left
  monkeypatch.setattr(safetensors.numpy, "save_file", real)
  hf.save_params(str(out), params, cfg, hf_config=config)
  with pytest.raises(FileExistsError, match="overwrite"):
    hf.save_params(str(out), params, cfg, hf_config=config)
  bad = {**params, "layers": {**params["layers"], "lora_a": np.zeros(3)}}
  with pytest.raises(ValueError, match="layers/lora_a"):
    hf.save_params(str(tmp_path / "x"), bad, cfg, hf_config=config)
