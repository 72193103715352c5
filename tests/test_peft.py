"""PEFT LoRA adapter directories, both ways, against the real `peft` library.

jft -> PEFT: adapters saved by jft, loaded by `PeftModel.from_pretrained`
onto the transformers model, give jft's logits and the same adapted modules.
PEFT -> jft: adapters trained (randomised) and saved by PEFT, read by
`load_adapter`, give PEFT's logits through jft's forward.
"""

import dataclasses
import json
import os
import shutil

import flax.linen as nn
import hf_models
import jax
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
from flax import traverse_util

from jft.interop import hf
from jft.interop import peft as jft_peft
from jft.interop.hf.weights import LINEAR_MODULES
from jft.models import transformer
from jft.peft.options import PeftOptions, resolve_targets

TOKENS = np.random.default_rng(0).integers(0, hf_models.VOCAB, (2, 12))
ALL = "q_proj k_proj v_proj o_proj gate_proj up_proj down_proj".split()


def _flat(tree):
  return traverse_util.flatten_dict(dict(tree), sep="/")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """case -> (HF dir, jft config) for a tiny random transformers model."""
  cache = {}

  def get(case):
    if case not in cache:
      d = str(tmp_path_factory.mktemp(case))
      hf_models.save(hf_models.make_model(case), d)
      fields = hf.config_from_hf(hf.load_hf_config(d))
      cache[case] = (d, transformer.config_from_dict(fields))
    return cache[case]

  return get


def _base(ckpt, scan=True):
  """(config, flat base params) with scan_layers=`scan`."""
  d, cfg = ckpt
  cfg = dataclasses.replace(cfg, scan_layers=scan)
  return cfg, _flat(hf.load_params(d, cfg))


def _logits(cfg, flat):
  params = traverse_util.unflatten_dict(flat, sep="/")
  return np.asarray(
    transformer.Transformer(cfg).apply({"params": params}, TOKENS)
  )


def _random_adapters(cfg, base, seed=1):
  """Base params plus non-zero lora_a and lora_b where cfg.peft puts LoRA."""
  shapes = _flat(
    nn.unbox(
      jax.eval_shape(
        lambda r: transformer.Transformer(cfg).init(r, TOKENS)["params"],
        jax.random.PRNGKey(0),
      )
    )
  )
  rng = np.random.default_rng(seed)
  out = dict(base)
  for k, s in shapes.items():
    if k not in base:
      out[k] = rng.normal(0, 0.3, s.shape).astype(np.float32)
  return out


def _hf_names(flat, cfg):
  """HF module names of the jft LoRA leaves (scanned ones: every layer)."""
  names = set()
  for path in flat:
    if not path.endswith("/lora_a"):
      continue
    module = path[: -len("/lora_a")]
    if module == "lm_head":
      names.add("lm_head")
      continue
    head, rest = module.split("/", 1)
    layers = range(cfg.n_layers) if head == "layers" else [int(head[7:])]
    names |= {f"model.layers.{i}.{LINEAR_MODULES[rest]}" for i in layers}
  return names


def _peft_lora_names(model):
  """Module names (as in the transformers model) PEFT put LoRA on."""
  return {
    n.removeprefix("base_model.model.")
    for n, m in model.named_modules()
    if isinstance(m, peft.tuners.lora.LoraLayer)
  }


def _linear_paths(flat):
  return {k[: -len("/kernel")] for k in flat if k.endswith("/kernel")}


# ----------------------------------------------------------- jft -> PEFT

