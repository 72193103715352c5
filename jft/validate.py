"""One table of what each config value may be, checked before anything runs.

`validate(config)` goes through `rules()` in order and raises one
`jft.errors.ConfigError` listing every violation, each as
`config.KEY=VALUE: must be WHAT`. `python -m jft.main` calls it right after
the config is loaded (before earlier stages train) and `jft.train.run` at
its start, so a bad value fails in a second, not after a model is built (or
never: `lora.rank=-1` used to train in full).

Enumerations reference the list the consuming code checks against (the
objective registry, `jft.losses.LOSS_TYPES`, ...), so the table cannot drift
from the code. A rule whose key the config lacks is skipped (configs built
for tests may be partial); `when` limits a rule to the runs it concerns.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

from jft import errors

Check = tuple[Callable[[Any], bool], str]  # (predicate, what it must be)


@dataclasses.dataclass(frozen=True)
class Rule:
  """`config.KEY` must satisfy `ok(value, config)`; `must` says how (or
  `must(config)` does, for a rule that involves other keys)."""

  key: str
  ok: Callable[[Any, Any], bool]
  must: str | Callable[[Any], str]
  when: Callable[[Any], bool] = lambda config: True


# ------------------------------------------------------------- predicates


def _num(v) -> bool:
  return isinstance(v, int | float) and not isinstance(v, bool)


def _finite(v) -> bool:
  return _num(v) and math.isfinite(v)


def ge(lo) -> Check:
  return (lambda v: _finite(v) and v >= lo), f">= {lo}"


def gt(lo) -> Check:
  return (lambda v: _finite(v) and v > lo), f"> {lo} and finite"


def between(lo, hi, *, lo_open=False, hi_open=False) -> Check:
  def ok(v):
    if not _finite(v):
      return False
    above = v > lo if lo_open else v >= lo
    below = v < hi if hi_open else v <= hi
    return above and below

  left, right = "(" if lo_open else "[", ")" if hi_open else "]"
  return ok, f"in {left}{lo}, {hi}{right}"


def one_of(options: Iterable) -> Check:
  options = tuple(options)
  shown = ", ".join(repr(o) for o in options)
  return (lambda v: v in options), f"one of {shown}"


def optional(check: Check) -> Check:
  """None (take the preset's value) or `check`."""
  pred, must = check
  return (lambda v: v is None or pred(v)), f"None or {must}"


def _compiles(rx) -> bool:
  try:
    re.compile(rx)
  except (re.error, TypeError):
    return False
  return True


def regex() -> Check:
  return _compiles, "a valid regular expression"


def table(labels: Iterable[str]) -> Check:
  """Rows of (regex, label)."""
  labels = tuple(labels)

  def ok(rows):
    return all(len(r) == 2 and _compiles(r[0]) and r[1] in labels for r in rows)

  shown = " | ".join(repr(x) for x in labels)
  return ok, f"rows of (valid regex, {shown})"


def _config_file(spec: str) -> bool:
  from jft import init

  return init.find_config_file(spec.partition(":")[0]) is not None


def source() -> Check:
  """Where weights come from: `config.init`'s kinds (jft/init.py)."""
  from jft import init

  def ok(v):
    k = init.kind(v)
    if k == "random":
      return True
    if k == "stage":
      return _config_file(v[4:])
    return os.path.isdir(init.hf_dir(v) if k == "hf" else v)

  return ok, (
    "'' (random init), an existing jft run directory, hf:DIR with an "
    "existing Hugging Face checkpoint directory, or run:CONFIG.py[:ARG] "
    "with an existing config file"
  )


def run_dir() -> Check:
  """A jft run directory or `run:CONFIG.py[:ARG]` ('' = none)."""

  def ok(v):
    if not v:
      return True
    if v.startswith("run:"):
      return _config_file(v[4:])
    return os.path.isdir(v)

  return ok, (
    "'' (none), an existing jft run directory or run:CONFIG.py[:ARG] with "
    "an existing config file"
  )


def path(kind: str) -> Check:
  """'' or an existing file ('file'), directory ('dir') or either ('any')."""
  exists = {"file": os.path.isfile, "dir": os.path.isdir}.get(
    kind, os.path.exists
  )
  what = {"file": "file", "dir": "directory"}.get(kind, "file or directory")
  return (lambda v: not v or exists(v)), f"'' or an existing {what}"


def names_in(options: Iterable[str]) -> Check:
  """A comma-separated list of names from `options` (at least one)."""
  options = tuple(options)

  def ok(v):
    names = [n.strip() for n in v.split(",") if n.strip()]
    return bool(names) and all(n in options for n in names)

  shown = ", ".join(options)
  return ok, f"a comma-separated list of names from {shown}"


# ------------------------------------------------------------- the table


def _is(objective: str, *more: str) -> Callable[[Any], bool]:
  names = (objective, *more)
  return lambda c: c.objective in names


def _rule(key: str, check: Check, note: str = "", when=None) -> Rule:
  pred, must = check
  must = f"{must} ({note})" if note else must
  kw = {} if when is None else {"when": when}
  return Rule(key, lambda v, c: pred(v), must, **kw)


def _num_epochs(c):
  try:
    return c.data.num_epochs
  except (KeyError, AttributeError):  # a partial config: no epochs
    return None


def _online(c) -> bool:
  """The objective's data are made online (rollouts), not read from files."""
  from jft import objectives

  return (
    c.objective in objectives.REGISTRY
    and objectives.get(c.objective).source == "rollouts"
  )


def _group_size(c) -> int:
  return {"grpo": c.grpo.num_generations, "ppo": c.ppo.num_generations}.get(
    c.objective, 1
  )


def _reward_names(v) -> bool:
  # The names jft.rl.rewards.build knows, or an importable module:function.
  builtin = ("task", "format", "reward_model")
  names = [n.strip() for n in v.split(",") if n.strip()]
  return bool(names) and all(n in builtin or ":" in n for n in names)


def _reward_weights(v, c) -> bool:
  if not v.strip():
    return True
  try:
    ws = [float(w) for w in v.split(",")]
  except ValueError:
    return False
  n = len([f for f in c.rl.reward_funcs.split(",") if f.strip()])
  return len(ws) == n and all(math.isfinite(w) for w in ws)


def _lr_scale(v) -> bool:
  from jft import optim

  try:
    optim.parse_lr_scale(v)
  except ValueError:
    return False
  return True


def _ppo_head(c) -> str:
  return "lm+value" if c.ppo.critic == "shared" else "lm"


@functools.cache
def rules() -> tuple[Rule, ...]:
  """The ordered table (built once; the lists come from the code)."""
  from jft import losses, metrics, objectives, optim, state
  from jft.data import onpolicy, stream, tasks
  from jft.models import config as model_config
  from jft.models import presets
  from jft.objectives import dpo, grpo, reward, sft
  from jft.peft import lora, options
  from jft.rl import critic

  r = _rule
  return (
    # What runs, for how long, on what.
    r("objective", one_of(objectives.REGISTRY), "jft.objectives.REGISTRY"),
    r("seed", ge(0)),
    Rule(
      "total_steps",
      lambda v, c: (
        _finite(v) and (v >= 1 or (v == 0 and _num_epochs(c) is not None))
      ),
      ">= 1, or 0 with config.data.num_epochs set (as many steps as those "
      "passes over the training data take)",
    ),
    r("batch_size", ge(1)),
    Rule(
      "batch_size",
      lambda v, c: c.grad_accum_steps < 1 or v % c.grad_accum_steps == 0,
      lambda c: (
        "a multiple of config.grad_accum_steps="
        f"{c.grad_accum_steps} (the step's micro-batches)"
      ),
    ),
    r("grad_accum_steps", ge(1)),
    r("seq_len", ge(2)),
    r("log_every", ge(1)),
    r("eval_every", ge(0), "0 = no evaluation"),
    r("checkpoint_every", ge(1)),
    r("keep_checkpoints", ge(1)),
    r("eval_batch_size", ge(1)),
    r("init", source()),
    r("init_adapter", path("dir"), "a PEFT adapter directory"),
    # Data.
    r("data.tokenizer", path("any")),
    r("data.tokenizer_vocab_size", ge(1)),
    r("data.num_epochs", optional(ge(1)), "None = repeat"),
    Rule(
      "data.num_epochs",
      lambda v, c: v is None,
      lambda c: (
        f"None for objective {c.objective!r}: its data are rollouts of the "
        "policy, which have no epochs (set config.total_steps)"
      ),
      _online,
    ),
    Rule(
      "data.streaming",
      lambda v, c: not v or c.objective in stream.OBJECTIVES,
      lambda c: (
        f"False for objective {c.objective!r}: streaming reads records one "
        f"at a time, for {', '.join(stream.OBJECTIVES)} (the others read "
        "their whole data set: pairs, counts, rollouts)"
      ),
    ),
    Rule(
      "data.streaming",
      lambda v, c: not v or _num_epochs(c) is None,
      "False with data.num_epochs set (a streamed run trains for "
      "total_steps: counting an epoch's steps would read every file first)",
    ),
    r("data.read_threads", ge(0), "0 = read on the train loop's thread"),
    r("data.tokenizer_train_mb", ge(0), "0 = all of the training text"),
    r("data.builtin.tasks", names_in(tasks.TASKS)),
    r("data.builtin.n_train", ge(1)),
    r("data.builtin.n_eval", ge(0)),
    r("data.builtin.seed", ge(0)),
    # Objectives.
    r("sft.truncation", one_of(sft.TRUNCATION)),
    r("sft.template", one_of(sft.TEMPLATES)),
    r("sft.template_file", path("file")),
    r("sft.max_eval_generations", ge(0)),
    r("sft.max_new_tokens", ge(1)),
    r("mlm.mask_rate", between(0, 1, lo_open=True)),
    r("mlm.mask_token_rate", between(0, 1)),
    r("mlm.random_token_rate", between(0, 1)),
    Rule(
      "mlm.random_token_rate",
      lambda v, c: v + c.mlm.mask_token_rate <= 1,
      "<= 1 - config.mlm.mask_token_rate (the two rates share the selected "
      "tokens)",
    ),
    r("dpo.loss_type", one_of(losses.LOSS_TYPES)),
    r("dpo.beta", gt(0)),
    r("dpo.label_smoothing", between(0, 0.5, hi_open=True)),
    Rule(
      "dpo.label_smoothing",
      lambda v, c: v == 0 or c.dpo.loss_type not in losses.NO_LABEL_SMOOTHING,
      f"0 with config.dpo.loss_type in {losses.NO_LABEL_SMOOTHING} (those "
      "losses have no label-noise term)",
      _is("dpo"),
    ),
    r("dpo.rpo_alpha", ge(0)),
    Rule(
      "dpo.rpo_alpha",
      lambda v, c: v == 0 or c.dpo.loss_type != "orpo",
      "0 with config.dpo.loss_type='orpo' (ORPO has its own chosen NLL)",
      _is("dpo"),
    ),
    r("dpo.dpop_lambda", ge(0)),
    r("dpo.mask", one_of(dpo.MASKS)),
    r("dpo.truncation", one_of(sft.TRUNCATION)),
    r("dpo.on_invalid", one_of(reward.ON_INVALID)),
    r("dpo.builtin_pairs", one_of(onpolicy.BUILTIN_PAIRS)),
    r("dpo.mine_prompts", ge(0), "0 = all"),
    r("dpo.mine_samples", ge(0)),
    r("dpo.mine_temperature", ge(0)),
    # jft.data.onpolicy.builtin_pairs's two ways of pairing.
    r("dpo.mine_pairs", one_of(("first", "all"))),
    r("reward.center_rewards_coefficient", ge(0)),
    r("reward.truncation", one_of(reward.TRUNCATION)),
    r("reward.on_invalid", one_of(reward.ON_INVALID)),
    Rule(
      "model.head",
      lambda v, c: v in (None, "score"),
      "'score' for objective 'reward' (a reward model)",
      _is("reward"),
    ),
    r("kto.beta", gt(0)),
    r("kto.desirable_weight", ge(0)),
    r("kto.undesirable_weight", ge(0)),
    r("kto.loss_type", one_of(losses.KTO_LOSS_TYPES)),
    # Online RL.
    r("rl.prompts_per_rollout", ge(1)),
    Rule(
      "rl.prompts_per_rollout",
      lambda v, c: c.batch_size < 1 or v * _group_size(c) % c.batch_size == 0,
      lambda c: (
        "such that prompts_per_rollout x the group size ("
        f"{_group_size(c)}: {c.objective}.num_generations) is a "
        f"multiple of config.batch_size={c.batch_size}"
      ),
      _is("ppo", "grpo"),
    ),
    r("rl.epochs", ge(1)),
    r("rl.max_new_tokens", ge(1)),
    r("rl.temperature", ge(0), "0 = greedy"),
    Rule(
      "rl.temperature",
      lambda v, c: v > 0 or bool(c.grpo.control),
      "> 0 for GRPO (a greedy group's answers are all the same)",
      _is("grpo"),
    ),
    r("rl.top_k", ge(0), "0 = off"),
    r("rl.top_p", between(0, 1, lo_open=True), "1 = off"),
    Rule(
      "rl.reward_funcs",
      lambda v, c: _reward_names(v),
      "a comma-separated list of task, format, reward_model or module:function",
    ),
    Rule(
      "rl.reward_weights",
      _reward_weights,
      "'' or one finite number per config.rl.reward_funcs entry",
    ),
    r("rl.format_regex", regex()),
    r("rl.reward_model", run_dir()),
    Rule(
      "rl.reward_model",
      lambda v, c: (
        bool(v)
        or (
          "reward_model" not in c.rl.reward_funcs
          and not (c.objective == "ppo" and c.ppo.critic == "reward_model")
        )
      ),
      "set (a reward model run) with 'reward_model' in config.rl."
      "reward_funcs or config.ppo.critic='reward_model'",
      _is("ppo", "grpo"),
    ),
    r("rl.samples_to_log", ge(0)),
    r("ppo.kl_coef", ge(0)),
    r("ppo.kl_target", gt(0)),
    r("ppo.kl_horizon", gt(0)),
    r("ppo.gamma", between(0, 1)),
    r("ppo.lam", between(0, 1)),
    r("ppo.clip", gt(0)),
    r("ppo.vf_clip", gt(0)),
    r("ppo.vf_coef", ge(0)),
    r("ppo.missing_eos_penalty", ge(0)),
    r("ppo.critic_warmup_steps", ge(0)),
    r("ppo.num_generations", ge(1)),
    r("ppo.critic", one_of(critic.MODES)),
    r("ppo.group_baseline", one_of(("rloo", "group_norm"))),
    Rule(
      "ppo.group_baseline",
      lambda v, c: v != "group_norm" or c.ppo.num_generations >= 2,
      "'rloo' with one sample per prompt ('group_norm' normalises a "
      "group's scores; set config.ppo.num_generations >= 2)",
      _is("ppo"),
    ),
    Rule(
      "model.head",
      lambda v, c: v == _ppo_head(c),
      "'lm+value' with config.ppo.critic='shared' (the value head), else "
      "'lm' (objective 'ppo')",
      _is("ppo"),
    ),
    r("rl.max_gen_batches", ge(1)),
    Rule(
      "rl.filter_groups",
      lambda v, c: not v or _group_size(c) >= 2,
      lambda c: (
        "False with one sample per prompt (it compares a group's rewards; "
        f"set {c.objective}.num_generations >= 2)"
      ),
      _is("ppo", "grpo"),
    ),
    r("grpo.num_generations", ge(1)),
    Rule(
      "grpo.num_generations",
      lambda v, c: v >= 2 or bool(c.grpo.control),
      ">= 2 (advantages compare each completion with its group)",
      _is("grpo"),
    ),
    r("grpo.beta", ge(0), "0 = no reference"),
    r("grpo.eps_low", between(0, 1, hi_open=True)),
    r("grpo.eps_high", ge(0)),
    r("grpo.loss_type", one_of(losses.GRPO_AGGS)),
    r("grpo.scale_rewards", one_of(grpo.SCALE_REWARDS)),
    r("grpo.control", one_of(grpo.CONTROLS)),
    # Optimizer.
    r("optimizer.name", one_of(optim.OPTIMIZERS)),
    r("optimizer.lr", gt(0)),
    r("optimizer.schedule", one_of(optim.SCHEDULES)),
    r("optimizer.warmup_steps", ge(0)),
    r("optimizer.min_lr_ratio", between(0, 1)),
    r("optimizer.b1", between(0, 1, hi_open=True)),
    r("optimizer.b2", between(0, 1, hi_open=True)),
    r("optimizer.eps", gt(0)),
    r("optimizer.weight_decay", ge(0)),
    r("optimizer.grad_clip_norm", ge(0), "0 = no clipping"),
    r("optimizer.no_decay", regex()),
    Rule(
      "optimizer.lr_scale",
      lambda v, c: _lr_scale(v),
      "'' or REGEX=FACTOR,... (regexes without commas, finite factors >= 0)",
    ),
    # Which weights train, and how.
    r("freeze", table((state.TRAINABLE, state.FROZEN)), "() = automatic"),
    r("lora.rank", ge(0), "0 = no LoRA"),
    r("lora.alpha", gt(0)),
    r("lora.dropout", between(0, 1, hi_open=True)),
    Rule(
      "lora.targets",
      lambda v, c: v in options.ALIASES or (bool(v) and _compiles(v)),
      f"one of {', '.join(options.ALIASES)} or a regex over module paths",
    ),
    r("quant.kind", one_of(("", *options.QUANT_KINDS)), "'' = off"),
    Rule(
      "quant.kind",
      lambda v, c: (
        not v or c.lora.rank > 0 or bool(c.init_adapter) or bool(c.freeze)
      ),
      "'' without LoRA (config.lora.rank > 0 or config.init_adapter) or a "
      "config.freeze table: 4-bit kernels cannot train",
    ),
    r("quant.block_size", ge(1)),
    r("quant.table", table(lora.QUANT_LABELS)),
    # Devices.
    *(
      Rule(
        f"mesh.{axis}",
        lambda v, c: isinstance(v, int) and (v == -1 or v >= 1),
        ">= 1, or -1 (the rest of the devices)",
      )
      for axis in ("data", "fsdp", "tensor")
    ),
    r("mesh.num_devices", ge(0), "0 = all"),
    # Outputs.
    Rule(
      "wandb.enabled",
      lambda v, c: not v or metrics.wandb_installed(),
      "False unless the wandb package is installed (pip install 'jft[wandb]')",
    ),
    r("wandb.mode", one_of(metrics.WANDB_MODES)),
    Rule(
      "wandb.project",
      lambda v, c: not c.wandb.enabled or bool(v.strip()),
      "a W&B project name with config.wandb.enabled=True",
    ),
    # The model (None = the preset's value).
    r("model.preset", one_of(("", *presets.PRESETS))),
    *(
      r(f"model.{f}", optional(ge(1)))
      for f in (
        "vocab_size",
        "d_model",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "head_dim",
        "mlp_dim",
        "max_position_embeddings",
        "sliding_window",
      )
    ),
    r("model.family", optional(one_of(model_config.FAMILIES))),
    r("model.mlp_act", optional(one_of(model_config.MLP_ACTS))),
    r("model.head", optional(one_of(model_config.HEADS))),
    r("model.dtype", optional(one_of(model_config._DTYPES))),
    r("model.param_dtype", optional(one_of(model_config._DTYPES))),
    r("model.remat", optional(one_of(model_config.REMAT_POLICIES))),
    r("model.logits_chunk", optional(ge(0)), "0 = full logits"),
    r("model.rope_theta", optional(gt(0))),
    r("model.norm_eps", optional(gt(0))),
  )


# ------------------------------------------------------------- checking


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def violations(config) -> list[str]:
  """Every broken rule, in table order: `config.KEY=VALUE: must be ...`."""
  out = []
  for rule in rules():
    try:
      value = _get(config, rule.key)
      if not rule.when(config):
        continue
    except (KeyError, AttributeError):
      continue  # a partial config: the rule does not apply
    try:
      ok = rule.ok(value, config)
    except (KeyError, AttributeError):
      continue
    except (TypeError, ValueError, ZeroDivisionError):
      ok = False
    if not ok:
      must = rule.must(config) if callable(rule.must) else rule.must
      out.append(f"config.{rule.key}={value!r}: must be {must}")
  return out


def validate(config) -> None:
  """Raises one `ConfigError` naming every invalid value of `config`."""
  bad = violations(config)
  if len(bad) == 1:
    raise errors.ConfigError(bad[0])
  if bad:
    raise errors.ConfigError(
      f"{len(bad)} config values are invalid:\n  " + "\n  ".join(bad)
    )
