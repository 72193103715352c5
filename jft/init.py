"""Where a run's weights and tokenizer come from: `config.init`.

  ''            random weights; the tokenizer is `config.data.tokenizer`, or
                one trained on the training text (the only case jft trains
                a tokenizer)
  WORKDIR       another jft run: its latest checkpoint (LoRA merged, 4-bit
                undone) and the tokenizer kept in that workdir
  hf:DIR        a Hugging Face checkpoint: config.json, safetensors and the
                checkpoint's own tokenizer (tokenizer.json or .model);
                missing tokenizer files are an error, never a substitute
  run:X.py[:A]  that config's result, trained once into the stage cache
                (`resolve_stages`, before this run starts), then as WORKDIR

`config.init_adapter` names a PEFT LoRA adapter directory put on top of the
base (its rank, alpha and targets become the run's LoRA settings).

Every workdir keeps its tokenizer files and, for models that came from a
Hugging Face checkpoint, that checkpoint's config.json and
generation_config.json under `source/`, so exports carry its fields.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jft import checkpoint, objectives, resume, sharding
from jft.data import tokenizer as tokenizers
from jft.data.tokenizer import train_tokenizer
from jft.errors import ConfigError, UserError
from jft.interop import hf
from jft.interop import peft as peft_format
from jft.interop.hf import export as hf_export
from jft.models import transformer
from jft.peft import lora, options, quant
from jft.state import flat_paths, merge_params

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_DIR = hf_export.SOURCE_DIR
SP_FILE = "tokenizer.model"  # a tokenizer jft trains itself


class SourceNotFound(UserError, FileNotFoundError):
  """A file or directory a config key names is missing; says which key."""


def kind(init: str) -> str:
  """'random' | 'hf' | 'stage' | 'workdir'."""
  if not init:
    return "random"
  if init.startswith("hf:"):
    return "hf"
  if init.startswith("run:"):
    return "stage"
  return "workdir"


def hf_dir(init: str) -> str:
  return init[3:]


# ----------------------------------------------------------------- stages


def cache_root(config) -> str:
  if config.stage_cache:
    return config.stage_cache
  return os.environ.get(
    "JFT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jft")
  )


def find_config_file(path: str) -> str | None:
  """Where `configs/X.py` is: relative to the cwd, else to jft's checkout."""
  for base in (os.getcwd(), REPO_ROOT):
    full = os.path.join(base, path)
    if os.path.isfile(full):
      return full
  return None


def load_config_file(spec: str):
  """`configs/X.py[:ARG]` -> its `get_config(ARG)` (cwd, then repo root)."""
  path, _, arg = spec.partition(":")
  full = find_config_file(path)
  if full is None:
    raise SourceNotFound(
      f"no config file {path!r} (looked relative to the working directory "
      f"and to {REPO_ROOT})"
    )
  mod_spec = importlib.util.spec_from_file_location("_jft_stage_cfg", full)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  return module.get_config(arg or None)


@functools.cache
def code_version() -> str:
  """Hash of jft's own source: a cached stage is reused only by the code
  that made it, so a fix to training is never silently skipped."""
  h = hashlib.sha256()
  pkg = os.path.join(REPO_ROOT, "jft")
  for root, _, files in sorted(os.walk(pkg)):
    for f in sorted(files):
      if f.endswith(".py"):
        full = os.path.join(root, f)
        h.update(os.path.relpath(full, pkg).encode())
        with open(full, "rb") as fh:
          h.update(fh.read())
  return h.hexdigest()[:16]


def stage_workdir(spec: str, config) -> tuple[str, object]:
  """(cached workdir, stage config) for a `run:` spec.

  The key covers the stage's resolved config, its preset's shape, the
  built-in suite's format, jft's code and, for a stage that starts from
  another, that stage's key.
  """
  from jft.data import tasks
  from jft.models.presets import PRESETS

  stage = load_config_file(spec)
  stage.stage_cache = cache_root(config)
  payload = stage.to_json(sort_keys=True) + json.dumps(
    PRESETS.get(stage.model.preset, {}), sort_keys=True, default=str
  )
  if not stage.data.train_files:
    payload += f"suite-format-{tasks.FORMAT_VERSION}"
  payload += f"code-{code_version()}"
  for dep in STAGE_KEYS:  # a changed upstream stage retrains this one
    value = get_key(stage, dep)
    if isinstance(value, str) and kind(value) == "stage":
      payload += f"{dep}-after-" + stage_workdir(value[4:], stage)[0]
  key = hashlib.sha256(payload.encode()).hexdigest()
  name = os.path.splitext(os.path.basename(spec.partition(":")[0]))[0]
  return os.path.join(cache_root(config), f"{name}-{key[:12]}"), stage


