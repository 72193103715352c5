"""Hugging Face interop: HF-layout checkpoints written here, numpy forward.

The reference forward below is written from HF's Llama / Qwen2 modelling
code (RMSNorm, rotate-half RoPE, `repeat_kv`, SwiGLU, causal softmax) on the
HF tensors directly, so a wrong transpose, RoPE convention or head grouping
in `jft.interop.hf` shows up as different logits.
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from conftest import tiny_config

from jft import checkpoint, sharding, train
from jft.interop import hf
from jft.models import transformer

LLAMA = dict(
  architectures=["LlamaForCausalLM"],
  model_type="llama",
  vocab_size=64,
  hidden_size=32,
  intermediate_size=48,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  head_dim=16,  # != hidden_size / heads: the explicit field must be used
  hidden_act="silu",
  rms_norm_eps=1e-5,
  rope_theta=10000.0,
  rope_scaling=None,
  tie_word_embeddings=False,
  attention_bias=False,
)
QWEN2 = dict(
  architectures=["Qwen2ForCausalLM"],
  model_type="qwen2",
  vocab_size=64,
  hidden_size=32,
  intermediate_size=40,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=1,
  hidden_act="silu",
  rms_norm_eps=1e-6,
  rope_theta=1000000.0,
  tie_word_embeddings=True,
  use_sliding_window=False,
)


def _hf_weights(c: dict, seed: int) -> dict[str, np.ndarray]:
  """Random weights with HF names and [out, in] Linear layouts."""
  rng = np.random.default_rng(seed)
  d, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
  h, kv = c["num_attention_heads"], c["num_key_value_heads"]
  dh = c.get("head_dim") or d // h

  def lin(out, inp):
    return rng.normal(0, inp**-0.5, (out, inp)).astype(np.float32)

  def scale():
    return (1 + 0.2 * rng.normal(size=(d,))).astype(np.float32)

  w = {"model.embed_tokens.weight": lin(v, d) * 3}
  for i in range(c["num_hidden_layers"]):
    p = f"model.layers.{i}."
    w[p + "input_layernorm.weight"] = scale()
    w[p + "self_attn.q_proj.weight"] = lin(h * dh, d) * 2
    w[p + "self_attn.k_proj.weight"] = lin(kv * dh, d) * 2
    w[p + "self_attn.v_proj.weight"] = lin(kv * dh, d)
    if c["model_type"] == "qwen2":
      for n, size in (("q", h * dh), ("k", kv * dh), ("v", kv * dh)):
        w[p + f"self_attn.{n}_proj.bias"] = rng.normal(0, 0.5, size).astype(
          np.float32
        )
    w[p + "self_attn.o_proj.weight"] = lin(d, h * dh)
    w[p + "post_attention_layernorm.weight"] = scale()
    w[p + "mlp.gate_proj.weight"] = lin(f, d)
    w[p + "mlp.up_proj.weight"] = lin(f, d)
    w[p + "mlp.down_proj.weight"] = lin(d, f)
  w["model.norm.weight"] = scale()
  if not c["tie_word_embeddings"]:
    w["lm_head.weight"] = lin(v, d)
  return w


def _write_hf(path, c, weights, *, n_files=1, dtype=np.float32):
  """Writes an HF checkpoint dir (sharded + index json when n_files > 1)."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as fh:
    json.dump(c, fh)
  names = list(weights)
  if n_files == 1:
    groups = {"model.safetensors": names}
  else:
    groups = {
      f"model-{k + 1:05d}-of-{n_files:05d}.safetensors": list(chunk)
      for k, chunk in enumerate(np.array_split(names, n_files))
    }
  for file, group in groups.items():
    safetensors.numpy.save_file(
      {n: weights[n].astype(dtype) for n in group},
      os.path.join(path, file),
      metadata={"format": "pt"},
    )
  if n_files > 1:
    wmap = {n: f for f, g in groups.items() for n in g}
    with open(os.path.join(path, hf.INDEX_FILE), "w") as fh:
      json.dump({"metadata": {}, "weight_map": wmap}, fh)
  return str(path)


