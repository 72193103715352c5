"""The trainer: accumulation, resume, config errors, non-finite loss, CLI."""

import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from conftest import tiny_config
from ml_collections import config_flags

from jft import checkpoint, init, optim, steps, train
from jft import config as config_lib
from jft.data.tokenizer import Tokenizer
from jft.models import transformer
from jft.objectives.clm import CLM
from jft.state import TrainState, split_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _train_losses(workdir):
  return {
    r["step"]: r["train/loss"] for r in _metrics(workdir) if "train/loss" in r
  }


def test_grad_accumulation_equals_one_big_batch(suite_dir):
  config = tiny_config(suite_dir)
  tok = Tokenizer.load(config.data.tokenizer)
  model_cfg = init.model_config(config, tok)
  model = transformer.Transformer(model_cfg)
  params = jax.jit(model.init)(  # jitted: eager init is several times slower
    jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)
  )
  trainable, frozen = split_params(
    jax.tree.map(lambda x: x, __import__("flax").linen.unbox(params["params"])),
    train.freeze_table(config, model_cfg),
  )
  opt, sched = optim.make_optimizer(config.optimizer, 10, trainable)
  state = TrainState(
    step=jnp.zeros((), jnp.int32),
    trainable=trainable,
    frozen=frozen,
    opt_state=opt.init(trainable),
    rng=jax.random.PRNGKey(1),
  )
  rng = np.random.default_rng(0)
  b, t = 4, 16
  weights = np.zeros((b, t), np.float32)
  for i, n in enumerate([16, 3, 9, 1]):  # very unequal token counts
    weights[i, :n] = 1
  batch = {
    "inputs": rng.integers(5, 300, (b, t)).astype(np.int32),
    "targets": rng.integers(5, 300, (b, t)).astype(np.int32),
    "weights": weights,
    "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
    "segment_ids": np.ones((b, t), np.int32),
  }
  apply_fn = train.make_apply_fn(model)
  obj = CLM(config, tok)
  one = jax.jit(steps.make_train_step(obj, apply_fn, opt, sched, 1))
  two = jax.jit(steps.make_train_step(obj, apply_fn, opt, sched, 2))
  s1, m1 = one(state, batch)
  s2, m2 = two(state, batch)
  np.testing.assert_allclose(m1["train/loss"], m2["train/loss"], rtol=1e-5)
  np.testing.assert_allclose(
    m1["train/grad_norm"], m2["train/grad_norm"], rtol=1e-4
  )
  chex.assert_trees_all_close(s1.trainable, s2.trainable, atol=1e-6)
  # And the loss is the token-weighted mean, by hand from the logits.
  logits = jax.jit(apply_fn)(
    state.params, batch["inputs"], batch["positions"], batch["segment_ids"]
  )
  logp = jax.nn.log_softmax(np.asarray(logits, np.float64), -1)
  nll = -np.take_along_axis(np.asarray(logp), batch["targets"][..., None], -1)
  expect = (nll[..., 0] * weights).sum() / weights.sum()
  np.testing.assert_allclose(m1["train/loss"], expect, rtol=1e-5)


def test_split_microbatches_is_strided():
  x = np.arange(8)[:, None] * np.ones((1, 3))
  mb = steps.split_microbatches({"x": x}, 2)["x"]
  np.testing.assert_array_equal(mb[0][:, 0], [0, 2, 4, 6])
  np.testing.assert_array_equal(mb[1][:, 0], [1, 3, 5, 7])
  with pytest.raises(ValueError, match="grad_accum_steps=3"):
    steps.split_microbatches({"x": x}, 3)


@pytest.fixture(scope="module")
def whole_run(suite_dir, tmp_path_factory):
  """(config, workdir) of one uninterrupted tiny CLM run: 6 steps, saves at
  2, 4 and 6 keeping the newest 2. Other runs compare with it step by step."""
  config = tiny_config(
    suite_dir, total_steps=6, checkpoint_every=2, keep_checkpoints=2
  )
  workdir = str(tmp_path_factory.mktemp("whole"))
  train.run(config, workdir)
  return config, workdir


