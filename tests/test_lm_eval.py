"""jft.interop.lm_eval: a jft model in lm-evaluation-harness, offline.

Every number is checked against one computed here by hand (numpy on
`Model.logits`): loglikelihood (the tokenisation boundary included),
loglikelihood_rolling (a document longer than the window included),
generate_until's stop strings, and the accuracy, exact match and bits per
byte the harness reports for three small tasks defined in local files
(multiple choice, generation, rolling perplexity), run through
`simple_evaluate` and through `python -m jft.interop.lm_eval`.

One tiny CLM run (one step) is trained per module and loaded once.
"""

import glob
import json
import math
import os
import re
import subprocess
import sys
import types

import lm_eval
import numpy as np
import pytest
from conftest import tiny_config

# Tasks are local files: nothing may reach the Hub (set before lm_eval's
# task machinery and `datasets` read them).
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import jft  # noqa: E402
from jft import train  # noqa: E402
from jft.interop import lm_eval as jft_lm_eval  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WINDOW = 32  # the adapter's context window in these tests

MC_DOCS = [
  {"question": "add: 2 + 3 =", "choices": ["5", "7", "23"], "label": 0},
  {"question": "copy: a b c =", "choices": ["a b c", "c b a"], "label": 0},
  {"question": "reverse: x y =", "choices": ["x y", "y x", "y"], "label": 1},
  {"question": "sort: q a =", "choices": ["a q", "q a"], "label": 0},
]
GEN_PROMPTS = ["add: 4 + 4 =", "copy: h i j =", "sort: c b a ="]
LONG_DOC = " ".join(f"add: {i} + {i + 3} = {2 * i + 3}" for i in range(12))
PPL_DOCS = ["copy: a b = a b", LONG_DOC]


def _req(kind, args, i=0):
  return Instance(
    request_type=kind, doc={}, arguments=args, idx=i, metadata=("t", i, 1)
  )


