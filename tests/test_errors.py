"""Errors for people: one line for a user error, the key it is about, the
documented exit code; the validation table; the CLI end to end."""

import glob
import io
import math
import os
import re
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from jft import cli, errors, init, objectives
from jft import config as base
from jft.validate import validate, violations

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLM = os.path.join(ROOT, "configs", "pretrain_clm.py")
DPO = os.path.join(ROOT, "configs", "dpo.py")

# ------------------------------------------------------------ did you mean


@pytest.mark.parametrize(
  "typed, meant",
  [
    ("optimizer.learning_rate", ["optimizer.lr"]),  # spelled out
    ("totl_steps", ["total_steps"]),  # a typo at the top
    ("lr", ["optimizer.lr"]),  # the right name, the wrong place
    ("optimiser.lr", ["optimizer.lr"]),
    ("lora.rnak", ["lora.rank"]),
    ("data.train_file", ["data.train_files"]),
    ("nothing_like_it", []),
  ],
)
def test_did_you_mean(typed, meant):
  keys = cli.key_paths(base.base_config())
  assert cli.did_you_mean(typed, keys)[: len(meant) or 1] == meant


def test_key_paths_and_message():
  keys = cli.key_paths(base.base_config())
  assert {"optimizer", "optimizer.lr", "data.builtin.n_train"} <= set(keys)
  msg = cli.unknown_key_message("config", "optimizer.learning_rate", keys)
  assert msg == (
    "--config.optimizer.learning_rate: no such config key "
    "'optimizer.learning_rate'; did you mean 'optimizer.lr'?"
  )
  assert "jft/config.py" in cli.unknown_key_message("config", "zzz.q", keys)


def _parse(argv):
  """`cli.parse_flags` on a fresh FlagValues, as jft.main defines --config."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file(
    "config", None, "", flag_values=fv, lock_config=True, sys_argv=argv
  )
  flags.DEFINE_string("workdir", None, "", flag_values=fv)
  return cli.parse_flags(argv, fv), fv


def test_parse_flags_errors_are_one_line():
  _, fv = _parse(["prog", f"--config={CLM}", "--config.optimizer.lr=0.5"])
  assert fv.config.optimizer.lr == 0.5
  cases = [
    ("--config.optimizer.learning_rate=1", "did you mean 'optimizer.lr'?"),
    ("--config.total_steps=abc", "config.total_steps takes an int"),
    ("--config.data.shuffle=maybe", "takes a bool (true or false)"),
    ("--workdirr=x", "workdirr"),
  ]
  for arg, want in cases:
    with pytest.raises(errors.UserError, match=re.escape(want)) as e:
      _parse(["prog", f"--config={CLM}", arg])
    assert "\n" not in str(e.value)
  with pytest.raises(errors.ConfigError) as e:
    _parse(["prog", f"--config={CLM}", "--config.totl_steps=1", "--config.b=2"])
  assert "2 unknown config keys" in str(e.value)
  assert "'total_steps'" in str(e.value) and "--config.b:" in str(e.value)
  nope = os.path.join(ROOT, "configs", "sft_.py")
  for extra in ([], ["--config.total_steps=3"]):  # deferred / raised early
    with pytest.raises(errors.UserError, match="no such config file") as e:
      _parse(["prog", f"--config={nope}", *extra])
    assert "did you mean" in str(e.value) and "sft.py" in str(e.value)


def test_config_file_errors(tmp_path):
  """A UserError from get_config is the message; a bug is re-raised as is
  (with its traceback, exit 1), not absl's traceback-in-a-string."""
  (tmp_path / "user.py").write_text(
    "from jft import errors\n"
    "def get_config(arg=None):\n"
    "  raise errors.ConfigError('set an arg')\n"
  )
  (tmp_path / "bug.py").write_text(
    "def get_config(arg=None):\n  return int('x')\n"
  )
  with pytest.raises(errors.ConfigError) as e:
    _parse(["prog", f"--config={tmp_path / 'user.py'}"])
  assert str(e.value) == "set an arg"
  with pytest.raises(ValueError, match="invalid literal") as e:
    _parse(["prog", f"--config={tmp_path / 'bug.py'}"])
  assert not isinstance(e.value, errors.UserError)
  assert "Error whilst parsing" not in str(e.value)


# ------------------------------------------------------------ report