def _step_dirs(workdir):
  d = checkpoint.checkpoint_dir(workdir)
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def _per_step(workdir, key):
  """[value at step 1, 2, ...]: exactly one row per step."""
  rows = [r for r in _metrics(workdir) if key in r]
  assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)), key
  return np.asarray([r[key] for r in rows])


def test_stop_and_resume_equals_uninterrupted(whole_run, tmp_path, capsys):
  config, whole = whole_run
  parts = str(tmp_path / "parts")
  train.run(config, parts, stop_after=3)  # preempted after step 3
  assert checkpoint.Checkpointer(parts).latest_step() == 3
  assert _step_dirs(parts) == [2, 3]
  capsys.readouterr()
  train.run(config, parts)
  assert "Resuming" in capsys.readouterr().out
  a, b = _train_losses(whole), _train_losses(parts)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
  for s in a:
    np.testing.assert_allclose(a[s], b[s], rtol=1e-6, err_msg=f"step {s}")
  # Step-0 accounting logged once, and finished runs say so.
  rows = _metrics(parts)
  assert sum("params/trainable" in r for r in rows) == 1
  train.run(config, parts)
  assert "already finished" in capsys.readouterr().out


def test_keep_checkpoints_keeps_the_newest(whole_run):
  """keep_checkpoints=2 (the Checkpointer's own default is 3): of the
  saves at steps 2, 4 and 6 only the step directories 4 and 6 remain."""
  _, whole = whole_run
  assert _step_dirs(whole) == [4, 6]
  assert checkpoint.Checkpointer(whole).all_steps() == [4, 6]


def test_grad_accumulation_through_run_matches_one_batch(whole_run, tmp_path):
  """grad_accum_steps=2 through `train.run` (data, sharding, loop): the same
  per-step loss, grad norm and lr as the one-batch run, every step."""
  config, whole = whole_run
  config = config.copy_and_resolve_references()
  config.grad_accum_steps = 2
  config.eval_every, config.checkpoint_every = 0, 6  # neither affects training
  workdir = str(tmp_path / "accum")
  train.run(config, workdir)
  for key, rtol in (
    ("train/loss", 1e-5),
    ("train/grad_norm", 1e-4),
    ("train/lr", 1e-6),
  ):
    got, want = _per_step(workdir, key), _per_step(whole, key)
    assert len(got) == len(want) == 6, key
    np.testing.assert_allclose(got, want, rtol=rtol, err_msg=key)


def test_bfloat16_compute_trains_with_float32_params(whole_run, tmp_path):
  """model.dtype=bfloat16, param_dtype=float32: finite losses that fall,
  tracking (not equal to) the float32 run's; saved params stay float32."""
  config, whole = whole_run
  config = config.copy_and_resolve_references()
  config.model.dtype, config.model.param_dtype = "bfloat16", "float32"
  config.eval_every, config.checkpoint_every = 0, 6
  workdir = str(tmp_path / "bf16")
  train.run(config, workdir)
  got, want = _per_step(workdir, "train/loss"), _per_step(whole, "train/loss")
  assert len(got) == 6 and np.isfinite(got).all()
  assert got[-1] < got[0] - 0.05, got
  np.testing.assert_allclose(got, want, atol=0.01)  # observed: <= 1e-4
  assert not np.array_equal(got, want)  # bf16 compute really happened
  params = checkpoint.load_params(
    workdir, train.sharding.make_mesh(config.mesh)
  )
  dtypes = {np.asarray(x).dtype for x in jax.tree.leaves(params)}
  assert dtypes == {np.dtype(np.float32)}, dtypes


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(
  suite_dir, tmp_path
):
  config = tiny_config(
    suite_dir, total_steps=30, checkpoint_every=1, eval_every=0, log_every=5
  )
  config.optimizer.name = "sgd"  # plain SGD at 1e30 overflows to inf/NaN
  config.optimizer.lr = 1e30
  config.optimizer.schedule = "constant"
  config.optimizer.warmup_steps = 0
  config.optimizer.grad_clip_norm = 0.0
  config.optimizer.weight_decay = 0.0
  workdir = str(tmp_path / "nan")
  with pytest.raises(train.NonFiniteLossError, match=r"at step (\d+)") as e:
    train.run(config, workdir)
  bad = int(__import__("re").search(r"at step (\d+)", str(e.value)).group(1))
  ckpt = checkpoint.Checkpointer(workdir)
  good = ckpt.latest_step()
  assert good is not None and good < bad
  assert f"checkpoint is step {good}" in str(e.value)
  params = checkpoint.load_params(
    workdir, train.sharding.make_mesh(config.mesh)
  )
  for leaf in jax.tree.leaves(params):
    assert np.all(np.isfinite(leaf))


