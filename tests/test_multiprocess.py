"""Multi-host code path on one machine: 2 processes x 4 fake CPU devices.

`launch/local.py` starts two `jft.main` processes (loopback coordinator, gloo
CPU collectives). They must reproduce a 1-process 8-device run step by step,
read disjoint halves of the data, write outputs from process 0 only, and
leave a checkpoint a 1-process run restores. Also: the launchers' dry runs
and `jft.main`'s detection of multi-process environments.

Loss tolerance: rtol 1e-5, as in test_sharding.py (same mesh, the same
global batches; only float32 reduction order may differ).
"""

import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from absl import app
from conftest import set_keys
from safetensors.numpy import load_file

from jft import checkpoint, sharding, train
from jft.data import pipeline
from jft.data.tokenizer import Tokenizer
from jft.objectives.clm import CLM
from jft.state import flat_paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "pretrain_clm.py")
N_DOCS, BATCH, SEQ_LEN = 64, 8, 32
STEPS = N_DOCS // BATCH  # exactly one epoch: every document once
TINY_FROM_SCRATCH = {
  "model.d_model": 32,
  "model.mlp_dim": 64,
  "model.n_heads": 2,
  "model.n_kv_heads": 1,
  "init": "",
}
RTOL = 1e-5


def _load(name):
  spec = importlib.util.spec_from_file_location(
    f"launch_{name}", os.path.join(ROOT, "launch", f"{name}.py")
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


local, tpu_pod, slurm = _load("local"), _load("tpu_pod"), _load("slurm")


# ------------------------------------------------------------ launchers


def test_local_launcher_prefixes_output_and_returns_first_failure(tmp_path):
  py = sys.executable
  out = io.StringIO()
  mark = tmp_path / "p1_started"  # p0 fails only once p1 has printed
  code = local.run(
    [
      [
        py,
        "-c",
        "import os, sys, time\n"
        f"while not os.path.exists({str(mark)!r}): time.sleep(0.05)\n"
        "print('bye'); sys.exit(3)",
      ],
      [
        py,
        "-c",
        "import time; print('hi', flush=True); "
        f"open({str(mark)!r}, 'w').close(); time.sleep(120)",
      ],
    ],
    dict(os.environ),
    timeout=60,
    grace=5,
    out=out,
  )
  assert code == 3  # the failing process's code, not the stopped one's
  text = out.getvalue()
  assert "[p0] bye" in text and "[p1] hi" in text
  assert "process 0 exited with 3" in text


def test_local_launcher_timeout_kills_everything():
  py = sys.executable
  out = io.StringIO()
  sleep = [py, "-c", "import time; time.sleep(120)"]
  code = local.run([sleep, sleep], dict(os.environ), timeout=1, out=out)
  assert code == local.TIMEOUT_EXIT == 124
  assert "timeout" in out.getvalue()


def test_local_launcher_dry_run(capsys):
  argv = ["--dry_run", "-n", "3", "--devices_per_process=2", "--port=1234"]
  assert local.main(argv + ["--", "--config=c.py", "--workdir=w"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 3
  for i, line in enumerate(lines):
    assert "--xla_force_host_platform_device_count=2" in line
    assert "JAX_PLATFORMS=cpu" in line
    assert "JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo" in line
    assert line.endswith(
      "-m jft.main --config=c.py --workdir=w --coordinator_address="
      f"127.0.0.1:1234 --num_processes=3 --process_id={i}"
    )


def test_tpu_pod_launcher_dry_run(capsys):
  argv = ["--tpu=pod", "--zone=us-central2-b", "--project=p", "--sync"]
  argv += ["--setup=pip install -e .", "--dry_run", "--"]
  argv += ["--config=configs/sft.py", "--workdir=/nfs/runs/a"]
  assert tpu_pod.main(argv) == 0
  scp, ssh = capsys.readouterr().out.strip().splitlines()
  assert scp.startswith("gcloud compute tpus tpu-vm scp --recurse")
  assert "--worker=all" in scp and "--project=p" in scp
  assert ssh.startswith("gcloud compute tpus tpu-vm ssh pod --worker=all")
  assert "--zone=us-central2-b" in ssh
  assert (
    "pip install -e . && python3 -m jft.main --config=configs/sft.py" in ssh
  )
  assert ssh.endswith("--workdir=/nfs/runs/a --distributed=on'")
  with pytest.raises(SystemExit):  # a pod run needs a shared --workdir
    tpu_pod.main(["--tpu=pod", "--zone=z", "--dry_run", "--", "--config=c"])


def test_slurm_launcher_dry_run(capsys):
  argv = ["--nodes=4", "--gpus_per_node=8", "--partition=gpu", "--dry_run"]
  argv += ["--env=XLA_PYTHON_CLIENT_MEM_FRACTION=.9", "--"]
  argv += ["--config=configs/sft.py", "--workdir=/shared/r"]
  assert slurm.main(argv) == 0
  text = capsys.readouterr().out
  assert text.startswith("#!/bin/bash\n")
  for line in (
    "#SBATCH --nodes=4",
    "#SBATCH --ntasks-per-node=8",  # one process per GPU
    "#SBATCH --gpus-per-node=8",
    "#SBATCH --partition=gpu",
    "#SBATCH --output=/shared/r/slurm-%j.out",
    "export XLA_PYTHON_CLIENT_MEM_FRACTION=.9",
    "srun --kill-on-bad-exit=1 python -m jft.main --config=configs/sft.py "
    "--workdir=/shared/r",
  ):
    assert line in text.splitlines(), line
  with pytest.raises(SystemExit):
    slurm.main(["--dry_run", "--", "--config=c"])


# ------------------------------------------------ distributed detection


def test_distributed_args_from_flags_and_environments():
  from jft.main import distributed_args as da

  assert da("auto", None, None, None, {}) is None
  assert da("auto", "h:1", 2, 1, {}) == dict(
    coordinator_address="h:1", num_processes=2, process_id=1
  )
  with pytest.raises(app.UsageError, match="go together"):
    da("auto", "h:1", None, 0, {})
  with pytest.raises(app.UsageError, match="not in"):
    da("auto", "h:1", 2, 2, {})
  env = dict(JAX_COORDINATOR_ADDRESS="h:2", JAX_NUM_PROCESSES="4")
  assert da("auto", None, None, None, env | {"JAX_PROCESS_ID": "3"}) == dict(
    coordinator_address="h:2", num_processes=4, process_id=3
  )
  slurm_step = dict(SLURM_JOB_ID="7", SLURM_NTASKS="16", SLURM_PROCID="0")
  slurm_step["SLURM_STEP_NODELIST"] = "n[1-2]"
  assert da("auto", None, None, None, slurm_step) == {}  # JAX reads SLURM
  batch_script = {k: v for k, v in slurm_step.items() if "STEP" not in k}
  assert da("auto", None, None, None, batch_script) is None
  assert (
    da("auto", None, None, None, slurm_step | {"SLURM_NTASKS": "1"}) is None
  )
  assert da("auto", None, None, None, {"TPU_WORKER_HOSTNAMES": "a,b"}) == {}
  assert da("auto", None, None, None, {"TPU_WORKER_HOSTNAMES": "a"}) is None
  assert da("on", None, None, None, {}) == {}  # Cloud TPU VM: JAX detects
  assert da("off", "h:1", 2, 0, slurm_step) is None


# -------------------------------------------------- 2 processes vs 1


def _overrides(suite_dir, data_file):
  return {
    "model.d_model": 32,
    "model.mlp_dim": 64,
    "model.n_heads": 2,
    "model.n_kv_heads": 1,
    "total_steps": STEPS,
    "batch_size": BATCH,
    "eval_batch_size": BATCH,
    "seq_len": SEQ_LEN,
    "log_every": 1,
    "eval_every": STEPS,
    "checkpoint_every": STEPS,
    "optimizer.warmup_steps": 2,
    "data.tokenizer": str(suite_dir / "tok.model"),
    "data.train_files": str(data_file),
    "data.eval_files": str(suite_dir / "pretrain_eval.jsonl"),
    # In order and one document per row: the global batch of 2 processes
    # is then the 1-process batch with its rows permuted.
    "data.shuffle": False,
    "data.packing": False,
    "data.num_epochs": 1,
    "mesh.data": 2,
    "mesh.fsdp": 2,
    "mesh.tensor": 2,
  }


def _config(overrides, path=CONFIG):
  spec = importlib.util.spec_from_file_location("cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return set_keys(mod.get_config(), overrides)


def _examples(suite_dir, path):
  tok = Tokenizer.load(str(suite_dir / "tok.model"))
  obj = CLM(_config(_overrides(suite_dir, path)), tok)
  return obj.make_examples(pipeline.read_jsonl_files(str(path), obj.fields))


def _short_docs(suite_dir, tmp_path):
  """N_DOCS distinct documents that each fit one row (one piece each)."""
  with open(suite_dir / "pretrain_train.jsonl") as f:
    lines = list(dict.fromkeys(f.read().splitlines()))
  probe = tmp_path / "all.jsonl"
  probe.write_text("\n".join(lines) + "\n")
  lengths = [len(e["inputs"]) for e in _examples(suite_dir, probe)]
  keep = [ln for ln, n in zip(lines, lengths, strict=True) if n <= SEQ_LEN]
  path = tmp_path / "train.jsonl"
  path.write_text("\n".join(keep[:N_DOCS]) + "\n")
  assert len(keep) >= N_DOCS
  return path


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _launch(args, timeout=420):
  """`launch/local.py` with 2 x 4 devices; `args` go to jft.main."""
  if not any(a.startswith("--config=") for a in args):
    args = [f"--config={CONFIG}", *args]
  cmd = [sys.executable, os.path.join(ROOT, "launch", "local.py")]
  cmd += ["--num_processes=2", "--devices_per_process=4"]
  cmd += [f"--timeout={timeout}", "--", *args]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.run(
    cmd, capture_output=True, text=True, env=env, timeout=timeout + 60
  )


@pytest.fixture(scope="module")
def runs(suite_dir, tmp_path_factory):
  """(2-process workdir, its output, 1-process workdir, data file)."""
  tmp = tmp_path_factory.mktemp("mp")
  data = _short_docs(suite_dir, tmp)
  overrides = _overrides(suite_dir, data)
  mp_dir, one_dir = str(tmp / "two"), str(tmp / "one")
  args = [f"--workdir={mp_dir}"]
  args += [f"--config.{k}={v}" for k, v in overrides.items()]
  out = _launch(args)
  assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-5000:]
  train.run(_config(overrides), one_dir)  # 1 process, the same 8 devices
  return mp_dir, out.stdout, one_dir, data


def test_two_processes_reproduce_one_process_losses(runs):
  mp_dir, _, one_dir, _ = runs
  two, one = _metrics(mp_dir), _metrics(one_dir)
  assert [r["step"] for r in two] == list(range(STEPS + 1))  # written once
  assert [r["step"] for r in one] == list(range(STEPS + 1))
  for a, b in zip(two[1:], one[1:], strict=True):
    np.testing.assert_allclose(
      a["train/loss"], b["train/loss"], rtol=RTOL, err_msg=f"step {a['step']}"
    )
  for s in (0, STEPS):  # eval shards by process too
    np.testing.assert_allclose(
      two[s]["eval/loss"], one[s]["eval/loss"], rtol=RTOL
    )
  assert len({r["train/loss"] for r in one[1:]}) == STEPS


def test_only_process_0_prints_and_writes(runs):
  mp_dir, stdout, _, _ = runs
  lines = stdout.splitlines()
  assert "[p0] 2 processes, 8 devices (4 per process)" in lines
  assert any(ln.startswith(f"[p0] step {STEPS}/{STEPS}") for ln in lines)
  assert any(ln.startswith("[p0] params: ") for ln in lines)
  p1 = [ln for ln in lines if ln.startswith("[p1] ")]
  assert not [ln for ln in p1 if "step " in ln or "params:" in ln], p1
  assert os.path.exists(os.path.join(mp_dir, "config.json"))


def test_processes_read_disjoint_halves_of_the_split(suite_dir, runs):
  mp_dir, _, one_dir, data = runs
  # Each process saved its own iterator: it read exactly half the split
  # (N_DOCS one-piece documents, one epoch), the 1-process run all of it.
  step_dir = os.path.join(mp_dir, "checkpoints", str(STEPS), "data")
  for i in range(2):
    with open(os.path.join(step_dir, f"process_{i}-of-2.json")) as f:
      assert json.load(f) == {"next_index": N_DOCS // 2}
  with open(
    os.path.join(
      one_dir, "checkpoints", str(STEPS), "data", "process_0-of-1.json"
    )
  ) as f:
    assert json.load(f) == {"next_index": N_DOCS}
  # Which halves: the shards train.py asks for (process_index of count) are
  # disjoint and together the whole split; with the per-step losses above
  # equal to the 1-process run's, each global batch held the same rows.
  examples = _examples(suite_dir, data)
  rows = []
  for i in range(2):
    it = pipeline.make_train_iter(
      examples,
      seq_len=SEQ_LEN,
      batch_size=BATCH // 2,
      seed=0,
      pad_id=0,
      shuffle=False,
      num_epochs=1,
      shard_index=i,
      shard_count=2,
      packing=False,
    )
    rows.append({tuple(r) for b in it for r in b["inputs"].tolist()})
  pad = [(0,) * (SEQ_LEN - len(e["inputs"])) for e in examples]
  everything = {
    tuple(e["inputs"].tolist()) + p for e, p in zip(examples, pad, strict=True)
  }
  assert len(everything) == N_DOCS
  assert not rows[0] & rows[1]
  assert rows[0] | rows[1] == everything


def test_two_process_checkpoint_restores_in_one_process(runs):
  mp_dir, _, one_dir, _ = runs
  laptop = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1, num_devices=1))
  restored = flat_paths(checkpoint.load_params(mp_dir, laptop))
  reference = flat_paths(checkpoint.load_params(one_dir, laptop))
  assert sorted(restored) == sorted(reference)
  for path, value in reference.items():
    np.testing.assert_allclose(restored[path], value, atol=1e-5, err_msg=path)


def test_lora_adapters_exported_from_two_processes(suite_dir, tmp_path):
  """Adapters sharded over both processes are gathered, then written once.

  Needs train.export to gather on every process (the proposed train.py
  change); a bare `jax.device_get` on process 0 cannot read process 1.
  """
  workdir = tmp_path / "lora"
  sets = {
    **TINY_FROM_SCRATCH,
    "total_steps": 2,
    "batch_size": BATCH,
    "seq_len": SEQ_LEN,
    "eval_every": 0,
    "data.tokenizer": str(suite_dir / "tok.model"),
    "data.train_files": str(suite_dir / "sft_train.jsonl"),
    "mesh.fsdp": 4,
    "mesh.tensor": 2,
  }
  args = [f"--workdir={workdir}", f"--config={ROOT}/configs/lora.py"]
  out = _launch(args + [f"--config.{k}={v}" for k, v in sets.items()])
  assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-3000:]
  assert out.stdout.count("adapters: ") == 1  # process 0 only
  laptop = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1, num_devices=1))
  params = flat_paths(checkpoint.load_params(str(workdir), laptop))
  ad = load_file(str(workdir / "adapters" / "adapter_model.safetensors"))
  prefix = "base_model.model.model.layers.1."
  np.testing.assert_array_equal(  # PEFT layouts: A [r, in], B [out, r]
    ad[prefix + "self_attn.q_proj.lora_A.weight"],
    params["layers/attn/q/lora_a"][1].T,
  )
  np.testing.assert_array_equal(
    ad[prefix + "mlp.down_proj.lora_B.weight"],
    params["layers/mlp/down/lora_b"][1].T,
  )
  assert np.abs(params["layers/mlp/down/lora_b"]).max() > 0  # it trained