TO_PEFT = {
  "llama-all-linear": ("llama", "all-linear", True, False, ALL),
  "gemma2-attention-rslora": (
    "gemma2",
    "attention",
    True,
    True,
    ["q_proj", "k_proj", "v_proj", "o_proj"],
  ),
  "qwen3-qv-lm_head": (
    "qwen3",
    r"layers/attn/(q|v)|lm_head",
    True,
    False,
    ["q_proj", "v_proj", "lm_head"],
  ),
  "llama-per-layer": (
    "llama",
    r"layers_1/attn/q|layers_(0|2)/mlp/down|lm_head",
    False,
    False,
    [
      "model.layers.0.mlp.down_proj",
      "model.layers.1.self_attn.q_proj",
      "model.layers.2.mlp.down_proj",
      "lm_head",
    ],
  ),
  "llama-unscanned-uniform": (
    "llama",
    "qv",
    False,
    False,
    ["q_proj", "v_proj"],
  ),
}


@pytest.mark.parametrize("name", list(TO_PEFT))
def test_jft_adapter_loads_in_peft(checkpoint, tmp_path, name):
  case, targets, scan, rslora, expect_targets = TO_PEFT[name]
  cfg, base = _base(checkpoint(case), scan)
  opts = PeftOptions(
    lora_rank=4,
    lora_alpha=8.0,
    lora_rslora=rslora,
    lora_targets=resolve_targets(targets),
  )
  cfg = dataclasses.replace(cfg, peft=opts)
  flat = _random_adapters(cfg, base)
  out = str(tmp_path / "adapter")
  jft_peft.save_adapter(out, traverse_util.unflatten_dict(flat, sep="/"), cfg)

  with open(os.path.join(out, "adapter_config.json")) as fh:
    written = json.load(fh)
  assert written["target_modules"] == expect_targets
  assert (written["r"], written["lora_alpha"]) == (4, 8)
  assert written["use_rslora"] == rslora
  model = peft.PeftModel.from_pretrained(hf_models.make_model(case), out)
  assert _peft_lora_names(model) == _hf_names(flat, cfg)
  ours = _logits(cfg, flat)
  np.testing.assert_allclose(
    hf_models.hf_logits(model, TOKENS), ours, atol=1e-4, rtol=0
  )
  assert (
    np.abs(
      ours - _logits(dataclasses.replace(cfg, peft=PeftOptions()), base)
    ).max()
    > 0.1
  )

  # ... and back: the same leaves, and options adapting the same modules.
  back, leaves = jft_peft.load_adapter(out, cfg)
  assert (back.lora_rank, back.lora_alpha, back.lora_rslora) == (4, 8.0, rslora)
  lora = {k: v for k, v in flat.items() if "/lora_" in k}
  assert set(leaves) == set(lora)
  for k, v in leaves.items():
    np.testing.assert_array_equal(v, lora[k], err_msg=k)
  for path in _linear_paths(base):
    assert back.lora_on(path) == opts.lora_on(path), path


def test_save_adapter_checks_params_against_config(checkpoint, tmp_path):
  cfg, base = _base(checkpoint("llama"))
  with pytest.raises(ValueError, match="no LoRA leaves"):
    jft_peft.save_adapter(str(tmp_path / "a"), base, cfg)
  qv = dataclasses.replace(
    cfg, peft=PeftOptions(lora_rank=2, lora_targets=resolve_targets("qv"))
  )
  flat = _random_adapters(qv, base)
  q_only = dataclasses.replace(
    cfg, peft=PeftOptions(lora_rank=2, lora_targets=r"layers/attn/q")
  )
  with pytest.raises(ValueError, match=r"layers/attn/v.*lora_targets"):
    jft_peft.save_adapter(str(tmp_path / "a"), flat, q_only)
  out = str(tmp_path / "b")
  jft_peft.save_adapter(out, flat, qv)
  with pytest.raises(FileExistsError):
    jft_peft.save_adapter(out, flat, qv, overwrite=False)
  jft_peft.save_adapter(out, flat, qv, "org/base")  # replaces it
  assert sorted(os.listdir(out)) == [
    "adapter_config.json",
    "adapter_model.safetensors",
  ]
  with open(os.path.join(out, "adapter_config.json")) as fh:
    assert json.load(fh)["base_model_name_or_path"] == "org/base"


# ----------------------------------------------------------- PEFT -> jft

