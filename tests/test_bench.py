"""The benchmarks still run (tiny shapes, a step or two) and count right.

Only keeps the benchmark from rotting; its timings are never asserted.
"""

import importlib.util
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from jft.models import transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
  """bench/NAME.py as a module."""
  path = os.path.join(ROOT, "bench", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _load_bench():
  return _load("throughput")


def test_flop_count_by_hand():
  tp = _load_bench()
  cfg = transformer.config_from_dict({"preset": "tiny"})
  # tiny: D=64, L=2, H=4, KV=2, Dh=16, F=128, V=512.
  per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128  # q,o + k,v + mlp
  n_matmul = 2 * per_layer + 64 * 512  # + LM head; no embedding table
  params = jax.eval_shape(
    transformer.Transformer(cfg).init,
    jax.random.PRNGKey(0),
    jax.ShapeDtypeStruct((1, 8), jnp.int32),
  )["params"]
  assert tp.matmul_params(nn.unbox(params)) == n_matmul == 106_496
  # 6N plus causal attention 6 * L * H * Dh * T (half of PaLM's 12).
  assert tp.model_flops_per_token(cfg, n_matmul, 16) == (
    6 * 106_496 + 6 * 2 * 4 * 16 * 16
  )


def test_throughput_runs_tiny(tmp_path, capsys):
  tp = _load_bench()
  out = tmp_path / "bench.json"
  argv = ["--preset", "tiny", "--batch", "2", "--seq", "16", "--steps", "2"]
  argv += ["--warmup", "1", "--peak_reps", "2", "--json", str(out)]
  res = tp.main(argv)
  printed = capsys.readouterr().out
  assert "tokens/s" in printed and "MFU" in printed
  for key in (
    "compile_s",
    "step_s",
    "tokens_per_s",
    "peak_gflops",
    "mfu",
    "peak_rss_mib",
    "final_loss",
  ):
    assert math.isfinite(res[key]) and res[key] > 0, (key, res[key])
  assert res["tokens_per_s"] == 2 * 16 / res["step_s"]
  saved = json.loads(out.read_text())
  assert saved["args"]["preset"] == "tiny" and saved["step_s"] == res["step_s"]


def test_decode_bench_runs_tiny(capsys):
  out = _load("decode").main(
    ["--preset", "tiny", "--batch", "2", "--new", "4", "--reps", "1"]
  )["decode"]
  assert "speed-up" in capsys.readouterr().out
  assert out["agree"] == 1.0  # cache and no-cache decode the same tokens
  assert out["kv cache"] > 0 and out["no cache"] > 0


def test_load_memory_bench_runs_tiny(tmp_path, capsys):
  rows = _load("load_memory").main(
    [
      "--preset",
      "tiny",
      "--dir",
      str(tmp_path),
      "--modes",
      "bfloat16,qlora-nf4",
    ]
  )
  assert [r["mode"] for r in rows] == ["bfloat16", "qlora-nf4"]
  assert all(r["peak_mib"] >= r["runtime_mib"] > 0 for r in rows)


def test_memory_bench_runs_tiny(capsys):
  """Each case in its own process; jft's remat row plans fewer
  temporaries than remat=none; the PyTorch QLoRA row is explained."""
  cases = "jft-full,jft-full-remat-full,torch-lora,torch-qlora-nf4"
  argv = ["--shape", "tiny", "--steps", "1", "--warmup", "0"]
  rows = _load("memory").main(argv + ["--remat", "full", "--cases", cases])
  printed = capsys.readouterr().out
  by = {r["case"]: r for r in rows}
  assert list(by) == cases.split(",")[:3]
  for r in rows:
    assert r["peak_mib"] >= r["runtime_mib"] > 0, r
    assert r["param_bytes"] > 0 and r["opt_bytes"] > 0, r
  assert by["torch-lora"]["opt_bytes"] < by["jft-full"]["opt_bytes"]
  assert by["jft-full-remat-full"]["temp_bytes"] < by["jft-full"]["temp_bytes"]
  assert "| jft | full fine-tuning, remat=full |" in printed
  assert "| QLoRA nf4 (PEFT) | not measured" in printed


def _check_compare_rows(rows, printed, workloads, dtypes):
  assert [(r["workload"], r["dtype"]) for r in rows] == [
    (w, d) for w in workloads for d in dtypes
  ]
  for r in rows:
    for key in (
      "jft_step_s",
      "torch_step_s",
      "jft_tokens_per_s",
      "torch_tokens_per_s",
      "ratio",
      "jft_params",
      "jft_trainable",
    ):
      assert math.isfinite(r[key]) and r[key] > 0, (r["workload"], key)
    assert math.isfinite(r["jft_loss"]) and math.isfinite(r["torch_loss"])
    assert r["jft_params"] == r["torch_params"]
    assert r["jft_trainable"] == r["torch_trainable"]
    line = f"| {r['workload']} | {r['dtype']} | {r['jft_step_s']:.3f} s |"
    assert line in printed
  assert "jft / PyTorch" in printed


def test_compare_quick_full_lora(capsys):
  """jft vs transformers (+ PEFT), bf16 autocast; seconds, not minutes.
  With jft's opt-in hand-written backward passes, which the header names."""
  argv = ["--quick", "--workloads", "full,lora", "--dtypes", "bfloat16"]
  argv += ["--attention_vjp", "--mlp_vjp"]
  rows = _load("compare").main(argv)
  printed = capsys.readouterr().out
  _check_compare_rows(rows, printed, ["full", "lora"], ["bfloat16"])
  assert "hand-written (model.attention_vjp=True)" in printed
  assert "hand-written (model.mlp_vjp=True)" in printed
  lora = rows[1]
  assert 0 < lora["jft_trainable"] < lora["jft_params"] / 2  # adapters only


def test_compare_quick_dpo(capsys):
  """jft's DPO step vs TRL's DPOTrainer; skipped without trl (not in the
  test extra)."""
  pytest.importorskip("trl")
  argv = ["--quick", "--workloads", "dpo", "--dtypes", "bfloat16"]
  rows = _load("compare").main(argv)
  printed = capsys.readouterr().out
  _check_compare_rows(rows, printed, ["dpo"], ["bfloat16"])
  assert rows[0]["torch_system"] == "TRL DPOTrainer"


def test_compare_report_ratios():
  """The table and the bf16-vs-f32 ratio, from made-up rows."""
  cmp = _load("compare")
  args = cmp.parse_args(["--quick", "--workloads", "full"])
  rows = [
    {
      "workload": "full",
      "dtype": d,
      "torch_system": "transformers",
      "jft_step_s": js,
      "torch_step_s": ts,
      "jft_tokens_per_s": 1.0,
      "torch_tokens_per_s": 1.0,
      "ratio": js / ts,
      "jft_params": 10,
      "jft_trainable": 10,
      "torch_params": 10,
      "torch_trainable": 10,
    }
    for d, js, ts in (("float32", 0.6, 0.3), ("bfloat16", 0.15, 0.2))
  ]
  assert cmp.bf16_vs_f32(rows) == {"full": 0.5}
  info = cmp.machine_info(2)
  text = cmp.format_report(info, args, rows)
  assert "| full | 0.50 |" in text and "| full | float32 | 0.600 s |" in text
  assert args.shape == "tiny" and args.dtypes == ["float32", "bfloat16"]


def test_pipeline_bench_phases_run_tiny(tmp_path, suite_dir):
  """The corpus generator writes what it says, and the streamed and eager
  phases read it (the step and jft.main phases are other tests' code)."""
  bp = _load("pipeline")
  corpus = str(tmp_path / "c.jsonl")
  bp.make_corpus(corpus, mb=1)
  assert os.path.getsize(corpus) >= 2**20
  with open(corpus) as f:
    assert all(json.loads(line)["text"] for line in f)
  tok = str(suite_dir / "tok.model")
  s = bp.phase_stream(corpus, tok, batches=3)
  assert s["records"] > 100 and s["tokens_per_s"] > 0
  assert s["first_batch_s"] >= s["index_s"] > 0
  e = bp.phase_eager(corpus, tok)
  assert e["first_batch_s"] > 0 and e["data_mib"] >= 0


def test_hostmem_bench_runs_tiny(capsys):
  """Fresh processes per mode; the loss is the same with either setting."""
  rows = _load("hostmem").main(
    ["--preset", "tiny", "--dtypes", "float32", "--rounds", "1", "--steps", "2"]
  )
  printed = capsys.readouterr().out
  assert [(r["dtype"], r["mode"]) for r in rows] == [
    ("float32", "jft"),
    ("float32", "thresholds"),
    ("float32", "default"),
  ]
  assert "no mmap" in rows[0]["settings"]
  assert "32 MiB" in rows[1]["settings"]
  assert "glibc malloc defaults" in rows[2]["settings"]
  assert all(r["losses_equal"] and r["step_s"] > 0 for r in rows)
  assert rows[2]["ratio"] == 1.0
  assert "| float32 | jft |" in printed
