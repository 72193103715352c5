"""Built-in suite of small, checkable tasks: jft's default training data.

The default configs train on this suite with no files given: CLM pretraining on
its text, SFT on prompt/completion pairs (scored by greedy-generation accuracy
through `is_correct`) and DPO on preference triples. A ~1-5M parameter model on
a laptop CPU must make visible progress within minutes, so the tasks are
learnable yet not trivial.

Formats (letters are space-separated so every letter is its own token, which
keeps copy/reverse/sort about positions rather than about the spelling of BPE
merges; digits are split into single tokens by the tokenizer):

  task     prompt                 completion   answer
  copy     "copy: q x b ="        " q x b"      "q x b"
  reverse  "reverse: a b c d ="   " d c b a"    "d c b a"
  sort     "sort: d a c ="        " a c d"      "a c d"
  add      "add: 12 + 45 ="       " 57"         "57"

Strings have 3-8 lowercase letters; addends have 1-2 digits (the digit count is
drawn first). Three-digit sums were beyond the `mini` chain (5% after SFT);
two-digit ones leave it half right, which is where DPO has work to do.

The completion is " " + answer: the tokenizer is trained without a dummy
prefix, so encoding the prompt and the completion separately gives the same
ids as encoding their concatenation.

Splits: a prompt belongs to `eval` iff a SHA-256 hash of it falls in the first
10% of the hash range, so train and eval never share a prompt whatever the seed
or size.
"""

from __future__ import annotations

import hashlib
import json
import os
import string
import zlib
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from jft.data.tokenizer_util import write_bytes_atomic

TASKS = ("add", "copy", "reverse", "sort")
SPLITS = ("train", "eval")
EVAL_FRACTION = 0.1
FORMAT_VERSION = 3  # Bump when a format changes: invalidates cached suites.
_LETTERS = string.ascii_lowercase
_MIN_LEN, _MAX_LEN = 3, 8
_MAX_DIGITS = 2


# ---------------------------------------------------------------- generators


def _letters(rng: np.random.Generator) -> list[str]:
  n = int(rng.integers(_MIN_LEN, _MAX_LEN + 1))
  return [_LETTERS[i] for i in rng.integers(0, len(_LETTERS), size=n)]


def _number(rng: np.random.Generator) -> int:
  digits = int(rng.integers(1, _MAX_DIGITS + 1))
  low = 0 if digits == 1 else 10 ** (digits - 1)
  return int(rng.integers(low, 10**digits))


def _letter_prompt(task: str, rng: np.random.Generator) -> str:
  return f"{task}: {' '.join(_letters(rng))} ="


def _add_prompt(rng: np.random.Generator) -> str:
  return f"add: {_number(rng)} + {_number(rng)} ="


_SAMPLERS: dict[str, Callable[[np.random.Generator], str]] = {
  "add": _add_prompt,
  "copy": lambda rng: _letter_prompt("copy", rng),
  "reverse": lambda rng: _letter_prompt("reverse", rng),
  "sort": lambda rng: _letter_prompt("sort", rng),
}


def _check_task(task: str) -> None:
  if task not in _SAMPLERS:
    raise ValueError(f"Unknown task {task!r}; known tasks: {TASKS}.")


def _body(task: str, prompt: str) -> str:
  """The operand text between 'task: ' and ' ='."""
  head, tail = f"{task}: ", " ="
  if not (prompt.startswith(head) and prompt.endswith(tail)):
    raise ValueError(f"Not a {task!r} prompt: {prompt!r}.")
  return prompt[len(head) : -len(tail)]


def answer(task: str, prompt: str) -> str:
  """The true answer, recomputed from the prompt (never from stored data)."""
  _check_task(task)
  body = _body(task, prompt)
  if task == "add":
    a, b = body.split(" + ")
    return str(int(a) + int(b))
  letters = body.split(" ")
  if task == "reverse":
    letters = letters[::-1]
  elif task == "sort":
    letters = sorted(letters)
  return " ".join(letters)