def test_report_and_verbose(monkeypatch):
  out = io.StringIO()
  assert cli.report(errors.ConfigError("config.x=1: bad"), file=out) == 2
  assert out.getvalue() == "error: config.x=1: bad\n"
  out = io.StringIO()
  code = cli.report(errors.Preempted(5, "SIGTERM", "/w"), file=out)
  assert code == 75 and "Traceback" not in out.getvalue()
  assert out.getvalue().startswith("SIGTERM: saved a checkpoint at step 5")
  try:
    raise RuntimeError("a bug")
  except RuntimeError as e:
    out = io.StringIO()
    assert cli.report(e, file=out) == 1
    assert "Traceback" in out.getvalue() and "a bug" in out.getvalue()
    out = io.StringIO()
    try:
      raise errors.NonFiniteError("nan") from e
    except errors.NonFiniteError as nf:
      assert cli.report(nf, verbose=True, file=out) == 3
    assert "Traceback" in out.getvalue()
    assert out.getvalue().endswith("error: nan\n")
  monkeypatch.delenv(cli.VERBOSE_ENV, raising=False)
  assert not cli.verbose_requested(["--config=c.py"])
  assert cli.verbose_requested(["--config=c.py", "--verbose"])
  assert not cli.verbose_requested(["--verbose", "--noverbose"])
  assert not cli.verbose_requested(["--verbose=false"])
  monkeypatch.setenv(cli.VERBOSE_ENV, "1")
  assert cli.verbose_requested([])


def test_run_main_exit_codes(capsys):
  def fail(exc):
    def fn():
      raise exc

    return fn

  for exc, code in [
    (errors.UserError("x"), 2),
    (errors.CheckpointError("y"), 4),
    (KeyError("z"), 1),
  ]:
    with pytest.raises(SystemExit) as e:
      cli.run_main(fail(exc), argv=[])
    assert e.value.code == code
  err = capsys.readouterr().err
  assert "error: x\n" in err and "error: y\n" in err and "KeyError" in err
  with pytest.raises(SystemExit) as e:
    cli.run_main(lambda: 0, argv=[])
  assert e.value.code == 0


# ------------------------------------------------------------ validation


def test_every_config_file_is_valid():
  validate(base.base_config())
  files = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
  assert len(files) >= 10
  for f in files:
    assert violations(init.load_config_file(f)) == [], f


BAD = [
  ("objective", "dpoo"),
  ("seed", -1),
  ("total_steps", 0),
  ("batch_size", 0),
  ("grad_accum_steps", 0),
  ("seq_len", 1),
  ("log_every", 0),
  ("eval_every", -1),
  ("checkpoint_every", 0),
  ("keep_checkpoints", 0),
  ("eval_batch_size", 0),
  ("init", "/nonexistent/run"),
  ("init", "hf:/nonexistent/hf"),
  ("init", "run:configs/nope.py"),
  ("init_adapter", "/nonexistent/adapter"),
  ("data.tokenizer", "/nonexistent/tok.model"),
  ("data.num_epochs", 0),
  ("data.builtin.tasks", "add,mul"),
  ("sft.truncation", "cut"),
  ("sft.template", "chatml"),
  ("mlm.mask_rate", 0.0),
  ("mlm.mask_token_rate", 1.5),
  ("dpo.loss_type", "sigmoidd"),
  ("dpo.beta", -1.0),
  ("dpo.beta", 0.0),
  ("dpo.label_smoothing", 0.5),
  ("dpo.mask", "bogus"),
  ("dpo.truncation", "cut"),
  ("dpo.on_invalid", "ignore"),
  ("dpo.builtin_pairs", "mined"),
  ("dpo.mine_pairs", "some"),
  ("reward.truncation", "cut"),
  ("kto.beta", 0.0),
  ("kto.loss_type", "bco"),
  ("rl.temperature", -1.0),
  ("rl.top_p", 0.0),
  ("rl.prompts_per_rollout", 0),
  ("rl.reward_funcs", "task,bogus"),
  ("rl.reward_weights", "1,2"),
  ("rl.format_regex", "("),
  ("ppo.gamma", 1.5),
  ("ppo.lam", -0.1),
  ("ppo.clip", 0.0),
  ("ppo.critic", "separate"),
  ("ppo.group_baseline", "mean"),
  ("grpo.num_generations", 0),
  ("rl.max_gen_batches", 0),
  ("grpo.loss_type", "bnpo"),
  ("grpo.scale_rewards", "yes"),
  ("grpo.control", "sft"),
  ("optimizer.name", "adam"),
  ("optimizer.lr", 0.0),
  ("optimizer.lr", math.inf),
  ("optimizer.lr", math.nan),
  ("optimizer.schedule", "cosin"),
  ("optimizer.warmup_steps", -1),
  ("optimizer.min_lr_ratio", 1.5),
  ("optimizer.b1", 1.0),
  ("optimizer.b2", -0.1),
  ("optimizer.eps", 0.0),
  ("optimizer.weight_decay", -0.1),
  ("optimizer.grad_clip_norm", -1.0),
  ("optimizer.lr_scale", "head=fast"),
  ("freeze", ((".*", "train"),)),
  ("lora.rank", -1),
  ("lora.alpha", 0.0),
  ("lora.dropout", 1.0),
  ("lora.targets", "layers/(q"),
  ("quant.kind", "int8"),
  ("quant.block_size", 0),
  ("quant.table", ((".*", "quantise"),)),
  ("mesh.fsdp", 0),
  ("model.preset", "huge"),
  ("model.d_model", 0),
  ("model.dtype", "fp8"),
  ("model.family", "gpt2"),
  ("model.remat", "some"),
]


