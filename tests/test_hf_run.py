"""A Hugging Face checkpoint through jft as a user drives it: `jft.load`, the
generate CLI, LoRA fine-tuning with `init='hf:DIR'`, and the exports read
back by transformers and PEFT.

The checkpoint is a tiny Llama made by transformers with a byte-level BPE
`tokenizer.json` (Llama 3 style: bos from the post-processor, no pad token,
`<|eot_id|>` ends chat turns) and a chat template.
"""

import json
import os
import shutil

import hf_models
import numpy as np
import peft
import pytest
import torch
import transformers
from conftest import set_keys

import jft
from jft import config as base_config
from jft import generate, init, train
from jft.data import tokenizer as tokenizers

TEXTS = [
  "The quick brown fox jumps over the lazy dog.",
  "Fine-tuning adapts a pretrained model to a task.",
  "add: 12 + 30 = 42",
  "copy: a b c = a b c",
  "Hello world! How are you today?",
] * 4
VOCAB = 300  # the tokenizer's size: the model's vocabulary


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """(dir, transformers model) of a tiny Llama with its own tokenizer."""
  d = str(tmp_path_factory.mktemp("llama") / "ckpt")
  size = hf_models.write_tokenizer(d + "-tok", TEXTS, vocab_size=VOCAB)
  assert size == VOCAB
  model = hf_models.make_model(
    "llama3",
    vocab_size=VOCAB,
    bos_token_id=0,
    eos_token_id=[1, 2],
    pad_token_id=None,
    tie_word_embeddings=False,
  )
  model.save_pretrained(d)
  for f in os.listdir(d + "-tok"):  # the tokenizer's files win
    shutil.copy(os.path.join(d + "-tok", f), d)
  return d, model


@pytest.fixture(scope="module")
def loaded(ckpt):
  return jft.load(f"hf:{ckpt[0]}")


def test_load_logits_and_tokenizer(ckpt, loaded):
  d, model = ckpt
  theirs = transformers.AutoTokenizer.from_pretrained(d)
  text = "Hello world! add: 12 + 30 = 42"
  ids = theirs(text)["input_ids"]
  assert ids[0] == 0 and loaded.tokenizer.bos_prefix == [0]
  assert loaded.encode_prompt(text) == ids
  assert loaded.tokenizer.eos_ids == (1, 2)
  assert loaded.tokenizer.pad_id == 1  # no pad token: pad = eos
  got = loaded.logits([ids])
  assert got.dtype == np.float32 and got.shape == (1, len(ids), VOCAB)
  np.testing.assert_allclose(
    got, hf_models.hf_logits(model, [ids]), atol=1e-4, rtol=0
  )


def test_generate_api_and_cli_agree_with_transformers(ckpt, loaded, capsys):
  d, model = ckpt
  prompts = [[0, 40, 41, 42], [0, 50], [0, 60, 61, 62, 63, 64]]
  out = loaded.generate(prompts, max_new_tokens=10)
  assert out.dtype == np.int32 and out.shape == (3, 10)
  for p, row in zip(prompts, out.tolist(), strict=True):
    with torch.no_grad():
      want = model.generate(
        torch.tensor([p]),
        max_new_tokens=10,
        do_sample=False,
        eos_token_id=[1, 2],
        pad_token_id=1,
      )[0, len(p) :].tolist()
    assert row[: len(want)] == want
    stop = next((i for i, t in enumerate(row) if t in (1, 2)), None)
    if stop is not None:  # after eos: the pad id
      assert set(row[stop + 1 :]) <= {1}
  assert loaded.generate([], 10).shape == (0, 10)
  with pytest.raises(ValueError, match=r"prompt 1: token ids \[5000\]"):
    loaded.generate([[0, 5], [0, 5000]], 4)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    loaded.logits([[0, 5000]])
  ids_text = loaded.generate_text([[0, 40, 41, 42]], max_new_tokens=10)[0]
  assert ids_text == loaded.tokenizer.decode(
    generate.truncate(out[0], loaded.tokenizer.eos_ids)
  )
  full = loaded.generate(prompts, 10, stop_at_eos=False)
  assert full.shape == (3, 10)
  np.testing.assert_array_equal(full[:, :1], out[:, :1])
  # Sampling: reproducible per seed, different across seeds.
  a = loaded.generate(prompts, 10, temperature=1.0, top_k=20, seed=1)
  b = loaded.generate(prompts, 10, temperature=1.0, top_k=20, seed=1)
  c = loaded.generate(prompts, 10, temperature=1.0, top_k=20, seed=2)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  # The CLI goes through the same code, with the chat template.
  texts = loaded.generate_text(["Hello", "Hi"], max_new_tokens=8, chat=True)
  out_file = os.path.join(os.path.dirname(d), "completions.jsonl")
  generate.main(
    [f"--init=hf:{d}", "--prompt=Hello", "--prompt=Hi", "--chat"]
    + ["--max_new_tokens=8", f"--out={out_file}"]
  )
  assert "wrote 2 completions" in capsys.readouterr().out
  with open(out_file) as fh:
    rows = [json.loads(line) for line in fh]
  assert [r["completion"] for r in rows] == texts
  assert [r["prompt"] for r in rows] == ["Hello", "Hi"]
  rendered = transformers.AutoTokenizer.from_pretrained(d).apply_chat_template(
    [{"role": "user", "content": "Hello"}], add_generation_prompt=True
  )
  if not isinstance(rendered, list):  # transformers 5: a BatchEncoding
    rendered = rendered["input_ids"]
  assert loaded.encode_prompt("Hello", chat=True) == list(rendered)