def sample(task: str, rng: np.random.Generator) -> tuple[str, str]:
  """One `(prompt, answer)` pair; a pure function of the rng state."""
  _check_task(task)
  prompt = _SAMPLERS[task](rng)
  return prompt, answer(task, prompt)


def split_of(prompt: str) -> str:
  """'eval' for ~10% of prompts, by a hash that is stable across runs."""
  digest = hashlib.sha256(prompt.encode("utf-8")).digest()
  u = int.from_bytes(digest[:8], "big") / 2**64
  return "eval" if u < EVAL_FRACTION else "train"


def _task_rng(task: str, seed: int, salt: int = 0) -> np.random.Generator:
  # crc32, not hash(): Python's str hash is salted per process.
  return np.random.default_rng([seed, zlib.crc32(task.encode()), salt])


def generate(task: str, n: int, seed: int, split: str) -> list[dict]:
  """`n` distinct examples of `split`, deterministic in (task, n, seed, split).

  Draws from one stream per (task, seed) and keeps the prompts that hash into
  `split`, so a larger `n` extends a smaller one and the splits are disjoint.
  """
  _check_task(task)
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")
  rng = _task_rng(task, seed)
  seen: set[str] = set()
  out: list[dict] = []
  max_draws = 100 * n + 1000
  for _ in range(max_draws):
    if len(out) == n:
      return out
    prompt, ans = sample(task, rng)
    if prompt in seen or split_of(prompt) != split:
      continue
    seen.add(prompt)
    out.append({"task": task, "prompt": prompt, "completion": " " + ans})
  if len(out) == n:
    return out
  raise ValueError(
    f"Drew {max_draws} {task!r} prompts but found only {len(out)} distinct "
    f"{split!r} ones (asked for {n}): the task has too few distinct prompts."
  )


def is_correct(task: str, prompt: str, output_text: str) -> bool:
  """Whether a generated completion answers `prompt` (whitespace-stripped)."""
  return output_text.strip() == answer(task, prompt)


# ------------------------------------------------------------- wrong answers


def _other(rng: np.random.Generator, pool: str, not_this: str) -> str:
  choices = [c for c in pool if c != not_this]
  return choices[int(rng.integers(len(choices)))]


def _wrong_sum(ans: str, rng: np.random.Generator) -> str:
  value = int(ans)
  if rng.random() < 0.5:  # Off by a small amount, kept non-negative.
    delta = int(rng.integers(1, 11))
    sign = -1 if (rng.random() < 0.5 and value - delta >= 0) else 1
    return str(value + sign * delta)
  # One digit wrong; no leading zero, so the string is a different number.
  i = int(rng.integers(len(ans)))
  pool = "123456789" if (i == 0 and len(ans) > 1) else string.digits
  return ans[:i] + _other(rng, pool, ans[i]) + ans[i + 1 :]


def _misread_letter(letters: list[str], rng: np.random.Generator) -> list[str]:
  """One letter replaced by a letter that is not in the string at all."""
  i = int(rng.integers(len(letters)))
  absent = [c for c in _LETTERS if c not in letters]
  out = list(letters)
  out[i] = absent[int(rng.integers(len(absent)))]
  return out


def wrong_answer(
  task: str, prompt: str, answer: str, rng: np.random.Generator
) -> str:
  """A plausible wrong answer: the kind of mistake a small model makes.

  add: off by 1-10 or one wrong digit; copy, reverse, sort: one letter
  misread as a letter absent from the input (what tiny models trained on
  these tasks get wrong). Deliberately not a swap of two input letters:
  the swapped-in letter is the right token one position later, so a
  preference against it teaches the model to avoid a correct token. Never
  equal to `answer`.
  """
  _check_task(task)
  answer = answer.strip()
  if task == "add":
    wrong = _wrong_sum(answer, rng)
  else:
    wrong = " ".join(_misread_letter(answer.split(" "), rng))
  if wrong == answer:  # Unreachable by construction; kept under python -O.
    raise AssertionError(f"wrong_answer({task!r}, {prompt!r}) == {answer!r}")
  return wrong