FROM_PEFT = {
  "llama-all": ("llama", dict(r=4, lora_alpha=8, target_modules=ALL), True),
  "gemma2-subset-rslora": (
    "gemma2",
    dict(
      r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "down_proj"]
    ),
    True,
  ),
  "qwen3-lm_head": (
    "qwen3",
    dict(r=4, lora_alpha=16, target_modules=["v_proj", "lm_head"]),
    True,
  ),
  "llama-layers_to_transform": (
    "llama",
    dict(
      r=4,
      lora_alpha=8,
      target_modules=["q_proj", "up_proj"],
      layers_to_transform=[0, 2],
    ),
    False,
  ),
  "llama-regex": (
    "llama",
    dict(
      r=2,
      lora_alpha=3,
      target_modules=r"model\.layers\.1\.self_attn\.(k|o)_proj",
    ),
    False,
  ),
  "llama-exclude": (
    "llama",
    dict(
      r=2,
      lora_alpha=2,
      target_modules=["q_proj", "v_proj"],
      exclude_modules=["model.layers.1.self_attn.v_proj"],
    ),
    False,
  ),
  "mistral-all-linear": (
    "mistral",
    dict(r=2, lora_alpha=4, target_modules="all-linear"),
    True,
  ),
}


def _peft_adapter(case, kwargs, directory, seed=2):
  """A PEFT LoRA model with random A and B, saved to `directory`."""
  model = peft.get_peft_model(
    hf_models.make_model(case),
    peft.LoraConfig(task_type="CAUSAL_LM", **kwargs),
  )
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for n, p in model.named_parameters():
      if "lora_" in n:
        p.copy_(0.3 * torch.randn(p.shape, generator=gen))
  model.save_pretrained(directory)
  return model


@pytest.mark.parametrize("name", list(FROM_PEFT))
def test_peft_adapter_loads_in_jft(checkpoint, tmp_path, name):
  case, kwargs, scan = FROM_PEFT[name]
  out = str(tmp_path / "adapter")
  model = _peft_adapter(case, kwargs, out)
  cfg, base = _base(checkpoint(case), scan)
  opts, leaves = jft_peft.load_adapter(out, cfg)
  assert jft_peft.read_adapter_config(out, cfg)[0] == opts  # JSON alone
  assert opts.lora_rank == kwargs["r"]
  assert opts.lora_alpha == kwargs["lora_alpha"]
  assert opts.lora_rslora == kwargs.get("use_rslora", False)
  cfg = dataclasses.replace(cfg, peft=opts)
  assert _hf_names(leaves, cfg) == _peft_lora_names(model)
  adapted = {p for p in _linear_paths(base) if opts.lora_on(p)}
  assert adapted == {
    k[: -len("/lora_a")] for k in leaves if k.endswith("/lora_a")
  }
  np.testing.assert_allclose(
    _logits(cfg, base | leaves),
    hf_models.hf_logits(model, TOKENS),
    atol=1e-4,
    rtol=0,
  )
  if "lm_head" in kwargs["target_modules"]:  # PEFT saves the frozen head too
    np.testing.assert_array_equal(
      leaves["lm_head/kernel"], base["lm_head/kernel"]
    )
  if not scan:  # per-layer adapters cannot share scanned leaves
    with pytest.raises(ValueError, match="scan_layers=False"):
      jft_peft.load_adapter(out, checkpoint(case)[1])


@pytest.fixture(scope="module")
def qv_adapter(tmp_path_factory):
  """A PEFT q/v adapter on the llama case, saved once."""
  out = str(tmp_path_factory.mktemp("qv") / "adapter")
  _peft_adapter(
    "llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), out
  )
  return out


def _copy(src, dst, **config):
  """A copy of adapter dir `src` with adapter_config.json fields replaced."""
  shutil.copytree(src, dst)
  file = os.path.join(dst, "adapter_config.json")
  with open(file) as fh:
    c = json.load(fh)
  c.update(config)
  with open(file, "w") as fh:
    json.dump(c, fh)
  return str(dst)