def test_bad_data_names_file_and_line(suite_dir, tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"text": "a b"}\n{"txt": "oops"}\n')
  config = tiny_config(suite_dir, **{"data.train_files": str(path)})
  with pytest.raises(ValueError, match=rf"{path}:2:.*text"):
    train.run(config, str(tmp_path / "w"))


def _parse(argv):
  fv = flags.FlagValues()
  args = ["prog", f"--config={ROOT}/configs/pretrain_clm.py", *argv]
  config_flags.DEFINE_config_file(
    "config", None, "", flag_values=fv, lock_config=True, sys_argv=args
  )
  fv(args)
  return fv.config


def test_config_overrides_and_errors():
  c = _parse(
    [
      "--config.total_steps=7",
      "--config.optimizer.lr=0.5",
      "--config.model.d_model=48",
    ]
  )
  assert (c.total_steps, c.optimizer.lr, c.model.d_model) == (7, 0.5, 48)
  with pytest.raises(Exception, match="totl_steps"):
    _parse(["--config.totl_steps=7"])
  with pytest.raises(Exception, match="total_steps"):
    _parse(["--config.total_steps=many"])
  with pytest.raises(AttributeError, match="no_such"):
    c.no_such = 1


def test_unmatched_freeze_rule_lists_paths(suite_dir, tmp_path):
  config = tiny_config(suite_dir, freeze=((r"embed/.*", "trainable"),))
  with pytest.raises(ValueError, match="lm_head/kernel"):
    train.run(config, str(tmp_path / "w"))


