"""Evaluate a jft run or a Hugging Face checkpoint after training.

    python -m jft.evaluate RUN_DIR                      # built-in tasks
    python -m jft.evaluate hf:DIR [--adapter=PEFT_DIR] --perplexity_data=a.jsonl
    python -m jft.evaluate RUN --preference_data=p.jsonl --reference=SFT_RUN
    python -m jft.evaluate RUN --baseline=OTHER_RUN [--reward_model=RM_RUN]
    python -m jft.evaluate --compare RUN1 RUN2 ...      # one table

Metrics (`--metrics`, comma-separated; the default is every metric whose
inputs are given: task_accuracy and samples always, perplexity with
`--perplexity_data`, preference with `--preference_data` or `--reference`,
win_rate with `--baseline`; a reward model gets preference only):

  task_accuracy  greedy answers (`--max_new_tokens`, `--chat`) to task rows
                 scored by `--scorer` (jft/evaluators.py: the same scorers
                 and averaging as a run's eval/task_accuracy): overall and
                 per `task`. Rows: `--task_data` (`{"prompt", "completion"
                 | "reference" | "answer"}`, optional "task"), else
                 `--per_task` held-out prompts of each built-in task.
  perplexity     exp of the mean token NLL (`nll`, nats) on
                 `--perplexity_data`: `{"text"}` rows score every token
                 (bos + text + eos, as CLM trains), `{"prompt",
                 "completion"}` and `{"messages"}` rows only what SFT trains
                 (completion / assistant tokens and eos). A sequence longer
                 than `--window` tokens (default: the model's context, at
                 most 2048) is scored in windows `--stride` apart (default
                 window / 2), each token once, with at least window - stride
                 tokens of context; nothing is truncated, and the number of
                 windowed rows is reported. Without a file: the built-in
                 tasks' text. Forwards hold at most `--batch_tokens`.
  preference     on `{"prompt","chosen","rejected"}` rows (strings or
                 conversations, tokenized as DPO trains: `dpo.split_pair`,
                 `dpo.pair_ids`): `preference/logps_accuracy` (log p(chosen)
                 > log p(rejected)); with `--reference`, DPO's implicit
                 reward `beta * (logp - logp_ref)` (`--beta`):
                 `preference/rewards_accuracy` and `rewards_margin`; with a
                 reward model (the evaluated model, or `--reward_model`),
                 its score at each sequence's last token:
                 `preference/rm_accuracy` and `rm_margin`. A reward model
                 reads at most `--window` tokens: longer pairs lose prompt
                 tokens from the left, counted. Without a file: the
                 built-in tasks with a wrong answer as rejected.
  win_rate       the model's greedy answers against `--baseline`'s on the
                 task rows, judged by `--reward_model` if given, else by
                 `--scorer`: a win when the model's score is higher, a tie
                 (half a win) when equal. Overall and per task. The reward
                 model reads bos + prompt + answer + eos, the plain prompt
                 text even with `--chat` (as RL's reward model does).
  samples        every generated answer, with its scores, in samples.jsonl.

Writes to `--out` (default RUN/eval/ for a run, evals/NAME-TIME/ for hf:):

  eval.json    {"source", "adapter", "head", "created", "jft_code",
               "metrics": {name: float}, "counts": {name: int},
               "files": {flag: {"path", "sha256", "lines"} | built-in},
               "settings": {...}, "samples": "samples.jsonl" | null}
  eval.md      the same as readable tables
  samples.jsonl  one generation per line

`--compare A B ...` (run dirs, eval dirs or eval.json files) prints one
markdown table: a row per metric, a column per evaluation, blank where an
evaluation lacks the metric.

A bad path, JSONL line, metric or scorer ends with one line naming the
file:line or flag (jft/cli.py); `--verbose` adds the traceback.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
from collections.abc import Callable, Sequence

import numpy as np

from jft import api, cli, evalreport, evaluators, init, scoring
from jft.data import tasks
from jft.data.jsonl import DataError, read_jsonl
from jft.errors import UserError

METRICS = ("task_accuracy", "perplexity", "preference", "win_rate", "samples")
_BUILTIN_SEED = 0

# --------------------------------------------------------------- sources


def check_source(flag: str, source: str) -> None:
  """A UserError naming `flag` unless `source` is an existing jft run
  directory or `hf:DIR`."""
  k = init.kind(source)
  if k not in ("workdir", "hf"):
    raise UserError(
      f"{flag}={source!r}: expected a jft run directory or hf:DIR"
    )
  path = init.hf_dir(source) if k == "hf" else source
  if not os.path.isdir(path):
    raise UserError(f"{flag}={source!r}: no such directory")
  if k == "workdir" and not os.path.isfile(os.path.join(path, "config.json")):
    raise UserError(
      f"{flag}={source!r}: not a jft run directory (no config.json); for a "
      f"Hugging Face checkpoint write hf:{source}"
    )


# ------------------------------------------------------------------ data


def describe_file(path: str) -> dict:
  """{"path", "sha256", "lines"} of a data file."""
  with open(path, "rb") as f:
    raw = f.read()
  return {
    "path": os.path.abspath(path),
    "sha256": hashlib.sha256(raw).hexdigest(),
    "lines": len(raw.splitlines()),
  }


def read_rows(
  flag: str, path: str, limit: int = 0, required: Sequence[str] = ()
) -> list[dict]:
  """The records of a JSONL file (the first `limit`; 0 = all), each with
  the string fields `required`; a bad line is a DataError naming
  file:line."""
  if not os.path.isfile(path):
    raise DataError(f"{flag}={path}: file not found")
  rows = read_jsonl(path, required)
  return rows[:limit] if limit else rows


def builtin_pairs(per_task: int, seed: int = _BUILTIN_SEED) -> list[dict]:
  """Held-out built-in prompts with their answer as chosen and a plausible
  wrong one (`tasks.wrong_answer`) as rejected."""
  out = []
  for i, r in enumerate(evaluators.builtin_task_rows(per_task, seed)):
    rng = np.random.default_rng([seed, i])
    wrong = tasks.wrong_answer(r["task"], r["prompt"], r["completion"], rng)
    out.append({**r, "chosen": r["completion"], "rejected": " " + wrong})
  return out


# --------------------------------------------------------------- metrics


class Evaluation:
  """One model's evaluation: `metrics`, `counts`, `samples` filled in by
  the metric methods, in the order `evaluate` calls them."""

  def __init__(self, model, args, models: dict):
    self.model, self.args, self.models = model, args, models
    self.metrics: dict[str, float] = {}
    self.counts: dict[str, int] = {}
    self.samples: list[dict] = []
    self._answers: dict[str, list[str]] = {}

  def window(self, model) -> tuple[int, int]:
    """(window, stride) of log-prob scoring for `model`."""
    w = scoring.context_limit(model, self.args.window)
    stride = self.args.stride or max(w // 2, 1)
    if not 1 <= stride < w:
      raise UserError(
        f"--stride={stride}: must be at least 1 and below the window ({w})"
      )
    return w, stride

  def answers(self, name: str, rows) -> list[str]:
    """Greedy answers of models[name] to the rows' prompts (once)."""
    if name not in self._answers:
      self._answers[name] = self.models[name].generate_text(
        [r["prompt"] for r in rows],
        max_new_tokens=self.args.max_new_tokens,
        chat=self.args.chat,
      )
    return self._answers[name]

  def task_accuracy(self, rows, score) -> None:
    texts = self.answers("model", rows)
    scores = evaluators.score_answers(rows, texts, score)
    self.metrics.update(
      evaluators.accuracy_by_task(rows, scores, prefix="task_accuracy")
    )
    self.counts["task_accuracy_rows"] = len(rows)
    for r, t, s in zip(rows, texts, scores, strict=True):
      self.samples.append(_sample("task_accuracy", r, output=t, score=s))

  def perplexity(self, rows) -> None:
    model = self.model
    tmpl = scoring.chat_template(model.tokenizer)
    seqs = [scoring.lm_sequence(model.tokenizer, tmpl, r) for r in rows]
    w, stride = self.window(model)
    sums, counts, windowed = scoring.sequence_logps(
      model, seqs, window=w, stride=stride, batch_tokens=self.args.batch_tokens
    )
    n = float(counts.sum())
    if n == 0:
      raise UserError("--perplexity_data: no tokens to score")
    nll = -float(sums.sum()) / n
    self.metrics["nll"] = nll
    self.metrics["perplexity"] = float(np.exp(min(nll, 80.0)))
    self.counts.update(
      perplexity_rows=len(rows),
      perplexity_tokens=int(n),
      perplexity_windowed_rows=windowed,
    )

  def _pair_logps(self, model, rows):
    tmpl = scoring.chat_template(model.tokenizer)
    seqs = [
      s for r in rows for s in scoring.pair_sequences(model.tokenizer, tmpl, r)
    ]
    w, stride = self.window(model)
    sums, _, windowed = scoring.sequence_logps(
      model, seqs, window=w, stride=stride, batch_tokens=self.args.batch_tokens
    )
    return sums[0::2], sums[1::2], windowed

  def preference(self, rows) -> None:
    m = self.metrics
    self.counts["preference_pairs"] = len(rows)
    rm = self.models.get("reward_model")
    if scoring.is_reward_model(self.model):
      rm = self.model
    else:
      lc, lr, windowed = self._pair_logps(self.model, rows)
      m["preference/logps_accuracy"] = float(np.mean(lc > lr))
      self.counts["preference_windowed_sequences"] = windowed
      ref = self.models.get("reference")
      if ref is not None:
        rc, rr, _ = self._pair_logps(ref, rows)
        beta = self.args.beta
        chosen, rejected = beta * (lc - rc), beta * (lr - rr)
        m["preference/rewards_accuracy"] = float(np.mean(chosen > rejected))
        m["preference/rewards_margin"] = float(np.mean(chosen - rejected))
    if rm is not None:
      tok = rm.tokenizer
      tmpl = scoring.chat_template(tok)
      seqs = [s[0] for r in rows for s in scoring.pair_sequences(tok, tmpl, r)]
      scores, truncated = scoring.reward_scores(
        rm,
        seqs,
        limit=scoring.context_limit(rm, self.args.window),
        batch_tokens=self.args.batch_tokens,
      )
      sc, sr = scores[0::2], scores[1::2]
      m["preference/rm_accuracy"] = float(np.mean(sc > sr))
      m["preference/rm_margin"] = float(np.mean(sc - sr))
      self.counts["preference_rm_truncated"] = truncated

  def _rm_scores(self, rows, texts) -> list[float]:
    rm = self.models["reward_model"]
    seqs = [
      scoring.completion_sequence(rm.tokenizer, r["prompt"], t)
      for r, t in zip(rows, texts, strict=True)
    ]
    scores, truncated = scoring.reward_scores(
      rm,
      seqs,
      limit=scoring.context_limit(rm, self.args.window),
      batch_tokens=self.args.batch_tokens,
    )
    self.counts["win_rate_rm_truncated"] = (
      self.counts.get("win_rate_rm_truncated", 0) + truncated
    )
    return scores.tolist()

  def win_rate(self, rows, score) -> None:
    ours = self.answers("model", rows)
    theirs = self.answers("baseline", rows)
    if "reward_model" in self.models:
      a, b = self._rm_scores(rows, ours), self._rm_scores(rows, theirs)
    else:
      a = evaluators.score_answers(rows, ours, score)
      b = evaluators.score_answers(rows, theirs, score)
    outcomes = evaluators.win_outcomes(a, b)
    self.metrics.update(
      evaluators.accuracy_by_task(rows, outcomes, prefix="win_rate")
    )
    self.counts.update(
      win_rate_prompts=len(rows),
      win_rate_wins=outcomes.count(1.0),
      win_rate_ties=outcomes.count(0.5),
      win_rate_losses=outcomes.count(0.0),
    )
    for r, x, y, sa, sb, o in zip(
      rows, ours, theirs, a, b, outcomes, strict=True
    ):
      self.samples.append(
        _sample(
          "win_rate",
          r,
          output=x,
          baseline_output=y,
          score=sa,
          baseline_score=sb,
          outcome=o,
        )
      )

  def generations_only(self, rows) -> None:
    """`samples` alone: the answers, unscored."""
    for r, t in zip(rows, self.answers("model", rows), strict=True):
      self.samples.append(_sample("samples", r, output=t))