def test_adapter_name_infix_and_equal_patterns_load(
  checkpoint, tmp_path, qv_adapter
):
  cfg = checkpoint("llama")[1]
  _, want = jft_peft.load_adapter(qv_adapter, cfg)
  d = _copy(
    qv_adapter,
    tmp_path / "a",
    rank_pattern={"q_proj": 4},
    alpha_pattern={"v_proj": 8},
  )
  file = os.path.join(d, "adapter_model.safetensors")
  tensors = safetensors.numpy.load_file(file)
  safetensors.numpy.save_file(
    {k.replace(".weight", ".default.weight"): v for k, v in tensors.items()},
    file,
  )
  opts, got = jft_peft.load_adapter(d, cfg)
  assert (opts.lora_rank, opts.lora_alpha) == (4, 8.0)
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])


@pytest.mark.parametrize(
  "field,value",
  [
    ("use_dora", True),
    ("modules_to_save", ["lm_head"]),
    ("fan_in_fan_out", True),
    ("task_type", "SEQ_CLS"),
    ("bias", "lora_only"),
    ("peft_type", "IA3"),
    ("rank_pattern", {"q_proj": 2}),
    ("alpha_pattern", {"v_proj": 3}),
    ("init_lora_weights", "pissa"),
    ("lora_bias", True),
    ("layer_replication", [[0, 2]]),
  ],
)
def test_unsupported_config_fields_name_file_and_field(
  checkpoint, tmp_path, qv_adapter, field, value
):
  d = _copy(qv_adapter, tmp_path / "a", **{field: value})
  with pytest.raises(ValueError, match=rf"adapter_config\.json.*{field}") as e:
    jft_peft.load_adapter(d, checkpoint("llama")[1])
  assert str(e.value).count("\n") == 0


def test_adapter_file_errors(checkpoint, tmp_path, qv_adapter):
  cfg = checkpoint("llama")[1]
  # tensors the config does not select: PEFT would ignore them
  d = _copy(qv_adapter, tmp_path / "a", target_modules=["q_proj"])
  with pytest.raises(ValueError, match=r"safetensors.*v_proj.*does not select"):
    jft_peft.load_adapter(d, cfg)
  # shapes are checked against the model config
  wide = dataclasses.replace(cfg, n_heads=8)
  with pytest.raises(ValueError, match=r"q_proj has lora_A .*expects"):
    jft_peft.load_adapter(qv_adapter, wide)
  # torch pickles are refused, not read
  d = _copy(qv_adapter, tmp_path / "b")
  os.rename(
    os.path.join(d, "adapter_model.safetensors"),
    os.path.join(d, "adapter_model.bin"),
  )
  with pytest.raises(ValueError, match=r"adapter_model\.bin.*torch pickles"):
    jft_peft.load_adapter(d, cfg)


def test_embedding_and_tied_head_targets_are_errors(checkpoint, tmp_path):
  out = str(tmp_path / "emb")
  _peft_adapter(
    "llama", dict(r=2, target_modules=["embed_tokens", "q_proj"]), out
  )
  with pytest.raises(
    ValueError, match=r"adapter_config.json.*embed_tokens.*embeddings"
  ):
    jft_peft.load_adapter(out, checkpoint("llama")[1])
  os.makedirs(tmp_path / "tied")
  with open(tmp_path / "tied" / "adapter_config.json", "w") as fh:
    json.dump(
      {
        "peft_type": "LORA",
        "r": 2,
        "lora_alpha": 2,
        "target_modules": ["lm_head"],
      },
      fh,
    )
  gemma2 = checkpoint("gemma2")[1]
  assert gemma2.tie_embeddings
  with pytest.raises(ValueError, match=r"adapter_config.json.*lm_head.*ties"):
    jft_peft.load_adapter(str(tmp_path / "tied"), gemma2)
