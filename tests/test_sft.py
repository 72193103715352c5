"""SFT: loss masks, chat templates, truncation policy, packing, generation."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from jft import evaluators, generate, init, train
from jft.data import pipeline, tasks
from jft.data.jsonl import DataError, Record
from jft.data.tokenizer import Tokenizer
from jft.models import transformer
from jft.objectives import sft
from jft.objectives.base import token_cross_entropy


@pytest.fixture(scope="module")
def setup(suite_dir):
  config = tiny_config(suite_dir, objective="sft")
  tok = Tokenizer.load(config.data.tokenizer)
  return config, tok, sft.SFT(config, tok)


def _rec(d, where="f.jsonl:7"):
  r = Record(d)
  r.where = where
  return r


def test_prompt_completion_mask(setup):
  _, tok, obj = setup
  (ex,) = obj.make_examples(
    [_rec({"prompt": "add: 1 + 2 =", "completion": " 3"})]
  )
  p, c = tok.encode("add: 1 + 2 ="), tok.encode(" 3")
  ids = [tok.bos_id, *p, *c, tok.eos_id]
  np.testing.assert_array_equal(ex["inputs"], ids[:-1])
  np.testing.assert_array_equal(ex["targets"], ids[1:])
  # weight on targets that are completion tokens or the final eos only
  expect = [0.0] * len(p) + [1.0] * (len(c) + 1)
  np.testing.assert_array_equal(ex["weights"], expect)


def test_chat_template_trains_assistant_turns_only(setup):
  config, tok, _ = setup
  config = config.copy_and_resolve_references()
  config.seq_len = 256  # template markers are byte-level tokens here
  obj = sft.SFT(config, tok)
  rec = _rec(
    {
      "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "copy: a b ="},
        {"role": "assistant", "content": " a b"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": " a b"},
      ]
    }
  )
  (ex,) = obj.make_examples([rec])
  ids = np.concatenate([ex["inputs"][:1], ex["targets"]])
  w = np.concatenate([[0.0], ex["weights"]])
  trained = tok.decode(
    [i for i, m in zip(ids, w, strict=True) if m and i != tok.eos_id]
  )
  assert trained == " a b a b"
  assert int(np.sum(ids[w > 0] == tok.eos_id)) == 2  # one eos per answer
  # The template is data: the prefixes appear untrained in the sequence.
  assert "<|user|>\nagain\n<|assistant|>\n" in tok.decode(ids)


@pytest.mark.parametrize(
  "row, field",
  [
    ({"prompt": "x"}, "completion"),
    ({"completion": "x"}, "prompt"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages"),
    ({"text": "x"}, "prompt"),
  ],
)
def test_bad_rows_name_file_line_and_field(setup, row, field):
  _, _, obj = setup
  with pytest.raises(DataError) as e:
    obj.make_examples([_rec(row, "data/sft.jsonl:12")])
  assert "data/sft.jsonl:12" in str(e.value) and field in str(e.value)


def test_truncation_policy_counts(setup, capsys):
  config, tok, _ = setup
  long_prompt = "copy: " + " ".join("abcdefghij" * 4) + " ="
  rows = [
    _rec({"prompt": long_prompt, "completion": " a"}),
    _rec({"prompt": "add: 1 + 1 =", "completion": " 2"}),
    _rec({"prompt": "p", "completion": " z" * 40}),
  ]
  obj = sft.SFT(config, tok)  # seq_len 32
  out = obj.make_examples(rows)
  assert len(out) == 2
  assert obj.data_stats["data/train_truncated"] == 1
  assert obj.data_stats["data/train_skipped"] == 1
  assert all(len(e["inputs"]) <= config.seq_len for e in out)
  # the truncated row keeps bos, its answer and eos
  t = out[0]
  assert t["inputs"][0] == tok.bos_id and t["targets"][-1] == tok.eos_id
  assert "skipped" in capsys.readouterr().out
  config2 = config.copy_and_resolve_references()
  config2.sft.truncation = "skip"
  obj2 = sft.SFT(config2, tok)
  assert len(obj2.make_examples(rows)) == 1
  assert obj2.data_stats["data/train_skipped"] == 2


def test_packed_and_padded_give_the_same_per_example_loss(setup):
  config, tok, obj = setup
  records = pipeline.read_jsonl_files(config.data.eval_files)[:12]
  examples = obj.make_examples(records)
  model_cfg = init.model_config(config, tok)
  model = transformer.Transformer(model_cfg)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
  apply = jax.jit(
    lambda b: model.apply(params, b["inputs"], b["positions"], b["segment_ids"])
  )

  def per_example(packing):
    losses = []
    for b in pipeline.make_eval_batches(
      examples, seq_len=64, batch_size=4, pad_id=tok.pad_id, packing=packing
    ):
      logp = jax.nn.log_softmax(np.asarray(apply(b), np.float64), -1)
      nll = (
        -np.take_along_axis(np.asarray(logp), b["targets"][..., None], -1)[
          ..., 0
        ]
        * b["weights"]
      )
      for r in range(b["inputs"].shape[0]):
        for s in range(1, b["segment_ids"][r].max() + 1):
          losses.append(nll[r][b["segment_ids"][r] == s].sum())
    return np.array(losses)

  packed, padded = per_example(True), per_example(False)
  assert len(padded) == len(examples)
  np.testing.assert_allclose(np.sort(packed), np.sort(padded), rtol=1e-4)
  # and the CE helper agrees with the per-token sum
  b = pipeline.make_eval_batches(
    examples, seq_len=64, batch_size=4, pad_id=tok.pad_id
  )[0]
  ce, w, _ = token_cross_entropy(apply(b), b["targets"], b["weights"])
  assert float(w) == float(b["weights"].sum())


def test_greedy_generation_matches_naive_loop(setup):
  config, tok, _ = setup
  model_cfg = init.model_config(config, tok)
  model = transformer.Transformer(model_cfg)
  params = model.init(jax.random.PRNGKey(3), jnp.zeros((1, 8), jnp.int32))
  apply_fn = train.make_apply_fn(model)
  p = params["params"]
  gen = generate.Generator(  # greedy, with a KV cache
    apply_fn,
    model_cfg,
    max_new=5,
    eos_ids=[tok.eos_id],
    pad_id=tok.pad_id,
    vocab_size=tok.vocab_size,
    batch_size=2,
  )
  prompts = [[tok.bos_id, 10, 11, 12], [tok.bos_id, 20], [tok.bos_id, 7, 8, 9]]
  naive = jax.jit(lambda t: apply_fn(p, t, None, None)[0, -1])
  got = gen.generate(p, prompts)
  for prompt, out in zip(prompts, got, strict=True):
    seq = list(prompt)
    expect = []
    for _ in range(5):
      nxt = int(jnp.argmax(naive(jnp.array([seq]))[: tok.vocab_size]))
      expect.append(nxt)
      if nxt == tok.eos_id:
        break
      seq.append(nxt)
    assert out[: len(expect)] == expect
    assert all(t == tok.pad_id for t in out[len(expect) :])


def test_sft_run_logs_task_accuracy(suite_dir, tmp_path, monkeypatch):
  """eval/task_accuracy (and per task) at step 0 and after training is the
  fraction of the run's greedy answers to the first max_eval_generations
  held-out prompts that are right, scored here independently. Every third
  answer is swapped for the true one, so the value is not trivially 0."""
  config = tiny_config(suite_dir, objective="sft", total_steps=2, eval_every=2)
  config.sft.max_eval_generations = 16
  config.sft.max_new_tokens = 6
  real, calls = generate.make_text_decoder, []

  def make_decoder(apply_fn, tok, **kw):
    assert kw["max_new"] == 6
    answer = real(apply_fn, tok, **kw)

    def decode(params, prompts, key=None):
      texts = answer(params, prompts, key)  # the model's own generations
      assert len(texts) == len(prompts) and all(
        isinstance(t, str) for t in texts
      )
      texts = [
        " " + tasks.answer(p.split(":")[0], p) if i % 3 == 0 else t
        for i, (p, t) in enumerate(zip(prompts, texts, strict=True))
      ]
      calls.append((list(prompts), texts))
      return texts

    return decode

  monkeypatch.setattr(generate, "make_text_decoder", make_decoder)
  train.run(config, str(tmp_path / "w"))
  with open(tmp_path / "w" / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  evals = [r for r in rows if "eval/task_accuracy" in r]
  assert [r["step"] for r in evals] == [0, 2] and len(calls) == 2
  held_out = pipeline.read_jsonl_files(config.data.eval_files)
  held_out = [r for r in held_out if r.get("task")][:16]
  for row, (prompts, texts) in zip(evals, calls, strict=True):
    assert prompts == [r["prompt"] for r in held_out]
    right: dict[str, list[bool]] = {}
    for r, text in zip(held_out, texts, strict=True):
      truth = r["completion"].strip()  # the suite's stored answer
      right.setdefault(r["task"], []).append(text.strip() == truth)
    every = sum(right.values(), [])
    assert 6 <= sum(every) < 16  # the swapped-in answers, and wrong ones
    assert row["eval/task_accuracy"] == pytest.approx(np.mean(every))
    for task, ok in right.items():
      assert row[f"eval/task_accuracy/{task}"] == pytest.approx(np.mean(ok))
    assert {k for k in row if k.startswith("eval/task_accuracy/")} == {
      f"eval/task_accuracy/{t}" for t in right
    }
  assert np.isfinite(evals[-1]["eval/loss"])


def test_task_accuracy_overall_and_per_task(setup, monkeypatch):
  config, tok, _ = setup
  ev = evaluators.TaskAccuracy(
    config,
    tok,
    [
      {"task": "add", "prompt": "add: 1 + 2 ="},
      {"task": "add", "prompt": "add: 5 + 5 ="},
      {"task": "sort", "prompt": "sort: b a ="},
      {"prompt": "no task: not scored"},
    ],
  )
  answers = [" 3", " 11", " a b"]  # right, wrong, right
  monkeypatch.setattr(
    generate,
    "make_text_decoder",
    lambda *a, **k: lambda params, prompts, key=None: answers,
  )
  got = ev(None, None)
  assert got == {
    "eval/task_accuracy": pytest.approx(2 / 3),
    "eval/task_accuracy/add": 0.5,
    "eval/task_accuracy/sort": 1.0,
  }