def test_onpolicy_pairs_mined_by_two_processes_match_one(suite_dir, tmp_path):
  """Every process joins the sharded decoding; process 0 alone writes."""
  sets = {
    **TINY_FROM_SCRATCH,
    "model.preset": "tiny",
    "total_steps": 2,
    "batch_size": BATCH,
    "eval_every": 2,
    "checkpoint_every": 2,
    "data.tokenizer": str(suite_dir / "tok.model"),
    "data.builtin.n_train": 8,
    "data.builtin.n_eval": 2,
    "dpo.mine_prompts": 16,
    "dpo.mine_samples": 1,
    "sft.max_new_tokens": 4,
    "sft.max_eval_generations": 8,
    "mesh.fsdp": 4,
    "mesh.tensor": 2,
  }
  config = f"--config={ROOT}/configs/dpo.py"
  two = tmp_path / "two"
  out = _launch(
    [f"--workdir={two}", config]
    + [f"--config.{k}={v}" for k, v in sets.items()]
  )
  assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-3000:]
  assert out.stdout.count("dpo on-policy train pairs") == 1  # process 0
  assert "eval/task_accuracy" in _metrics(str(two))[-1]
  one = _config(sets, path=f"{ROOT}/configs/dpo.py")
  one.mesh.data, one.mesh.fsdp, one.mesh.tensor = 1, 8, 1
  train.run(one, str(tmp_path / "one"))
  for split in ("train", "eval"):
    name = f"data/onpolicy_{split}.jsonl"
    assert (two / name).read_text() == (tmp_path / "one" / name).read_text()