def _with(config, key, value):
  node = config
  *head, last = key.split(".")
  for part in head:
    node = node[part]
  node[last] = value
  return config


@pytest.mark.parametrize("key, value", BAD, ids=[f"{k}={v}" for k, v in BAD])
def test_each_rule_rejects_by_key(key, value):
  found = violations(_with(base.base_config(), key, value))
  assert [v for v in found if v.startswith(f"config.{key}=")], found
  with pytest.raises(errors.ConfigError, match=rf"config\.{key}="):
    validate(_with(base.base_config(), key, value))


COMBOS = [
  # (objective, {key: value}, the key the message names)
  ("clm", {"batch_size": 10, "grad_accum_steps": 3}, "batch_size"),
  ("mlm", {"mlm.mask_token_rate": 0.8, "mlm.random_token_rate": 0.3}, "mlm"),
  ("grpo", {"grpo.num_generations": 1}, "grpo.num_generations"),
  ("grpo", {"rl.temperature": 0.0}, "rl.temperature"),
  ("grpo", {"rl.prompts_per_rollout": 3}, "rl.prompts_per_rollout"),
  ("dpo", {"dpo.loss_type": "orpo", "dpo.rpo_alpha": 1.0}, "dpo.rpo_alpha"),
  ("dpo", {"dpo.loss_type": "ipo", "dpo.label_smoothing": 0.1}, "dpo"),
  ("ppo", {"ppo.critic": "shared", "model.head": "lm"}, "model.head"),
  ("ppo", {"rl.filter_groups": True}, "rl.filter_groups"),  # 1 sample each
  ("ppo", {"ppo.group_baseline": "group_norm"}, "ppo.group_baseline"),
  ("ppo", {"ppo.critic": "reward_model", "model.head": "lm"}, "rl.reward_m"),
  ("reward", {"model.head": "lm"}, "model.head"),
  ("sft", {"quant.kind": "nf4"}, "quant.kind"),  # 4-bit and nothing trains
]


@pytest.mark.parametrize("objective, values, key", COMBOS)
def test_impossible_combinations(objective, values, key):
  c = base.base_config()
  c.objective = objective
  for k, v in values.items():
    _with(c, k, v)
  with pytest.raises(errors.ConfigError, match=rf"config\.{key}"):
    validate(c)
  if objective in ("grpo", "dpo"):  # fine where they do not combine
    c.objective = "clm"
    validate(c)


def test_all_violations_reported_at_once():
  c = base.base_config()
  c.lora.rank, c.dpo.beta, c.optimizer.lr = -1, -1.0, math.inf
  with pytest.raises(errors.ConfigError) as e:
    validate(c)
  msg = str(e.value)
  assert msg.startswith("3 config values are invalid:")
  for line in (
    "config.lora.rank=-1: must be >= 0",
    "config.dpo.beta=-1.0: must be > 0",
    "config.optimizer.lr=inf: must be > 0",
  ):
    assert line in msg
  assert isinstance(e.value, ValueError)  # callers catching ValueError


def test_enums_come_from_the_code():
  from jft import losses, optim
  from jft.objectives import sft

  for key, values in [
    ("objective", objectives.REGISTRY),
    ("dpo.loss_type", losses.LOSS_TYPES),
    ("kto.loss_type", losses.KTO_LOSS_TYPES),
    ("grpo.loss_type", losses.GRPO_AGGS),
    ("optimizer.schedule", optim.SCHEDULES),
    ("optimizer.name", optim.OPTIMIZERS),
    ("sft.truncation", sft.TRUNCATION),
  ]:
    for v in values:
      found = violations(_with(base.base_config(), key, v))
      assert not [f for f in found if f.startswith(f"config.{key}=")], found