def _sample(metric: str, row, **fields) -> dict:
  out = {"metric": metric, "prompt": row["prompt"]}
  if "task" in row:
    out["task"] = row["task"]
  ref = evaluators.reference_of(row)
  if ref is not None:
    out["reference"] = ref
  return {**out, **fields}


# ------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m jft.evaluate",
    description="Evaluate a jft run or Hugging Face checkpoint.",
  )
  p.add_argument("source", nargs="?", help="RUN_DIR or hf:DIR")
  p.add_argument("--adapter", default=None, help="PEFT adapter directory")
  p.add_argument("--compare", nargs="+", metavar="RUN", help="compare evals")
  p.add_argument(
    "--metrics",
    action="append",
    help=f"comma-separated, from {', '.join(METRICS)}",
  )
  p.add_argument("--task_data", help="JSONL: prompt + reference (+ task)")
  p.add_argument("--perplexity_data", help="JSONL: text or prompt/completion")
  p.add_argument("--preference_data", help="JSONL: prompt/chosen/rejected")
  p.add_argument(
    "--scorer",
    default="auto",
    help="auto, task, exact, normalised, contains or MODULE:FUNCTION",
  )
  p.add_argument("--per_task", type=int, default=50, help="built-in prompts")
  p.add_argument("--max_examples", type=int, default=0, help="0 = all rows")
  p.add_argument("--max_new_tokens", type=int, default=32)
  p.add_argument("--chat", action="store_true", help="chat-template prompts")
  p.add_argument("--reference", help="reference model for implicit rewards")
  p.add_argument("--beta", type=float, default=0.1)
  p.add_argument("--reward_model", help="a reward model (head 'score')")
  p.add_argument("--baseline", help="model B of the win rate")
  p.add_argument("--window", type=int, default=0, help="0 = the model's")
  p.add_argument("--stride", type=int, default=0, help="0 = window / 2")
  p.add_argument(
    "--batch_tokens", type=int, default=4096, help="tokens per forward"
  )
  p.add_argument("--dtype", default="float32")
  p.add_argument("--out", default=None, help="output directory")
  p.add_argument(
    "--verbose", action="store_true", help="tracebacks for user errors too"
  )
  return p