# Config keys that may name a stage (`run:configs/X.py[:ARG]`).
STAGE_KEYS = ("init", "rl.reward_model")


def get_key(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def _set(config, dotted: str, value) -> None:
  *head, last = dotted.split(".")
  node = config
  for part in head:
    node = node[part]
  node[last] = value


def plan_stages(config):
  """(stages to train in order, `config` with every `run:` key resolved).

  Each stage is (spec, workdir, its config with its own `run:` keys
  resolved); a stage two keys share (PPO's policy and reward model both
  start from SFT) appears once, before whatever starts from it.
  """
  order, seen = [], set()

  def visit(cfg):
    cfg = cfg.copy_and_resolve_references()
    for key in STAGE_KEYS:
      value = get_key(cfg, key)
      if not (isinstance(value, str) and kind(value) == "stage"):
        continue
      workdir, stage = stage_workdir(value[4:], cfg)
      if workdir not in seen:
        seen.add(workdir)
        order.append((value[4:], workdir, visit(stage)))
      _set(cfg, key, workdir)
    return cfg

  return order, visit(config)


def stage_title(config) -> str:
  """What a run of `config` is, in a few words: 'SFT', 'DPO with LoRA'."""
  title = objectives.TITLES.get(config.objective, config.objective)
  if config.quant.kind:
    return f"{title} with QLoRA"
  if config.lora.rank or config.init_adapter:
    return f"{title} with LoRA"
  return title


def resolve_stages(
  config, train_fn, *, announce=print, spec: str = "", workdir: str = ""
):
  """`config` with its `run:` keys (`STAGE_KEYS`) replaced by the trained
  stages' workdirs.

  Stages chain (SFT's own init is `run:` pretraining); each is trained by
  `train_fn(stage_config, workdir)` unless its cached run is finished.
  Each stage is announced first, `stage 2/3: SFT (configs/sft.py) -> DIR`,
  saying when the cache's finished run is reused; the last banner is this
  run's (`spec`, `workdir`: its config file and workdir, if given).
  Called before training starts, never from inside the training loop.
  """
  order, resolved = plan_stages(config)
  if not order:
    return config
  n = len(order) + 1
  for i, (stage_spec, stage_dir, stage) in enumerate(order):
    head = (
      f"stage {i + 1}/{n}: {stage_title(stage)} ({stage_spec}) -> {stage_dir}"
    )
    done = resume.finished(stage, stage_dir, checkpoint.latest_step(stage_dir))
    if done is not None:
      announce(f"{head}: reused from the cache (finished at step {done})")
      continue
    announce(head)
    train_fn(stage, stage_dir)
  this = f" ({spec})" if spec else ""
  where = f" -> {workdir}" if workdir else ""
  announce(f"stage {n}/{n}: {stage_title(config)}{this}{where}")
  return resolved


# -------------------------------------------------------------- tokenizer


def load_tokenizer(config, workdir: str, corpus) -> object:
  """The run's tokenizer, whose files are also kept in WORKDIR.

  `corpus()` yields training texts; it is read only when a new tokenizer
  is trained (random init, no tokenizer given, none in the workdir).
  """
  tok = find_tokenizer(config, workdir, corpus)
  if jax.process_index() == 0:
    tok.save(workdir)  # atomic per file; identical bytes on resume
  return tok


def find_tokenizer(config, workdir: str | None = None, corpus=None):
  """The tokenizer `config` names; trains one only for a random init with
  a `workdir` and a `corpus` to train on."""
  if config.data.tokenizer:
    path = config.data.tokenizer
    with _missing("data.tokenizer", path):
      if os.path.isdir(path):
        return tokenizers.load_tokenizer_dir(path)
      return tokenizers.load_tokenizer_file(path)
  k = kind(config.init)
  if k in ("hf", "workdir"):
    where = hf_dir(config.init) if k == "hf" else config.init
    with _missing("init", config.init):
      return tokenizers.load_tokenizer_dir(where)
  if k == "stage":
    raise ValueError(
      f"config.init={config.init!r} is not resolved; call "
      "jft.init.resolve_stages first (python -m jft.main does)"
    )
  if workdir is None or corpus is None:
    raise ConfigError("config.data.tokenizer: a random init needs one")
  try:
    return tokenizers.load_tokenizer_dir(workdir)  # resume
  except FileNotFoundError:
    pass
  return train_tokenizer(
    corpus(),
    output_path=os.path.join(workdir, SP_FILE),
    vocab_size=config.data.tokenizer_vocab_size,
  )


@contextlib.contextmanager
def _missing(key: str, value: str):
  """A FileNotFoundError inside becomes a `SourceNotFound` naming `key`."""
  try:
    yield
  except FileNotFoundError as e:
    if isinstance(e, UserError):
      raise
    raise SourceNotFound(f"config.{key}={value!r}: {e}") from None


# ----------------------------------------------------------- model config


def _adapter_options(config, base_cfg) -> options.PeftOptions | None:
  """LoRA settings from `config.init_adapter`, checked against config.lora."""
  if not config.init_adapter:
    return None
  opts, _ = peft_format.read_adapter_config(config.init_adapter, base_cfg)
  lo = config.lora
  if lo.rank and (lo.rank, lo.alpha, lo.rslora) != (
    opts.lora_rank,
    opts.lora_alpha,
    opts.lora_rslora,
  ):
    raise ConfigError(
      f"config.init_adapter={config.init_adapter!r} has r={opts.lora_rank}, "
      f"lora_alpha={opts.lora_alpha}, use_rslora={opts.lora_rslora}; "
      f"config.lora says rank={lo.rank}, alpha={lo.alpha}, "
      f"rslora={lo.rslora}. Set config.lora.rank=0 to take the adapter's."
    )
  return opts


def model_config(config, tokenizer) -> transformer.TransformerConfig:
  """Model config from `config.model`, `config.init`, `config.lora/quant`.

  An unset `vocab_size` follows the tokenizer, rounded up to a multiple of
  64 so the vocab axis shards evenly. With weights from `init` (a Hugging
  Face checkpoint's config.json, a jft run's config.json) the architecture
  is theirs: `config.model.preset` is ignored and only `FREE_FIELDS` may be
  set. The tokenizer must fit the embedding table.
  """
  d = config.model.to_dict()
  k = kind(config.init)
  if k in ("hf", "workdir"):
    _check_free_fields(config, d)
    free = {f: d[f] for f in FREE_FIELDS if d.get(f) is not None}
    with _missing("init", config.init):
      if k == "hf":
        d = hf.model_config_dict(hf_dir(config.init), free)
      else:
        d = _workdir_model_dict(config.init, free)
  if d.get("vocab_size") is None:
    d["vocab_size"] = -(-tokenizer.vocab_size // 64) * 64
  try:
    base = transformer.config_from_dict(d)
  except ValueError as e:  # a model field the user set (or its preset)
    if k == "random" and not isinstance(e, UserError):
      raise ConfigError(f"config.model: {e}") from None
    raise
  peft = _adapter_options(config, base)
  if peft is None:
    peft = options.from_run_config(config)
  elif config.quant.kind:  # QLoRA under a loaded adapter
    q = options.from_run_config(config)
    peft = dataclasses.replace(
      peft,
      quant_kind=q.quant_kind,
      quant_table=q.quant_table,
      quant_block_size=q.quant_block_size,
      quant_double=q.quant_double,
    )
  cfg = dataclasses.replace(base, peft=peft)
  if cfg.vocab_size < tokenizer.vocab_size:
    raise ConfigError(
      f"the tokenizer ({tokenizer!r}) has {tokenizer.vocab_size} ids but "
      f"the model's embedding table has {cfg.vocab_size} rows "
      "(config.model.vocab_size, or the checkpoint's config.json); they "
      "do not belong together"
    )
  return cfg


# What a run may set on a model whose architecture comes from `init`.
FREE_FIELDS = (
  "dtype",
  "param_dtype",
  "scan_layers",
  "scan_unroll",
  "remat",
  "head",
  "logits_chunk",
  "attention_vjp",
  "mlp_vjp",
)
HEAD_LEAVES = {"score": "score/kernel", "lm+value": "value_head/kernel"}


def _check_free_fields(config, d) -> None:
  """With weights from `init`, their source fixes the architecture: a set
  `config.model` field other than `FREE_FIELDS` (and the ignored preset)
  would describe another model, so it is refused by name."""
  bad = {
    f: v
    for f, v in d.items()
    if v is not None and f != "preset" and f not in FREE_FIELDS
  }
  if bad:
    f, v = next(iter(bad.items()))
    raise ConfigError(
      f"config.model.{f}={v!r}: with config.init={config.init!r} the "
      f"architecture comes from there; only config.model.{{"
      f"{', '.join(FREE_FIELDS)}}} may be set"
    )


def _workdir_model_dict(workdir: str, overrides) -> dict:
  """A jft workdir's model (its config.json), `overrides` on top."""
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as fh:
    saved = dict(json.load(fh)["model"])
  saved.pop("peft", None)
  saved.update(overrides)
  saved["preset"] = ""
  return saved


# ------------------------------------------------------------- parameters


def source_dir(config) -> str | None:
  """Where the HF source configs of `config.init` live, if anywhere."""
  k = kind(config.init)
  if k == "hf":
    return hf_dir(config.init)
  if k == "workdir":
    return os.path.join(config.init, SOURCE_DIR)
  return None


def record_source(config, workdir: str) -> None:
  """Copies the HF source configs into WORKDIR/source (process 0)."""
  src = source_dir(config)
  if jax.process_index() != 0 or src is None:
    return
  out = os.path.join(workdir, SOURCE_DIR)
  for name in (hf.CONFIG_FILE, "generation_config.json"):
    if os.path.exists(os.path.join(src, name)):
      os.makedirs(out, exist_ok=True)
      shutil.copyfile(os.path.join(src, name), os.path.join(out, name))


def _load_workdir(init: str, mesh) -> dict:
  """Float base params of a jft run (adapters merged, 4-bit undone)."""
  params = checkpoint.load_params(init, mesh)
  with open(os.path.join(init, "config.json"), encoding="utf-8") as f:
    saved = transformer.config_from_dict(json.load(f)["model"])
  if saved.peft.active:
    params = jax.tree.map(np.asarray, lora.merge(params, saved))
  return params


def fit_head(params, model_cfg, rng, place=None) -> dict:
  """A loaded float base made to fit the model's head: a reward model
  drops the LM head and starts a `score` head (normal 0.02, as HF's
  initializer_range); a PPO policy adds a zero `value_head` (values start
  at 0). Other leaves are untouched. `place(path, array)` puts a new leaf
  on its devices (default: host numpy)."""
  flat = flat_paths(params)
  head = model_cfg.head
  if head == "score":
    flat.pop("lm_head/kernel", None)
  leaf = HEAD_LEAVES.get(head)
  if leaf and leaf not in flat:
    shape = (model_cfg.d_model, 1)
    if head == "score":
      value = 0.02 * jax.random.normal(rng, shape, jnp.float32)
    else:
      value = jnp.zeros(shape, jnp.float32)
    value = value.astype(jnp.dtype(model_cfg.param_dtype))
    flat[leaf] = place(leaf, value) if place else np.asarray(value)
  return _unflatten(flat)


def check_tree(params, boxed, what: str) -> None:
  """Same paths and shapes as the model expects, or a named error."""
  expect = flat_paths(nn.unbox(boxed))
  got = flat_paths(params)
  missing = sorted(set(expect) - set(got))
  extra = sorted(set(got) - set(expect))
  if missing or extra:
    raise ValueError(f"{what}: missing parameters {missing}, extra {extra}")
  for p, ref in expect.items():
    if tuple(got[p].shape) != tuple(ref.shape):
      raise ValueError(
        f"{what}: {p} has shape {tuple(got[p].shape)}, the model expects "
        f"{tuple(ref.shape)}"
      )


def _unflatten(flat):
  return traverse_util.unflatten_dict(flat, sep="/")


def _adapter_leaves(config, model_cfg) -> tuple[dict, dict]:
  """(LoRA leaves, full leaves) of `config.init_adapter`, flat.

  PEFT saves the frozen weights of some adapted modules too (the LM head's,
  when it is a target); those replace the base's, as PEFT's loader does.
  """
  if not config.init_adapter:
    return {}, {}
  _, leaves = peft_format.load_adapter(config.init_adapter, model_cfg)
  lora_leaves = {p: v for p, v in leaves.items() if "/lora_" in p}
  full = {p: v for p, v in leaves.items() if "/lora_" not in p}
  return lora_leaves, full


def _overlay(params, full: dict, shardings: dict, where: str) -> dict:
  """`params` with the leaves in `full` replaced (same shape and dtype)."""
  if not full:
    return params
  flat = flat_paths(params)
  for p, v in full.items():
    if p not in flat or tuple(flat[p].shape) != tuple(v.shape):
      raise ConfigError(
        f"{where}: {p} {tuple(v.shape)} does not fit the base model "
        f"({tuple(flat[p].shape) if p in flat else 'no such parameter'})"
      )
    flat[p] = jax.device_put(np.asarray(v).astype(flat[p].dtype), shardings[p])
  return _unflatten(flat)


def init_params(config, model_cfg, mesh, rules) -> dict:
  """Parameters placed with their shardings.

  A float base (random, a jft run, or a Hugging Face checkpoint read
  tensor by tensor into place) comes first; 4-bit kernels are made from it
  (while reading, for HF checkpoints) and LoRA adapters added (fresh, or
  from `config.init_adapter`), so every technique starts from the same
  base.
  """
  rng = jax.random.PRNGKey(config.seed)
  dummy = jnp.zeros((1, 8), jnp.int32)
  base_cfg = lora.base_config(model_cfg)
  full = transformer.Transformer(model_cfg)
  base = transformer.Transformer(base_cfg)
  boxed_full = jax.eval_shape(lambda r: full.init(r, dummy)["params"], rng)
  boxed_base = jax.eval_shape(lambda r: base.init(r, dummy)["params"], rng)
  shard_full = flat_paths(sharding.param_shardings(boxed_full, mesh, rules))
  shard_base = sharding.param_shardings(boxed_base, mesh, rules)
  peft = model_cfg.peft
  kernels = set()
  if peft.quant_kind:
    kernels = set(lora.check_quant_table(peft.quant_table, boxed_base))
  ad_lora, ad_full = _adapter_leaves(config, model_cfg)
  k = kind(config.init)
  if k == "random":
    params = jax.jit(
      lambda r: nn.unbox(base.init(r, dummy)["params"]),
      out_shardings=shard_base,
    )(rng)
  elif k == "hf":
    at_load = kernels - set(ad_full)  # the rest after the overlay below
    plan = None
    if at_load:
      plan = hf.QuantPlan(
        frozenset(at_load),
        peft.quant_kind,
        peft.quant_block_size,
        peft.quant_double,
      )
    wanted = {p: s for p, s in shard_full.items() if "/lora_" not in p}
    wanted.update(flat_paths(shard_base))
    file_head = hf.config_from_hf(hf.load_hf_config(hf_dir(config.init)))
    lm_cfg = dataclasses.replace(  # what the files hold (LM, or a classifier)
      base_cfg, head=file_head.get("head", "lm")
    )
    params = hf.load_params(
      hf_dir(config.init), lm_cfg, shardings=wanted, quant_plan=plan
    )
    shards = flat_paths(shard_base)
    params = fit_head(
      params, base_cfg, rng, lambda p, v: jax.device_put(v, shards[p])
    )
    kernels -= at_load
  elif k == "workdir":
    loaded = _load_workdir(config.init, mesh)
    loaded = fit_head(loaded, base_cfg, rng)
    check_tree(loaded, boxed_base, f"config.init={config.init!r}")
    dtypes = jax.tree.map(lambda x: x.dtype, nn.unbox(boxed_base))
    params = jax.tree.map(
      lambda x, dt, s: jax.device_put(np.asarray(x).astype(dt), s),
      loaded,
      dtypes,
      shard_base,
    )
  else:
    raise ValueError(
      f"config.init={config.init!r} is not resolved; call "
      "jft.init.resolve_stages first (python -m jft.main does)"
    )
  params = _overlay(
    params,
    ad_full,
    flat_paths(shard_base),
    f"config.init_adapter={config.init_adapter!r}",
  )
  if kernels:
    out_sh = {p: s for p, s in shard_full.items() if "/lora_" not in p}
    params = jax.jit(
      lambda p: quant.quantize_params(
        p,
        kernels,
        kind=peft.quant_kind,
        block_size=peft.quant_block_size,
        double_quant=peft.quant_double,
      ),
      out_shardings=_unflatten(out_sh),
    )(params)
  if peft.lora_rank:
    lora.check_targets(peft.lora_targets, params)
    ad_sh = {p: s for p, s in shard_full.items() if "/lora_" in p}
    if ad_lora:
      missing = sorted(set(ad_sh) - set(ad_lora))
      if missing:
        raise ConfigError(
          f"config.init_adapter={config.init_adapter!r} lacks {missing[:6]}"
        )
      adapters = _unflatten(
        {
          p: jax.device_put(np.asarray(ad_lora[p], np.float32), s)
          for p, s in ad_sh.items()
        }
      )
    else:
      adapters = jax.jit(
        lambda r: lora.adapters(nn.unbox(full.init(r, dummy)["params"])),
        out_shardings=_unflatten(ad_sh),
      )(jax.random.fold_in(rng, 1))
    params = merge_params(params, adapters)
  check_tree(params, boxed_full, "model parameters")
  from jft.rl import critic  # noqa: PLC0415 (critic imports this module)

  if critic.enabled(config):
    params = {**params, critic.KEY: critic.load(config, model_cfg, mesh, rules)}
  return params