def test_cli_default_config_runs_end_to_end(tmp_path):
  """The real CLI on the default config (shortened), then 'finished' rerun."""
  workdir = str(tmp_path / "cli")
  cmd = [
    sys.executable,
    "-m",
    "jft.main",
    f"--config={ROOT}/configs/pretrain_clm.py",
    f"--workdir={workdir}",
    "--config.total_steps=4",
    "--config.eval_every=2",
    "--config.log_every=2",
    "--config.data.builtin.n_train=200",
    "--config.data.builtin.n_eval=10",
  ]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(
    cmd, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "effective batch: 16 rows x 128 tokens = 2,048 tokens" in out.stdout
  assert "schedule: 4 steps, warmup 3, cosine decay" in out.stdout
  assert f"tensorboard --logdir {workdir}/tb" in out.stdout
  rows = _metrics(workdir)
  assert rows[0]["step"] == 0 and rows[0]["params/trainable"] > 0
  assert {
    "train/loss",
    "train/lr",
    "train/grad_norm",
    "train/tokens_per_s",
    "eval/loss",
    "eval/perplexity",
  } <= set(rows[-1])
  for name in ("config.json", "tokenizer.model", "tb", "checkpoints"):
    assert os.path.exists(os.path.join(workdir, name)), name
  again = subprocess.run(
    cmd, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600
  )
  assert again.returncode == 0 and "already finished" in again.stdout


def test_stage_cache_key_follows_config_preset_and_suite(tmp_path, monkeypatch):
  from jft import config as base
  from jft.data import tasks
  from jft.models import presets

  c = base.base_config()
  c.stage_cache = str(tmp_path)
  a, _ = init.stage_workdir("configs/pretrain_clm.py", c)
  assert a.startswith(str(tmp_path)) and "pretrain_clm-" in a
  assert init.stage_workdir("configs/pretrain_clm.py", c)[0] == a
  assert init.stage_workdir("configs/pretrain_clm.py:mini", c)[0] != a
  changed = dict(presets.PRESETS["tiny"], d_model=96)
  monkeypatch.setitem(presets.PRESETS, "tiny", changed)
  b, _ = init.stage_workdir("configs/pretrain_clm.py", c)
  assert b != a
  # a new built-in suite format retrains stages that trained on the suite
  monkeypatch.setattr(tasks, "FORMAT_VERSION", tasks.FORMAT_VERSION + 1)
  assert init.stage_workdir("configs/pretrain_clm.py", c)[0] != b


def test_num_epochs_sets_the_steps_and_ends_when_the_data_does(
  suite_dir, tmp_path, capsys
):
  """14 one-row documents, unpacked, 2 epochs = 28 rows; batch 8: 4 steps
  (the last 4 rows + 4 padding rows). With total_steps=100 too, the data
  ends first: the run stops at step 4 with its message, final checkpoint
  and summary, its schedule spanning 4 steps; a resume and a rerun agree."""
  data = tmp_path / "short.jsonl"
  data.write_text(
    "".join(json.dumps({"text": f"{i} plus {i}"}) + "\n" for i in range(14))
  )
  config = tiny_config(
    suite_dir,
    total_steps=100,
    eval_every=0,
    checkpoint_every=50,
    **{
      "data.train_files": str(data),
      "data.num_epochs": 2,
      "data.packing": False,
      "optimizer.warmup_steps": 1,
    },
  )
  workdir = str(tmp_path / "epochs")
  train.run(config, workdir, stop_after=2)
  out = capsys.readouterr().out
  assert "effective batch: 8 rows x 32 tokens = 256 tokens per step" in out
  assert (
    "schedule: 4 steps, warmup 1, cosine decay to 0.0001 over 3, peak lr "
    "0.001 (2 epochs of the data)"
  ) in out
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  assert saved["total_steps"] == 4 and saved["runtime"]["data_steps"] == 4
  train.run(config, workdir)  # resumes at 2
  out = capsys.readouterr().out
  assert "data exhausted after 2 epochs at step 4 of 100" in out
  assert f"done: {workdir} (step 4)" in out
  assert f"tensorboard --logdir {workdir}/tb" in out
  assert "train/loss " in out[out.index("done: ") :]
  assert checkpoint.Checkpointer(workdir).latest_step() == 4
  state = os.path.join(workdir, "checkpoints", "4", "data")
  with open(os.path.join(state, "process_0-of-1.json")) as f:
    assert json.load(f) == {"next_index": 28}  # every row, twice
  lrs = _per_step(workdir, "train/lr")
  want = [optim.make_schedule(config.optimizer, 4)(i) for i in range(4)]
  np.testing.assert_allclose(lrs, want, rtol=1e-6)
  longer = optim.make_schedule(config.optimizer, 100)(3)
  assert abs(lrs[-1] - longer) > 1e-5  # the schedule is 4 steps long
  config.total_steps = 0  # from the data alone: the same run, finished
  train.run(config, workdir)
  assert "already finished (step 4 of 4)" in capsys.readouterr().out


def test_steps_batch_line_and_summary_by_hand(suite_dir, tmp_path):
  from jft.errors import ConfigError
  from jft.validate import validate

  c = tiny_config(suite_dir, total_steps=0, batch_size=32, seq_len=128)
  with pytest.raises(ConfigError, match="total_steps=0: must be >= 1, or 0"):
    validate(c)
  c.data.num_epochs = 2
  validate(c)
  assert train.total_steps(c, 37) == 37
  c.total_steps = 20
  assert (train.total_steps(c, 37), train.total_steps(c, 7)) == (20, 7)
  c.data.num_epochs = None
  assert train.total_steps(c, None) == 20
  c.objective, c.data.num_epochs = "grpo", 1
  with pytest.raises(ConfigError, match="num_epochs=1: must be None for obj"):
    validate(c)
  c.grad_accum_steps = 2
  assert train.describe_batch(c, 2) == (
    "effective batch: 32 rows x 128 tokens = 4,096 tokens per step "
    "(2 processes x 2 accumulated micro-batches x 8 rows)"
  )
  assert train.describe_batch(c, 1).endswith(
    "(2 accumulated micro-batches x 16 rows)"
  )
  c.objective = "dpo"  # a row is a pair: chosen and rejected
  assert train.describe_batch(c, 1) == (
    "effective batch: 32 pairs x 2 x 128 tokens = 8,192 tokens per "
    "step (2 accumulated micro-batches x 16 pairs)"
  )
  c.dpo.pack_pairs = True  # rows of 2 x seq_len, whole pairs in each
  assert train.describe_batch(c, 1).startswith(
    "effective batch: 32 rows x 2 x 128 tokens (packed pairs) = 8,192"
  )
  # The end summary: the last value of each headline metric present, and
  # the files a run wrote.
  rows = [{"step": 0, "eval/loss": 3.0}, {"step": 5, "train/loss": 1.5}]
  rows += [{"step": 5, "eval/loss": 2.0, "eval/task_accuracy": 0.25}]
  (tmp_path / "metrics.jsonl").write_text(
    "".join(json.dumps(r) + "\n" for r in rows)
  )
  (tmp_path / "summary.md").write_text("| |\n")
  text = train.end_summary(str(tmp_path), 5)
  assert text.splitlines() == [
    f"done: {tmp_path} (step 5)",
    "  train/loss 1.5000  eval/loss 2.0000  eval/task_accuracy 0.2500",
    f"  summary: {tmp_path}/summary.md",
    f"  tensorboard --logdir {tmp_path}/tb",
  ]
  (tmp_path / "curves.png").write_bytes(b"")
  assert f"  curves: {tmp_path}/curves.png" in train.end_summary(
    str(tmp_path), 5
  )


def test_lr_scale_multiplies_matching_leaves_only():
  """`optimizer.lr_scale`: plain SGD makes the update -lr*factor*grad on
  the matching leaves and -lr*grad elsewhere (hand-computed)."""
  cfg = config_lib.base_config().optimizer
  cfg.name, cfg.schedule, cfg.warmup_steps, cfg.b1 = "sgd", "constant", 0, 0.0
  cfg.lr, cfg.weight_decay, cfg.grad_clip_norm = 0.5, 0.0, 0.0
  cfg.lr_scale = "value_head=10"
  params = {
    "value_head": {"kernel": jnp.ones((2, 1))},
    "trunk": {"kernel": jnp.ones((2, 2))},
  }
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.2), params)
  opt, _ = optim.make_optimizer(cfg, 5, params)
  updates, _ = opt.update(grads, opt.init(params), params)
  np.testing.assert_allclose(updates["value_head"]["kernel"], -1.0, rtol=1e-6)
  np.testing.assert_allclose(updates["trunk"]["kernel"], -0.1, rtol=1e-6)
  for bad in ("value_head", "value_head=x", "nothing_here=2", "=2", "v=nan"):
    cfg.lr_scale = bad
    with pytest.raises(ValueError, match="lr_scale"):
      optim.make_optimizer(cfg, 5, params)