def test_num_epochs_two_processes_stop_together_on_unequal_shards(
  suite_dir, tmp_path
):
  """total_steps=0: one epoch of 9 one-row documents, unpacked. Process 0
  reads 5 (2 batches of 4 rows, the second padded), process 1 reads 4 (one
  batch): both take 2 steps, process 1 feeding a padding batch at step 2,
  and both save step 2 and end, with the same count in config.json."""
  lines = _short_docs(suite_dir, tmp_path).read_text().splitlines()[:9]
  data = tmp_path / "nine.jsonl"
  data.write_text("\n".join(lines) + "\n")
  sets = dict(_overrides(suite_dir, data), total_steps=0, eval_every=0)
  workdir = tmp_path / "epochs"
  out = _launch(
    [f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in sets.items()]
  )
  assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-3000:]
  assert [r["step"] for r in _metrics(str(workdir))] == [0, 1, 2]
  lines = out.stdout.splitlines()
  assert (
    "[p0] effective batch: 8 rows x 32 tokens = 256 tokens per step "
    "(2 processes x 4 rows)"
  ) in lines
  assert any(ln.startswith("[p0] schedule: 2 steps, ") for ln in lines)
  assert f"[p0] done: {workdir} (step 2)" in lines
  for i, read in enumerate((5, 4)):
    name = f"checkpoints/2/data/process_{i}-of-2.json"
    assert json.loads((workdir / name).read_text()) == {"next_index": read}
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["total_steps"] == 2 and saved["runtime"]["data_steps"] == 2