def metric_names(args) -> list[str]:
  """The names `--metrics` gives (comma-separated, repeatable), in order;
  a UserError naming the flag for an unknown one."""
  names = [m.strip() for a in args.metrics or () for m in a.split(",")]
  names = list(dict.fromkeys(m for m in names if m))
  for m in names:
    if m not in METRICS:
      raise UserError(
        f"--metrics: unknown metric {m!r}; known: {', '.join(METRICS)}"
      )
  return names


def default_metrics(args, reward_model: bool) -> list[str]:
  """What the flags give inputs for (see the module docstring)."""
  if reward_model:
    return ["preference"]
  chosen = ["task_accuracy", "samples"]
  if args.perplexity_data:
    chosen.append("perplexity")
  if args.preference_data or args.reference:
    chosen.append("preference")
  elif args.reward_model and not args.baseline:
    chosen.append("preference")  # the reward model on the pairs
  if args.baseline:
    chosen.append("win_rate")
  return chosen


def select_metrics(args, reward_model: bool) -> list[str]:
  """`--metrics`, or the default for what the flags give; a UserError for
  an input that no selected metric reads."""
  chosen = metric_names(args) or default_metrics(args, reward_model)
  if reward_model:
    lm_only = [m for m in chosen if m != "preference"]
    if lm_only:
      raise UserError(
        f"--metrics: {args.source} is a reward model (head 'score'): it "
        f"scores text, it does not generate or predict tokens, so "
        f"{', '.join(lm_only)} cannot be measured; use --metrics=preference"
      )
  used = {
    "--perplexity_data": ("perplexity",),
    "--preference_data": ("preference",),
    "--reference": ("preference",),
    "--baseline": ("win_rate",),
    "--reward_model": ("preference", "win_rate"),
    "--task_data": ("task_accuracy", "win_rate", "samples"),
  }
  for flag, by in used.items():
    if getattr(args, flag[2:]) and not set(by) & set(chosen):
      raise UserError(
        f"{flag} is read by {' or '.join(by)}, which is not among the "
        f"metrics evaluated ({','.join(chosen)}; see --metrics)"
      )
  if "win_rate" in chosen and not args.baseline:
    raise UserError("--metrics=win_rate needs --baseline=SOURCE (model B)")
  return chosen