def test_hf_init_without_tokenizer_names_the_files(ckpt, tmp_path):
  bare = tmp_path / "bare"
  shutil.copytree(ckpt[0], bare)
  for f in ("tokenizer.json", "tokenizer_config.json"):
    os.remove(bare / f)
  with pytest.raises(
    FileNotFoundError, match=r"tokenizer\.json.*tokenizer\.model"
  ):
    jft.load(f"hf:{bare}")


def test_tokenizer_must_fit_the_embedding(ckpt, tmp_path):
  small = tmp_path / "small"
  shutil.copytree(ckpt[0], small)
  with open(small / "config.json") as fh:
    c = json.load(fh)
  c["vocab_size"] = 64
  with open(small / "config.json", "w") as fh:
    json.dump(c, fh)
  with pytest.raises(ValueError, match="embedding table has 64 rows"):
    jft.load(f"hf:{small}")


def _sft_config(ckpt_dir, data, **keys):
  c = base_config.base_config()
  c.objective = "sft"
  c.init = f"hf:{ckpt_dir}"
  c.model.preset = ""
  c.data.train_files = data
  c.data.eval_files = data
  c.total_steps, c.batch_size, c.eval_batch_size, c.seq_len = 3, 8, 8, 48
  c.log_every, c.eval_every, c.checkpoint_every = 1, 3, 3
  c.optimizer.warmup_steps = 1
  c.sft.max_eval_generations = 0
  return set_keys(c, keys)


@pytest.fixture(scope="module")
def lora_run(ckpt, tmp_path_factory):
  root = tmp_path_factory.mktemp("run")
  data = str(root / "sft.jsonl")
  with open(data, "w") as fh:
    for t in TEXTS[:5]:
      fh.write(json.dumps({"prompt": t[:10], "completion": t[10:]}) + "\n")
    fh.write(
      json.dumps(
        {
          "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello world!"},
          ]
        }
      )
      + "\n"
    )
  config = _sft_config(
    ckpt[0],
    data,
    **{
      "lora.rank": 4,
      "lora.alpha": 8.0,
      "lora.targets": "attention",
      "lora.save_merged": True,
      "optimizer.lr": 0.05,
    },
  )
  workdir = str(root / "w")
  train.run(config, workdir)
  return workdir, config