def test_multiprocess_run_requires_workdir():
  out = _launch(["--config.total_steps=1"], timeout=240)
  assert out.returncode != 0
  assert "--workdir is required with 2 processes" in out.stdout


def test_sigterm_to_the_launcher_saves_one_agreed_step_and_exits_75(
  suite_dir, tmp_path
):
  # Both processes must save at the same step (JAX's preemption sync point)
  # or the save's collectives hang; the launcher forwards the signal.
  workdir = tmp_path / "pre"
  overrides = dict(_overrides(suite_dir, suite_dir / "pretrain_train.jsonl"))
  overrides.update(
    {"total_steps": 2000, "checkpoint_every": 5000, "eval_every": 0}
  )
  args = [f"--config={CONFIG}", f"--workdir={workdir}"]
  args += [f"--config.{k}={v}" for k, v in overrides.items()]
  cmd = [sys.executable, os.path.join(ROOT, "launch", "local.py")]
  cmd += ["--num_processes=2", "--devices_per_process=4", "--timeout=400"]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.Popen(
    [*cmd, "--", *args],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  try:
    rows = workdir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
      if rows.exists() and rows.read_text().count('"train/loss"') >= 2:
        break
      time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0][-5000:]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=400)
  finally:
    proc.kill()
  assert proc.returncode == 75, out[-5000:]
  step = checkpoint.Checkpointer(str(workdir)).latest_step()
  assert step is not None and 0 < step < 2000, out[-3000:]
  # Each process says where it stopped: the same step.
  said = [ln for ln in out.splitlines() if "saved a checkpoint at step" in ln]
  assert len(said) == 2 and all(f"at step {step} " in ln for ln in said), out


def test_resume_with_another_process_count_is_a_named_error(runs):
  # Each process's data position is saved: one process resuming a
  # two-process run would read other rows, so the resume check refuses it.
  from jft import errors, resume

  mp_dir = runs[0]
  with open(os.path.join(mp_dir, "config.json")) as f:
    saved = json.load(f)
  assert saved["runtime"]["process_count"] == 2
  now = dict(saved, runtime={"process_count": 1})
  with pytest.raises(errors.ConfigError, match="runtime.process_count: 2 -> 1"):
    resume.check(mp_dir, now)
  resume.check(mp_dir, saved)  # the same count resumes