def default_out(source: str) -> str:
  if init.kind(source) == "workdir":
    return os.path.join(source, "eval")
  name = os.path.basename(os.path.normpath(init.hf_dir(source)))
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  return os.path.join("evals", f"{name}-{stamp}")


def _check_args(args) -> None:
  for flag in ("per_task", "max_new_tokens", "batch_tokens"):
    if getattr(args, flag) < 1:
      raise UserError(f"--{flag}={getattr(args, flag)}: must be at least 1")
  for flag in ("max_examples", "window", "stride"):
    if getattr(args, flag) < 0:
      raise UserError(f"--{flag}={getattr(args, flag)}: must be >= 0")
  if args.window == 1:
    raise UserError("--window=1: a window needs at least 2 tokens")
  if args.beta <= 0:
    raise UserError(f"--beta={args.beta}: must be positive")


def load_models(args, load: Callable) -> dict:
  """{"model", and "reference" / "reward_model" / "baseline" when given},
  each checked to be what its flag needs; paths, the metric names and the
  scorer are checked before anything loads."""
  check_source("SOURCE", args.source)
  for flag in ("reference", "reward_model", "baseline"):
    if getattr(args, flag):
      check_source(f"--{flag}", getattr(args, flag))
  if args.adapter and not os.path.isdir(args.adapter):
    raise UserError(f"--adapter={args.adapter}: no such directory")
  metric_names(args)
  models = {"model": load(args.source, adapter=args.adapter, dtype=args.dtype)}
  for flag in ("reference", "reward_model", "baseline"):
    if getattr(args, flag):
      models[flag] = load(getattr(args, flag), dtype=args.dtype)
  is_rm = {k: scoring.is_reward_model(v) for k, v in models.items()}
  if is_rm["model"] and "reference" in models:
    raise UserError(
      "--reference: the evaluated model is a reward model; a reference is "
      "for a policy's implicit reward"
    )
  if not is_rm.get("reward_model", True):
    raise UserError(
      f"--reward_model={args.reward_model}: not a reward model (head "
      f"{models['reward_model'].config.head!r}; train one with "
      "configs/reward.py)"
    )
  for flag in ("reference", "baseline"):
    if is_rm.get(flag):
      raise UserError(
        f"--{flag}={getattr(args, flag)}: a reward model, not a language model"
      )
  return models