def test_lora_run_exports_merged_and_peft(ckpt, lora_run):
  """The merged export and the PEFT adapter are the same model as the run,
  read by transformers and by PEFT."""
  d, _ = ckpt
  workdir, _ = lora_run
  merged = os.path.join(workdir, "merged")
  assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(merged))
  cfg = json.load(open(os.path.join(merged, "config.json")))
  src = json.load(open(os.path.join(d, "config.json")))
  assert cfg["rope_scaling"]["rope_type"] == "llama3"
  assert cfg["max_position_embeddings"] == src["max_position_embeddings"]
  assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (0, [1, 2])
  run = jft.load(workdir)  # the run's checkpoint, adapters merged
  ids = [[0, 40, 41, 42, 43, 44, 45]]
  want = run.logits(ids)
  hf_merged = transformers.AutoModelForCausalLM.from_pretrained(merged)
  np.testing.assert_allclose(
    hf_models.hf_logits(hf_merged, ids), want, atol=1e-4, rtol=0
  )
  base = transformers.AutoModelForCausalLM.from_pretrained(
    d, attn_implementation="eager"
  )
  assert not np.allclose(hf_models.hf_logits(base, ids), want, atol=1e-3)
  with_adapter = peft.PeftModel.from_pretrained(
    base, os.path.join(workdir, "adapters")
  )
  np.testing.assert_allclose(
    hf_models.hf_logits(with_adapter, ids), want, atol=1e-4, rtol=0
  )
  # jft.load with the adapter on the HF base: the same model again.
  again = jft.load(f"hf:{d}", adapter=os.path.join(workdir, "adapters"))
  np.testing.assert_allclose(again.logits(ids), want, atol=1e-5, rtol=0)
  assert again.config.peft.lora_rank == 4


def test_qlora_run_from_hf_and_adapter_init(ckpt, lora_run, tmp_path):
  """QLoRA quantizes while reading; a run can continue a PEFT adapter."""
  workdir, config = lora_run
  config = config.copy_and_resolve_references()
  set_keys(
    config,
    {
      "init_adapter": os.path.join(workdir, "adapters"),
      "lora.rank": 0,  # take the adapter's
      "lora.save_merged": False,
      "quant.kind": "nf4",
      "quant.block_size": 16,
      "total_steps": 1,
    },
  )
  # The run starts from the adapter's very leaves, on a 4-bit base.
  from jft import sharding
  from jft.interop import peft as peft_format
  from jft.state import flat_paths

  tok = tokenizers.load_tokenizer_dir(ckpt[0])
  cfg = init.model_config(config, tok)
  mesh = sharding.make_mesh(config.mesh)
  start = flat_paths(
    init.init_params(config, cfg, mesh, sharding.rules_from_config(config.mesh))
  )
  _, saved = peft_format.load_adapter(config.init_adapter, cfg)
  lora = {p: v for p, v in saved.items() if "/lora_" in p}
  assert lora and all(
    np.array_equal(np.asarray(start[p]), v) for p, v in lora.items()
  )
  assert "layers/attn/q/kernel_packed" in start
  out = str(tmp_path / "q")
  last = train.run(config, out)
  assert np.isfinite(last["train/loss"])
  saved = json.load(open(os.path.join(out, "config.json")))["model"]["peft"]
  assert (saved["lora_rank"], saved["quant_kind"]) == (4, "nf4")
  assert tokenizers.load_tokenizer_dir(out).eos_ids == (1, 2)
  assert init.kind(config.init) == "hf"


def test_export_cli_on_a_jft_run(suite_dir, tmp_path, capsys):
  """A run trained from scratch (jft's own sentencepiece tokenizer) exports
  as a Llama transformers reads, with the run's logits."""
  from conftest import tiny_config

  from jft.interop.hf import __main__ as hf_cli

  config = tiny_config(suite_dir, total_steps=2, eval_every=0)
  workdir = str(tmp_path / "run")
  train.run(config, workdir)
  out = str(tmp_path / "export")
  hf_cli.main(["export", f"--workdir={workdir}", f"--out={out}"])
  assert "wrote" in capsys.readouterr().out
  assert {"config.json", "model.safetensors", "tokenizer.model"} <= set(
    os.listdir(out)
  )
  written = json.load(open(os.path.join(out, "config.json")))
  assert written["torch_dtype"] == "float32"  # the params' own, exactly
  assert (written["bos_token_id"], written["eos_token_id"]) == (2, 3)
  ids = [[2, 10, 11, 12, 13, 14]]
  want = jft.load(workdir).logits(ids)
  theirs = transformers.AutoModelForCausalLM.from_pretrained(out)
  np.testing.assert_allclose(
    hf_models.hf_logits(theirs, ids), want, atol=1e-4, rtol=0
  )