def _log_softmax(logits) -> np.ndarray:
  x = logits.astype(np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _logits(model, ids) -> np.ndarray:
  """`Model.logits` of one sequence [T, V], run right-padded to a multiple
  of 32 (causal: padding changes nothing; few shapes compile)."""
  n = -(-len(ids) // 32) * 32
  padded = np.full((1, n), model.tokenizer.pad_id, np.int32)
  padded[0, : len(ids)] = ids
  return model.logits(padded)[0, : len(ids)]


def _seq_logp(model, ids) -> np.ndarray:
  """log p(ids[t] | ids[:t]) for t >= 1, by hand: [T-1]."""
  logp = _log_softmax(_logits(model, ids))
  return np.array([logp[t - 1, ids[t]] for t in range(1, len(ids))])


@pytest.fixture(scope="module")
def m(suite_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("lm_eval")
  config = tiny_config(suite_dir, objective="clm", total_steps=1, eval_every=0)
  config.checkpoint_every = 1
  config.mesh.num_devices = 1
  run = str(root / "run")
  train.run(config, run)
  model = jft.load(run)
  lm = jft_lm_eval.JftLM(model=model, batch_size=4, max_length=WINDOW)
  return types.SimpleNamespace(
    root=root, run=run, model=model, tok=model.tokenizer, lm=lm
  )


def _raw_generation(m, prompt, max_new) -> str:
  """Greedy text after `prompt` up to eos, no stop strings."""
  return m.model.generate_text([prompt], max_new_tokens=max_new)[0]


def _stop_in(raw: str) -> str:
  """A stop string that a generation holds after its first character."""
  return next((c for c in raw[1:] if c.isascii() and c.isalnum()), raw[1:3])


# ----------------------------------------------------------- the adapter


def test_loglikelihood_equals_numpy(m):
  tok = m.tok
  pairs = [
    ("add: 2 + 3 =", " 5"),
    ("copy: a b ", "c d"),  # trailing space moves to the continuation
    ("", "sort: b a = a b"),  # empty context: conditioned on bos
    ("reverse: " + "x " * 40 + "=", " y"),  # context past the window
  ]
  got = m.lm.loglikelihood([_req("loglikelihood", p) for p in pairs])
  for (ctx, cont), (lp, greedy) in zip(pairs, got, strict=True):
    if ctx:
      stripped = ctx.rstrip()  # its trailing space joins the continuation
      ctx_ids = tok.bos_prefix + tok.encode(stripped)
      whole = tok.bos_prefix + tok.encode(
        stripped + ctx[len(stripped) :] + cont
      )
    else:
      ctx_ids = tok.bos_prefix
      whole = tok.bos_prefix + tok.encode(cont)
    # The adapter scores exactly the continuation's tokens of the joined
    # text (no merge across these boundaries with jft's tokenizer).
    assert m.lm.encode_pair(ctx, cont) == (ctx_ids, whole[len(ctx_ids) :])
    k = len(whole) - len(ctx_ids)
    ids = whole[-(WINDOW + 1) :]  # left-truncated as the harness does
    logits = _logits(m.model, ids[:-1])
    logp = _log_softmax(logits)
    want = [logp[t - 1, ids[t]] for t in range(len(ids) - k, len(ids))]
    assert lp == pytest.approx(float(np.sum(want)), abs=1e-4)
    argmax = [
      int(np.argmax(logits[t - 1, : tok.vocab_size]))
      for t in range(len(ids) - k, len(ids))
    ]
    assert greedy == (argmax == ids[len(ids) - k :])
  # is_greedy is true for the model's own greedy continuation.
  ctx = "copy: k l m ="
  ids = tok.bos_prefix + tok.encode(ctx)
  new = m.model.generate([ids], 8)[0].tolist()
  new = new[: new.index(tok.eos_id)] if tok.eos_id in new else new
  assert m.lm.score_tokens([(ids, new)])[0][1] is True


def test_boundary_merges_split_as_hflm_does(m):
  """Where the tokenizer merges across the boundary, context + continuation
  is encoded whole and split at the context's own length (HFLM); when that
  leaves the continuation nothing, the split falls by character offsets."""
  tok, seen = m.tok, 0
  for word in ["reverse:", "copy:", "sort:", "add:"]:
    for k in range(1, len(word)):
      ctx, cont = word[:k], word[k:]
      apart = tok.encode(ctx) + tok.encode(cont)
      whole = tok.encode(word)
      c_ids, x_ids = m.lm.encode_pair(ctx, cont)
      assert c_ids[: len(tok.bos_prefix)] == tok.bos_prefix
      split = whole[len(tok.encode(ctx)) :]
      if split:
        assert x_ids == split and c_ids[len(tok.bos_prefix) :] == (
          tok.encode(ctx)
        )
      else:
        assert x_ids == tok.encode_segments([ctx, cont])[1] and x_ids
      seen += apart != whole
  assert seen, "no merge across a boundary in these words: pick others"


def test_loglikelihood_rolling_windowed_nothing_dropped(m):
  tok = m.tok
  big = jft_lm_eval.JftLM(model=m.model, batch_size=2, max_length=512)
  got_small = m.lm.loglikelihood_rolling(
    [_req("loglikelihood_rolling", (d,)) for d in PPL_DOCS]
  )
  got_big = big.loglikelihood_rolling(
    [_req("loglikelihood_rolling", (d,), i) for i, d in enumerate(PPL_DOCS)]
  )
  for doc, small, whole in zip(PPL_DOCS, got_small, got_big, strict=True):
    t = tok.encode(doc)
    # One window holds the document: the full sequence's log-prob.
    full = float(np.sum(_seq_logp(m.model, tok.bos_prefix + t)))
    assert whole == pytest.approx(full, abs=1e-3)
    # Windows of WINDOW tokens: every token scored once, the first window
    # after bos, each later one with a full window of context.
    w, parts, scored = WINDOW, [], 0
    first = tok.bos_prefix + t[: w - 1]
    parts.append(np.sum(_seq_logp(m.model, first + t[w - 1 : w])))
    scored += min(w, len(t))
    p = w
    while p < len(t):
      e = min(p + w, len(t))
      seq = t[max(e - w - 1, 0) : e]
      parts.append(np.sum(_seq_logp(m.model, seq)[-(e - p) :]))
      scored, p = scored + e - p, e
    assert scored == len(t)
    assert small == pytest.approx(float(np.sum(parts)), abs=1e-3)
    if len(t) <= w:
      assert small == pytest.approx(whole, abs=1e-3)
  assert len(tok.encode(LONG_DOC)) > 3 * WINDOW


def test_generate_until_stops_at_until(m):
  raws = [_raw_generation(m, p, 8) for p in GEN_PROMPTS]
  assert all(len(r) >= 4 for r in raws), raws
  stop = _stop_in(raws[0])
  reqs = [
    _req("generate_until", (p, {"until": [stop, "\n"], "max_gen_toks": 8}), i)
    for i, p in enumerate(GEN_PROMPTS)
  ] + [
    _req(
      "generate_until", (GEN_PROMPTS[1], {"until": "ZZZ", "max_gen_toks": 8})
    )
  ]
  got = m.lm.generate_until(reqs)
  for raw, out in zip(raws, got, strict=False):
    assert out == raw.split(stop)[0].split("\n")[0]
    assert stop not in out
  assert stop in raws[0] and got[0] != raws[0]  # it did cut
  assert got[3] == raws[1]  # no stop string in it: the whole generation


def test_model_args_and_registry(monkeypatch):
  from lm_eval.api.registry import get_model

  assert get_model("jft") is jft_lm_eval.JftLM
  seen = {}

  def fake_init(self, **kw):
    seen.update(kw)

  monkeypatch.setattr(jft_lm_eval.JftLM, "__init__", fake_init)
  jft_lm_eval.JftLM.create_from_arg_string(
    "source=runs/x,adapter=ad,batch_size=16,dtype=bfloat16",
    {"batch_size": 1, "max_batch_size": None, "device": "cuda:0"},
  )
  assert seen == {
    "source": "runs/x",
    "adapter": "ad",
    "batch_size": 16,  # model_args win over lm_eval's --batch_size default
    "dtype": "bfloat16",
    "device": "cuda:0",
  }


# ------------------------------------------------------------ the harness


def _jsonl(path, rows) -> str:
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return str(path)


def _write_tasks(d, m) -> dict:
  """Three tasks in `d` (YAML + JSONL); returns what they hold."""
  until = [_stop_in(_raw_generation(m, GEN_PROMPTS[0], 8)), "\n"]
  # The first target is the model's own answer: exact match 1 of 3 at least.
  kw = {"until": until, "max_gen_toks": 8}
  first = m.lm.generate_until([_req("generate_until", (GEN_PROMPTS[0], kw))])[0]
  gen = [
    {"prompt": p, "completion": first if i == 0 else " no"}
    for i, p in enumerate(GEN_PROMPTS)
  ]
  files = {
    "mc": _jsonl(d / "mc.jsonl", MC_DOCS),
    "gen": _jsonl(d / "gen.jsonl", gen),
    "ppl": _jsonl(d / "ppl.jsonl", [{"text": t} for t in PPL_DOCS]),
  }

  def task(name, path, body):
    (d / f"{name}.yaml").write_text(
      f"task: {name}\n"
      "dataset_path: json\n"
      f"dataset_kwargs:\n  data_files:\n    test: {path}\n"
      "test_split: test\n" + body
    )

  task(
    "jft_mc",
    files["mc"],
    "output_type: multiple_choice\n"
    'doc_to_text: "{{question}}"\n'
    "doc_to_choice: choices\n"
    "doc_to_target: label\n"
    "metric_list:\n  - metric: acc\n    aggregation: mean\n"
    "    higher_is_better: true\n",
  )
  task(
    "jft_gen",
    files["gen"],
    "output_type: generate_until\n"
    'doc_to_text: "{{prompt}}"\n'
    'doc_to_target: "{{completion}}"\n'
    f"generation_kwargs:\n  until: {json.dumps(until)}\n"
    "  max_gen_toks: 8\n  do_sample: false\n"
    "metric_list:\n  - metric: exact_match\n    aggregation: mean\n"
    "    higher_is_better: true\n",
  )
  task(
    "jft_ppl",
    files["ppl"],
    "output_type: loglikelihood_rolling\n"
    'doc_to_text: ""\n'
    'doc_to_target: "{{text}}"\n'
    "metric_list:\n"
    "  - metric: bits_per_byte\n    aggregation: bits_per_byte\n"
    "    higher_is_better: false\n"
    "  - metric: word_perplexity\n    aggregation: weighted_perplexity\n"
    "    higher_is_better: false\n",
  )
  return {"gen": gen, "gen_kwargs": kw}


def _by_hand(m, spec) -> dict:
  """acc, exact_match, bits_per_byte from the adapter's own answers."""
  lm = m.lm
  correct = []
  for doc in MC_DOCS:
    reqs = [
      _req("loglikelihood", (doc["question"], " " + c)) for c in doc["choices"]
    ]
    lls = [lp for lp, _ in lm.loglikelihood(reqs)]
    correct.append(int(np.argmax(lls)) == doc["label"])
  outs = lm.generate_until(
    [
      _req("generate_until", (g["prompt"], spec["gen_kwargs"]))
      for g in spec["gen"]
    ]
  )
  em = [o == g["completion"] for o, g in zip(outs, spec["gen"], strict=True)]
  lls = lm.loglikelihood_rolling(
    [_req("loglikelihood_rolling", (t,)) for t in PPL_DOCS]
  )
  n_bytes = sum(len(t.encode()) for t in PPL_DOCS)
  n_words = sum(len(re.split(r"\s+", t)) for t in PPL_DOCS)
  return {
    "word_perplexity": math.exp(-sum(lls) / n_words),
    "acc": float(np.mean(correct)),
    "exact_match": float(np.mean(em)),
    "bits_per_byte": -sum(lls) / n_bytes / math.log(2),
    "em_hits": sum(em),
  }


@pytest.fixture(scope="module")
def tasks(m):
  d = m.root / "tasks"
  d.mkdir()
  spec = _write_tasks(d, m)
  return types.SimpleNamespace(dir=d, spec=spec, want=_by_hand(m, spec))


def _metric(res, task, name):
  return res["results"][task][f"{name},none"]


def test_simple_evaluate_reports_what_the_adapter_scores(m, tasks):
  out = lm_eval.simple_evaluate(
    model=m.lm,
    tasks=["jft_mc", "jft_gen", "jft_ppl"],
    # Only these tasks: indexing lm_eval's ~15k built-in ones takes ~10 s.
    task_manager=TaskManager(
      include_path=str(tasks.dir), include_defaults=False
    ),
    bootstrap_iters=0,
    log_samples=True,
  )
  want = tasks.want
  assert want["em_hits"] >= 1
  assert _metric(out, "jft_mc", "acc") == pytest.approx(want["acc"])
  got_em = _metric(out, "jft_gen", "exact_match")
  assert got_em == pytest.approx(want["exact_match"])
  got_bpb = _metric(out, "jft_ppl", "bits_per_byte")
  assert got_bpb == pytest.approx(want["bits_per_byte"], rel=1e-5)
  got_ppl = _metric(out, "jft_ppl", "word_perplexity")
  assert got_ppl == pytest.approx(want["word_perplexity"], rel=1e-4)
  # The harness's generations end before the task's stop strings.
  for s in out["samples"]["jft_gen"]:
    text = s["resps"][0][0]
    assert not any(u in text for u in tasks.spec["gen_kwargs"]["until"])


def test_cli_wrapper_runs_lm_evals_cli(m, tasks):
  out = m.root / "cli_out"
  env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
  cmd = [
    sys.executable,
    "-m",
    "jft.interop.lm_eval",
    "--model",
    "jft",
    "--model_args",
    f"source={m.run},max_length={WINDOW}",
    "--tasks",
    "jft_mc,jft_gen,jft_ppl",
    "--include_path",
    str(tasks.dir),
    "--batch_size",
    "4",
    "--output_path",
    str(out),
  ]
  p = subprocess.run(
    cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
  )
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  (path,) = glob.glob(str(out / "**" / "results*.json"), recursive=True)
  with open(path) as f:
    res = json.load(f)
  want = tasks.want
  assert _metric(res, "jft_mc", "acc") == pytest.approx(want["acc"])
  assert _metric(res, "jft_gen", "exact_match") == pytest.approx(
    want["exact_match"]
  )
  assert _metric(res, "jft_ppl", "bits_per_byte") == pytest.approx(
    want["bits_per_byte"], rel=1e-4
  )
  assert res["config"]["model"] == "jft"