def evaluate(args, load: Callable) -> tuple[dict, list[dict]]:
  """(eval.json's dict, samples) of the parsed `args`; `load(source,
  adapter=None, dtype=...)` loads a model (`jft.load`)."""
  _check_args(args)
  score = evaluators.scorer(args.scorer)  # an unknown one fails first
  models = load_models(args, load)
  model = models["model"]
  chosen = select_metrics(args, scoring.is_reward_model(model))

  files: dict[str, dict] = {}
  builtin = {
    "builtin": f"jft.data.tasks ({', '.join(tasks.TASKS)}; {args.per_task} "
    f"held-out prompts each, seed {_BUILTIN_SEED})"
  }

  def data(flag: str, make_builtin, required=()):
    path = getattr(args, flag)
    if not path:
      files[flag] = builtin
      return make_builtin()
    rows = read_rows(f"--{flag}", path, args.max_examples, required)
    files[flag] = describe_file(path)
    return rows

  ev = Evaluation(model, args, models)
  task_rows = None
  if {"task_accuracy", "win_rate", "samples"} & set(chosen):
    task_rows = data(
      "task_data",
      lambda: evaluators.builtin_task_rows(args.per_task, _BUILTIN_SEED),
      required=("prompt",),
    )
  if "perplexity" in chosen:
    ev.perplexity(
      data(
        "perplexity_data",
        lambda: [
          {"text": r["prompt"] + r["completion"]}
          for r in evaluators.builtin_task_rows(args.per_task)
        ],
      )
    )
  if "task_accuracy" in chosen:
    ev.task_accuracy(task_rows, score)
  if "win_rate" in chosen:
    ev.win_rate(task_rows, score)
  if "samples" in chosen and not ev.samples:
    ev.generations_only(task_rows)
  if "preference" in chosen:
    ev.preference(data("preference_data", lambda: builtin_pairs(args.per_task)))

  window, stride = ev.window(model)
  result = {
    "source": args.source,
    "adapter": args.adapter,
    "head": model.config.head,
    "created": datetime.datetime.now(datetime.UTC).isoformat(
      timespec="seconds"
    ),
    "jft_code": init.code_version(),
    "metrics": ev.metrics,
    "counts": ev.counts,
    "files": files,
    "settings": {
      "metrics": ",".join(chosen),
      "scorer": args.scorer,
      "max_new_tokens": args.max_new_tokens,
      "chat": args.chat,
      "window": window,
      "stride": stride,
      "beta": args.beta if "reference" in models else None,
      "reference": args.reference,
      "reward_model": args.reward_model,
      "baseline": args.baseline,
      "dtype": args.dtype,
    },
    "samples": "samples.jsonl" if "samples" in chosen else None,
  }
  return result, ev.samples


def main(argv: Sequence[str] | None = None, *, load=api.load) -> int:
  """The CLI. `load` replaces `jft.load` (tests pass a cached one)."""
  p = _parser()
  args = p.parse_args(argv)
  if args.compare:
    if args.source:
      p.error("give a SOURCE to evaluate or --compare RUN ..., not both")
    print(evalreport.compare(args.compare))
    return 0
  if not args.source:
    p.error("a SOURCE (RUN_DIR or hf:DIR) or --compare RUN ... is required")
  result, samples = evaluate(args, load)
  out = args.out or default_out(args.source)
  evalreport.write_reports(out, result, samples)
  print(evalreport.markdown(result), end="")
  print(f"wrote {os.path.join(out, 'eval.json')} and eval.md")
  return 0


if __name__ == "__main__":
  cli.run_main(main)