def test_partial_configs_skip_missing_keys():
  import ml_collections

  assert violations(ml_collections.ConfigDict({"total_steps": 5})) == []
  bad = ml_collections.ConfigDict({"total_steps": 0})
  assert violations(bad) == [
    "config.total_steps=0: must be >= 1, or 0 with config.data.num_epochs "
    "set (as many steps as those passes over the training data take)"
  ]


def test_deep_user_errors_are_config_errors(tmp_path):
  with pytest.raises(errors.ConfigError, match="config.objective"):
    objectives.get("nope")
  with pytest.raises(FileNotFoundError, match="no config file") as e:
    init.load_config_file("configs/nope.py")
  assert isinstance(e.value, errors.UserError)
  c = base.base_config()
  c.data.tokenizer = str(tmp_path / "nope.model")
  with pytest.raises(errors.UserError, match=r"config\.data\.tokenizer="):
    init.find_tokenizer(c)
  c.data.tokenizer, c.init = "", f"hf:{tmp_path}"
  with pytest.raises(FileNotFoundError, match=r"config\.init='hf:") as e:
    init.find_tokenizer(c)
  assert errors.exit_code(e.value) == errors.EXIT_USER


# ------------------------------------------------------------ the CLI


def _cli(tmp_path, *args):
  """`python -m jft.main ARGS` from the repo root; never trains a stage
  (its cache is private and checked, and the timeout is short)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", JFT_CACHE=str(tmp_path / "c"))
  env.pop(cli.VERBOSE_ENV, None)
  cmd = [sys.executable, "-m", "jft.main", f"--workdir={tmp_path / 'w'}"]
  return subprocess.run(
    cmd + list(args),
    capture_output=True,
    text=True,
    env=env,
    cwd=ROOT,
    timeout=120,
  )


def _one_error(out, tmp_path, *wants):
  """Exit 2, one `error:` line (plus indented ones), no traceback, nothing
  trained."""
  assert out.returncode == errors.EXIT_USER, out.stderr[-3000:]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  lines = [ln for ln in out.stderr.splitlines() if ln.startswith("error: ")]
  assert len(lines) == 1, out.stderr[-3000:]
  for want in wants:
    assert want in out.stderr, out.stderr[-3000:]
  assert not os.path.exists(tmp_path / "c")  # no earlier stage ran
  ckpt = tmp_path / "w" / "checkpoints"
  assert not ckpt.exists() or not [p for p in ckpt.iterdir() if p.is_dir()]


@pytest.mark.parametrize(
  "args, wants",
  [
    (
      [f"--config={CLM}", "--config.optimizer.learning_rate=1"],
      [
        "--config.optimizer.learning_rate: no such config key "
        "'optimizer.learning_rate'; did you mean 'optimizer.lr'?"
      ],
    ),
    (
      [f"--config={CLM}", "--config.total_steps=abc"],
      ["--config.total_steps=abc", "takes an int"],
    ),
    (["--config=configs/nope.py"], ["no such config file 'configs/nope.py'"]),
    (
      [f"--config={CLM}", "--config.data.train_files=/nope.jsonl"],
      ["/nope.jsonl: file not found"],
    ),
    (  # configs/dpo.py starts from run:configs/sft.py: nothing may train
      [f"--config={DPO}", "--config.lora.rank=-1", "--config.dpo.beta=-1"],
      ["config.lora.rank=-1: must be >= 0", "config.dpo.beta=-1.0: must be"],
    ),
  ],
  ids=["mistyped_key", "wrong_type", "no_config_file", "no_data", "values"],
)
def test_cli_user_errors(tmp_path, args, wants):
  _one_error(_cli(tmp_path, *args), tmp_path, *wants)


def test_cli_verbose_shows_the_traceback(tmp_path):
  out = _cli(tmp_path, f"--config={DPO}", "--config.dpo.beta=-1", "--verbose")
  assert out.returncode == errors.EXIT_USER, out.stderr[-3000:]
  assert "Traceback" in out.stderr and "jft/validate.py" in out.stderr
  assert out.stderr.rstrip().endswith(
    "error: config.dpo.beta=-1.0: must be > 0 and finite"
  )