def _hf_forward(w: dict, c: dict, tokens: np.ndarray) -> np.ndarray:
  """HF LlamaForCausalLM / Qwen2ForCausalLM forward in float64 numpy."""
  w = {k: np.asarray(v, np.float64) for k, v in w.items()}
  b, t = tokens.shape
  h, kv = c["num_attention_heads"], c["num_key_value_heads"]
  dh = c.get("head_dim") or c["hidden_size"] // h
  eps = c["rms_norm_eps"]

  def rms(x, g):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * g

  def linear(x, name):
    y = x @ w[name + ".weight"].T
    return y + w[name + ".bias"] if name + ".bias" in w else y

  def rotate_half(x):
    return np.concatenate([-x[..., dh // 2 :], x[..., : dh // 2]], -1)

  inv_freq = 1.0 / c["rope_theta"] ** (np.arange(0, dh, 2) / dh)
  freqs = np.arange(t)[:, None] * inv_freq[None]  # [T, Dh/2]
  emb = np.concatenate([freqs, freqs], -1)  # [T, Dh]
  cos, sin = np.cos(emb), np.sin(emb)
  causal = np.triu(np.ones((t, t), bool), 1)

  x = w["model.embed_tokens.weight"][tokens]  # [B, T, D]
  for i in range(c["num_hidden_layers"]):
    p = f"model.layers.{i}."
    a = rms(x, w[p + "input_layernorm.weight"])
    q = linear(a, p + "self_attn.q_proj").reshape(b, t, h, dh)
    k = linear(a, p + "self_attn.k_proj").reshape(b, t, kv, dh)
    v = linear(a, p + "self_attn.v_proj").reshape(b, t, kv, dh)
    q, k, v = (z.transpose(0, 2, 1, 3) for z in (q, k, v))  # [B, N, T, Dh]
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    k, v = np.repeat(k, h // kv, 1), np.repeat(v, h // kv, 1)  # repeat_kv
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dh)  # [B, H, T, T]
    s = np.where(causal, -np.inf, s)
    s = np.exp(s - s.max(-1, keepdims=True))
    o = (s / s.sum(-1, keepdims=True)) @ v  # [B, H, T, Dh]
    o = o.transpose(0, 2, 1, 3).reshape(b, t, h * dh)
    x = x + linear(o, p + "self_attn.o_proj")
    m = rms(x, w[p + "post_attention_layernorm.weight"])
    g = linear(m, p + "mlp.gate_proj")
    x = x + linear(g / (1 + np.exp(-g)) * linear(m, p + "mlp.up_proj"),
                   p + "mlp.down_proj")  # fmt: skip
  x = rms(x, w["model.norm.weight"])
  head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
  return x @ head.T  # [B, T, V]


def _logits(params, cfg, tokens):
  return np.asarray(
    transformer.Transformer(cfg).apply({"params": params}, jnp.asarray(tokens))
  )


def _model_cfg(c, **kw):
  return transformer.config_from_dict({**hf.config_from_hf(c), **kw})


TOKENS = np.random.default_rng(9).integers(0, 64, (2, 11))


@pytest.mark.parametrize(
  "flavour,n_files,dtype,scan",
  [
    ("llama", 2, np.float32, True),  # untied, sharded + index
    ("qwen2", 1, ml_dtypes.bfloat16, True),  # tied, qkv bias, bf16
    ("qwen2", 2, np.float32, False),  # unscanned layers_{i}
  ],
)
def test_load_matches_numpy_hf_forward(tmp_path, flavour, n_files, dtype, scan):
  c = {"llama": LLAMA, "qwen2": QWEN2}[flavour]
  w = _hf_weights(c, seed=1)
  path = _write_hf(tmp_path / "hf", c, w, n_files=n_files, dtype=dtype)
  cfg = _model_cfg(c, scan_layers=scan)
  params = hf.load_params(path, cfg)
  shapes = jax.eval_shape(
    lambda: transformer.Transformer(cfg).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)
    )["params"]
  )
  import flax

  shapes = flax.linen.unbox(shapes)
  assert jax.tree.structure(params) == jax.tree.structure(shapes)
  for a, s in zip(jax.tree.leaves(params), jax.tree.leaves(shapes), strict=1):
    assert (a.shape, a.dtype) == (s.shape, np.float32)
  expect = _hf_forward({k: v.astype(dtype) for k, v in w.items()}, c, TOKENS)
  np.testing.assert_allclose(_logits(params, cfg, TOKENS), expect, atol=1e-4)


def test_config_from_hf_fields():
  assert hf.config_from_hf(QWEN2) == dict(
    vocab_size=64,
    d_model=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=1,
    head_dim=8,
    mlp_dim=40,
    rope_theta=1e6,
    norm_eps=1e-6,
    qkv_bias=True,
    tie_embeddings=True,
  )
  got = hf.config_from_hf(LLAMA)
  assert (got["head_dim"], got["qkv_bias"], got["tie_embeddings"]) == (
    16,
    False,
    False,
  )
  # transformers >= 5 writes rope_parameters instead of rope_theta.
  v5 = {k: v for k, v in LLAMA.items() if k not in ("rope_theta",)}
  v5["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5}
  assert hf.config_from_hf(v5)["rope_theta"] == 5e5


def test_model_config_dict(tmp_path):
  """init='hf:DIR' without a preset: config.json + the run's overrides."""
  path = _write_hf(tmp_path / "hf", LLAMA, {})
  run_model = {"preset": "tiny", "remat": "full", "d_model": None}
  d = hf.model_config_dict(path, run_model)
  cfg = transformer.config_from_dict(d)
  assert (cfg.d_model, cfg.head_dim, cfg.remat) == (32, 16, "full")


def test_save_load_round_trip_is_exact(tmp_path):
  w = _hf_weights(QWEN2, seed=2)
  src = _write_hf(tmp_path / "src", QWEN2, w, dtype=ml_dtypes.bfloat16)
  cfg = _model_cfg(QWEN2)
  params = hf.load_params(src, cfg)
  out = str(tmp_path / "out")
  hf.save_params(out, params, cfg, max_shard_bytes=3000)  # bf16, sharded
  files = sorted(os.listdir(out))
  n = sum(f.startswith("model-") for f in files)
  assert n > 1 and hf.INDEX_FILE in files and "model.safetensors" not in files
  assert f"model-00001-of-{n:05d}.safetensors" in files
  with open(os.path.join(out, hf.INDEX_FILE)) as fh:
    index = json.load(fh)
  assert set(index["weight_map"]) == set(w)
  # Tensors on disk equal the source's (names, [out, in] layout, bf16).
  for name, file in index["weight_map"].items():
    got = safetensors.numpy.load_file(os.path.join(out, file))[name]
    assert got.dtype == ml_dtypes.bfloat16, name
    np.testing.assert_array_equal(got, w[name].astype(ml_dtypes.bfloat16))
  again = hf.load_params(out, cfg)
  jax.tree.map(np.testing.assert_array_equal, params, again)
  written = hf.load_hf_config(out)
  assert written["architectures"] == ["Qwen2ForCausalLM"]
  assert written["torch_dtype"] == "bfloat16"
  assert hf.config_from_hf(written) == hf.config_from_hf(QWEN2)
  # Llama flavour, float32 kept, one file, unscanned params.
  lcfg = _model_cfg(LLAMA, scan_layers=False)
  lsrc = _write_hf(tmp_path / "lsrc", LLAMA, _hf_weights(LLAMA, seed=3))
  lparams = hf.load_params(lsrc, lcfg)
  hf.save_params(str(tmp_path / "lout"), lparams, lcfg, dtype=None)
  assert sorted(os.listdir(tmp_path / "lout")) == [
    "config.json",
    "model.safetensors",
  ]
  jax.tree.map(
    np.testing.assert_array_equal,
    lparams,
    hf.load_params(str(tmp_path / "lout"), lcfg),
  )
  assert hf.load_hf_config(str(tmp_path / "lout"))["architectures"] == [
    "LlamaForCausalLM"
  ]


def test_save_is_atomic_and_refuses_to_clobber(tmp_path, monkeypatch):
  cfg = _model_cfg(LLAMA)
  src = _write_hf(tmp_path / "src", LLAMA, _hf_weights(LLAMA, seed=4))
  params = hf.load_params(src, cfg)
  calls = []
  real = safetensors.numpy.save_file

  def crash_on_second(*a, **k):
    calls.append(1)
    if len(calls) == 2:
      raise OSError("disk full")
    return real(*a, **k)

  monkeypatch.setattr(safetensors.numpy, "save_file", crash_on_second)
  out = tmp_path / "out"
  with pytest.raises(OSError, match="disk full"):
    hf.save_params(str(out), params, cfg, max_shard_bytes=4000)
  assert not out.exists()
  assert sorted(os.listdir(tmp_path)) == ["src"]  # no temp dir left
  monkeypatch.setattr(safetensors.numpy, "save_file", real)
  hf.save_params(str(out), params, cfg)
  with pytest.raises(FileExistsError, match="overwrite"):
    hf.save_params(str(out), params, cfg)
  hf.save_params(str(out), params, cfg, overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["out", "src"]
  # Leaves the HF model has no tensor for (e.g. unmerged LoRA) are refused.
  bad = {**params, "layers": {**params["layers"], "lora_a": np.zeros(3)}}
  with pytest.raises(ValueError, match="layers/lora_a"):
    hf.save_params(str(tmp_path / "x"), bad, cfg)


def _rewrite(path, file, fn):
  full = os.path.join(path, file)
  tensors = safetensors.numpy.load_file(full)
  fn(tensors)
  safetensors.numpy.save_file(tensors, full, metadata={"format": "pt"})


def test_load_errors_name_tensor_and_file(tmp_path):
  cfg = _model_cfg(LLAMA)
  w = _hf_weights(LLAMA, seed=5)
  path = _write_hf(tmp_path / "a", LLAMA, w, n_files=2)
  with open(os.path.join(path, hf.INDEX_FILE)) as fh:
    wmap = json.load(fh)["weight_map"]
  name = "model.layers.1.mlp.up_proj.weight"
  file = wmap[name]

  # Missing (the index still lists it: inconsistent index).
  _rewrite(path, file, lambda t: t.pop(name))
  with pytest.raises(ValueError, match=rf"{name}.*{file}"):
    hf.load_params(path, cfg)
  os.remove(os.path.join(path, hf.INDEX_FILE))  # no index: plain missing
  with pytest.raises(ValueError, match=rf"missing tensors {name}"):
    hf.load_params(path, cfg)

  # Extra tensor, listed with its file.
  path = _write_hf(tmp_path / "b", LLAMA, w)
  extra = "model.layers.0.self_attn.o_proj.bias"
  _rewrite(path, "model.safetensors", lambda t: t.update({extra: np.ones(32)}))
  with pytest.raises(
    ValueError, match=rf"unexpected tensors {extra} \(model.safetensors\)"
  ):
    hf.load_params(path, cfg)

  # Wrong shape: name, file, got and expected.
  path = _write_hf(tmp_path / "c", LLAMA, w)
  bad = "model.layers.0.self_attn.k_proj.weight"
  _rewrite(
    path, "model.safetensors", lambda t: t.update({bad: np.ones((16, 32))})
  )
  with pytest.raises(
    ValueError,
    match=rf"model.safetensors: tensor '{bad}' has shape \(16, 32\).*"
    r"expects \(32, 32\)",
  ):
    hf.load_params(path, cfg)

  # A tied model config refuses a real (untied) lm_head.
  path = _write_hf(tmp_path / "d", LLAMA, w)
  tied = _model_cfg(LLAMA, tie_embeddings=True)
  with pytest.raises(
    ValueError, match=r"model.safetensors: tensor 'lm_head.weight' differs"
  ):
    hf.load_params(path, tied)
  # ... unless it is the tied copy some exporters write.
  same = w["model.embed_tokens.weight"]
  _rewrite(
    path, "model.safetensors", lambda t: t.update({"lm_head.weight": same})
  )
  params = hf.load_params(path, tied)
  assert "lm_head" not in params
  with pytest.raises(ValueError, match="missing tensors lm_head.weight"):
    untied_w = {k: v for k, v in w.items() if k != "lm_head.weight"}
    hf.load_params(_write_hf(tmp_path / "e", LLAMA, untied_w), cfg)


def test_config_errors_name_the_key():
  llama3 = dict(
    LLAMA,
    rope_scaling=dict(
      rope_type="llama3",
      factor=32.0,
      low_freq_factor=1.0,
      high_freq_factor=4.0,
      original_max_position_embeddings=8192,
    ),
  )
  with pytest.raises(ValueError, match=r"config.json: RoPE scaling 'llama3'"):
    hf.config_from_hf(llama3)
  with pytest.warns(UserWarning, match="llama3"):
    got = hf.config_from_hf(llama3, allow_rope_scaling=True)
  assert got == hf.config_from_hf(LLAMA)
  with pytest.raises(ValueError, match="model_type 'mistral'"):
    hf.config_from_hf(dict(LLAMA, model_type="mistral"))
  with pytest.raises(ValueError, match="attention_bias"):
    hf.config_from_hf(dict(LLAMA, attention_bias=True))


def test_rope_theta_mismatch_warns(tmp_path):
  w = _hf_weights(LLAMA, seed=6)
  path = _write_hf(tmp_path / "a", LLAMA, w)
  with pytest.warns(UserWarning, match="rope_theta=10000.0"):
    hf.load_params(path, _model_cfg(LLAMA, rope_theta=5e5))


def test_export_cli_on_a_run(suite_dir, tmp_path, capsys):
  config = tiny_config(suite_dir, total_steps=2)
  workdir = str(tmp_path / "run")
  train.run(config, workdir)
  with open(os.path.join(workdir, "config.json")) as fh:
    cfg = transformer.config_from_dict(json.load(fh)["model"])
  mesh = sharding.make_mesh(config.mesh)
  run_params = checkpoint.load_params(workdir, mesh)

  out = str(tmp_path / "export")
  hf.main(["export", f"--workdir={workdir}", f"--out={out}", "--dtype=keep"])
  assert sorted(os.listdir(out)) == [
    "config.json",
    "model.safetensors",
    "tokenizer.model",
  ]
  written = hf.load_hf_config(out)
  assert written["architectures"] == ["LlamaForCausalLM"]
  assert (written["bos_token_id"], written["eos_token_id"]) != (None, None)
  loaded = hf.load_params(out, cfg)
  tokens = np.arange(24).reshape(2, 12) % cfg.vocab_size
  np.testing.assert_array_equal(
    _logits(loaded, cfg, tokens), _logits(run_params, cfg, tokens)
  )
  # The exported tensors run through the independent HF reference too.
  w = safetensors.numpy.load_file(os.path.join(out, "model.safetensors"))
  np.testing.assert_allclose(
    _hf_forward(w, written, tokens), _logits(run_params, cfg, tokens), atol=1e-4
  )
  capsys.readouterr()
  hf.main(["flags", out])
  line = capsys.readouterr().out
  assert "--config.model.preset= " in line
  assert f"--config.model.d_model={cfg.d_model}" in line