# --------------------------------------------------------------------- suite

_SUITE_FILES = tuple(
  f"{kind}_{split}.jsonl"
  for kind in ("pretrain", "sft", "pref")
  for split in SPLITS
)
_MANIFEST = "suite.json"


def _jsonl(rows: Sequence[dict]) -> str:
  return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _suite_rows(
  tasks: Sequence[str], n: int, seed: int, split: str
) -> dict[str, list[dict]]:
  """Rows of the three files of one split, tasks interleaved by a shuffle."""
  examples = [ex for task in tasks for ex in generate(task, n, seed, split)]
  order = np.random.default_rng([seed, SPLITS.index(split)]).permutation(
    len(examples)
  )
  examples = [examples[i] for i in order]
  wrong_rng = {
    t: _task_rng(t, seed, salt=1 + SPLITS.index(split)) for t in tasks
  }
  pref = []
  for ex in examples:
    t, p, c = ex["task"], ex["prompt"], ex["completion"]
    rejected = " " + wrong_answer(t, p, c, wrong_rng[t])
    pref.append({"prompt": p, "chosen": c, "rejected": rejected, "task": t})
  return {
    "pretrain": [{"text": ex["prompt"] + ex["completion"]} for ex in examples],
    "sft": [dict(ex) for ex in examples],
    "pref": pref,
  }


def write_suite(
  out_dir: str,
  *,
  tasks: Sequence[str] = TASKS,
  n_train: int = 8000,
  n_eval: int = 200,
  seed: int = 0,
) -> dict[str, str]:
  """Write the suite's six JSONL files (n_train / n_eval per task).

  Returns {'pretrain_train': path, ..., 'pref_eval': path}. Idempotent: a
  `suite.json` manifest of the parameters is written last, and when it matches
  and all files exist nothing is rewritten. Every file is written atomically.
  """
  for task in tasks:
    _check_task(task)
  params = {
    "format": FORMAT_VERSION,
    "tasks": list(tasks),
    "n_train": n_train,
    "n_eval": n_eval,
    "seed": seed,
  }
  paths = {f[: -len(".jsonl")]: os.path.join(out_dir, f) for f in _SUITE_FILES}

  def rows():
    for split, n in (("train", n_train), ("eval", n_eval)):
      for kind, r in _suite_rows(tasks, n, seed, split).items():
        yield f"{kind}_{split}", r

  write_once(os.path.join(out_dir, _MANIFEST), params, paths, rows)
  return paths


def manifest_matches(manifest: str, params: dict, paths: dict) -> bool:
  """Whether all `paths` exist and the manifest records exactly `params`."""
  files = [manifest, *paths.values()]
  if not all(map(os.path.exists, files)):
    return False
  with open(manifest, encoding="utf-8") as f:
    try:
      return json.load(f) == params
    except json.JSONDecodeError:
      return False


def write_once(
  manifest: str,
  params: dict,
  paths: dict[str, str],
  rows: Callable[[], Iterable[tuple[str, Sequence[dict]]]],
) -> bool:
  """Writes JSONL files unless a manifest says they hold `params` already.

  `rows()` yields (name in `paths`, rows). The manifest is written last and
  removed first, so a crash mid-write never leaves new files under an old
  manifest or old files under a new one. Returns whether it wrote.
  """
  if manifest_matches(manifest, params, paths):
    return False
  os.makedirs(os.path.dirname(manifest) or ".", exist_ok=True)
  if os.path.exists(manifest):
    os.remove(manifest)
  for name, r in rows():
    write_bytes_atomic(paths[name], _jsonl(r).encode("utf-8"))
  write_bytes_atomic(manifest, (json.dumps(params, indent=2) + "\n").encode())
  return True
