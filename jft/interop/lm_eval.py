"""A jft model in EleutherAI's lm-evaluation-harness (`pip install
'jft[lm_eval]'`).

    python -m jft.interop.lm_eval --model jft \\
        --model_args source=runs/sft,adapter=DIR,dtype=bfloat16 \\
        --tasks hellaswag,arc_easy --batch_size 8

takes lm_eval's own command line: this module registers the model name
`jft` and then runs lm_eval's CLI (lm_eval finds models by name only in its
own package, so `lm_eval --model jft` alone does not know the name). In
Python, `lm_eval.simple_evaluate(model=JftLM(source=...), tasks=[...])`,
or `model="jft"` once this module is imported.

Model args: `source` (a jft run directory or `hf:DIR`), `adapter` (a PEFT
LoRA directory), `dtype` (float32 | bfloat16), `batch_size` (rows per
forward; lm_eval's `--batch_size` when not given here, `auto` = 8),
`max_length` (the context window; default the model's
max_position_embeddings up to 2048, as `jft.scoring.context_limit`),
`max_gen_toks` (256: generation when a task does not say), `num_devices`
(as `jft.load`; 1), `seed` (sampled generation).

How requests are scored, as lm_eval's Hugging Face model (HFLM) does:
  - a context is `tokenizer.bos_prefix` + its ids (a chat-templated text
    that starts with the bos piece gets no second one); an empty context
    is the bos token (the eos token for tokenizers without one);
  - trailing whitespace of a context moves to its continuation, then
    context + continuation is encoded whole and split at the length of the
    context's own encoding, so the scored tokens are the continuation's
    tokens in the joined text even where the tokenizer merges across the
    boundary (when the merge leaves the continuation no token of its own,
    the split falls by character offsets, `encode_segments`);
  - a context too long for the window loses tokens from the left;
  - `loglikelihood_rolling` scores bos + the document in lm_eval's rolling
    windows of `max_length` (`lm_eval.utils.get_rolling_token_windows`):
    every token once, nothing truncated;
  - `generate_until` decodes greedily (sampling when a task asks
    `do_sample`) up to `max_gen_toks` new tokens or eos, then cuts the text
    at the first `until` string; the context keeps its last
    `max_length - max_gen_toks` tokens.
Requests run longest first in batches of `batch_size` rows, right-padded to
a power-of-two length (few shapes compile); log-probs and the greedy check
are reduced on the device. Results come back in the requests' order.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from jft import api, scoring
from jft import generate as jft_generate
from jft.models import transformer

NAME = "jft"
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256


def _batch_size(value) -> int:
  """lm_eval passes ints, numeric strings or 'auto' / 'auto:N'."""
  if value is None or (isinstance(value, str) and value.startswith("auto")):
    return DEFAULT_BATCH_SIZE
  n = int(value)
  if n < 1:
    raise ValueError(f"batch_size must be positive, got {value!r}")
  return n


def _pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


class JftLM(LM):
  """lm_eval's `LM` over a `jft.load` model (see the module docstring)."""

  def __init__(
    self,
    source: str | None = None,
    adapter: str | None = None,
    dtype: str = "float32",
    batch_size: int | str | None = None,
    max_length: int = 0,
    max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
    num_devices: int = 1,
    seed: int = 0,
    model: api.Model | None = None,
    max_batch_size: int | None = None,  # lm_eval passes these two; unused
    device: str | None = None,
  ):
    super().__init__()
    del max_batch_size, device  # jax places the model (num_devices)
    if (model is None) == (source is None):
      raise ValueError("JftLM needs exactly one of source=... and model=...")
    if model is None:
      model = api.load(
        str(source),
        adapter=adapter or None,
        dtype=dtype,
        num_devices=int(num_devices),
      )
    if model.config.head == "score":
      raise ValueError(f"{model!r} is a reward model: it has no LM head")
    self.model, self.tok = model, model.tokenizer
    self._batch = _batch_size(batch_size)
    self._max_length = scoring.context_limit(model, int(max_length or 0))
    self._max_gen_toks = int(max_gen_toks)
    self._seed = int(seed)
    self._score_fn = _make_scorer(model)
    bos = self.tok.bos_prefix
    # What an empty context (and a rolling document) is conditioned on.
    self._prefix_token = bos[-1] if bos else self.tok.eos_id
    self._bos_text = self.tok.id_to_piece(bos[-1]) if bos else None

  @classmethod
  def create_from_arg_string(cls, arg_string, additional_config=None):
    """`--model_args` win over lm_eval's own `--batch_size` (which it always
    passes, 1 by default) and `--device`."""
    return cls.create_from_arg_obj(
      lm_utils.simple_parse_args_string(arg_string), additional_config
    )

  @classmethod
  def create_from_arg_obj(cls, arg_dict, additional_config=None):
    extra = {
      k: v
      for k, v in (additional_config or {}).items()
      if v is not None and k not in arg_dict
    }
    return cls(**arg_dict, **extra)

  # ------------------------------------------------------------- harness

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def batch_size(self) -> int:
    return self._batch

  @property
  def eot_token_id(self) -> int:
    return self.tok.eos_id

  @property
  def prefix_token_id(self) -> int:
    return self._prefix_token

  @property
  def tokenizer_name(self) -> str:
    return str(getattr(self.tok, "name", self.model.source)).replace("/", "__")

  def chat_template(self, chat_template=False):
    return self.tok.chat_template if chat_template else None

  def apply_chat_template(self, chat_history, add_generation_prompt=True):
    return self.tok.apply_chat_template(
      chat_history, add_generation_prompt=add_generation_prompt
    )

  # ------------------------------------------------------------ encoding

  def _bos_for(self, text: str) -> list[int]:
    """bos_prefix, unless a (chat-templated) text writes bos itself."""
    if self._bos_text and text.startswith(self._bos_text):
      return []
    return list(self.tok.bos_prefix)

  def encode_pair(
    self, context: str, continuation: str
  ) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of one loglikelihood request."""
    if not context:
      return [self._prefix_token], self.tok.encode(continuation)
    n = len(context) - len(context.rstrip())
    if n:
      context, continuation = context[:-n], context[-n:] + continuation
    ctx = self.tok.encode(context)
    cont = self.tok.encode(context + continuation)[len(ctx) :]
    if continuation and not cont:  # merged into the context's last token
      ctx, cont = self.tok.encode_segments([context, continuation])
    prefix = self._bos_for(context)
    if not prefix and not ctx:  # a context of whitespace only
      prefix = [self._prefix_token]
    return prefix + ctx, cont

  # ------------------------------------------------------------- scoring

  def score_tokens(
    self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]
  ) -> list[tuple[float, bool]]:
    """(sum log p(continuation | context), whether every continuation token
    is the argmax) per (context ids, continuation ids) pair, in order."""
    rows = []  # (inputs, number of scored targets at their end)
    for i, (ctx, cont) in enumerate(pairs):
      if not ctx or len(cont) > self._max_length:
        raise ValueError(
          f"request {i}: needs a context and at most {self._max_length} "
          f"continuation tokens, got {len(ctx)} and {len(cont)}"
        )
      full = (list(ctx) + list(cont))[-(self._max_length + 1) :]
      rows.append((full, len(cont)))
    # An empty continuation has log-probability 0 (and is greedy).
    out: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
    order = sorted(
      (i for i in range(len(rows)) if rows[i][1]),
      key=lambda i: -len(rows[i][0]),
    )
    pad = self.tok.pad_id
    batches = range(0, len(order), self._batch)
    for s in tqdm(batches, desc="jft loglikelihood", disable=len(batches) < 2):
      idx = order[s : s + self._batch]
      length = min(max(16, _pow2(len(rows[idx[0]][0]) - 1)), self._max_length)
      n_rows = min(_pow2(len(idx)), self._batch)  # few shapes compile
      inputs = np.full((n_rows, length), pad, np.int32)
      targets = np.full((n_rows, length), pad, np.int32)
      for r, i in enumerate(idx):
        full = rows[i][0]
        inputs[r, : len(full) - 1] = full[:-1]
        targets[r, : len(full) - 1] = full[1:]
      lp, greedy = jax.device_get(
        self._score_fn(self.model.params, inputs, targets)
      )
      for r, i in enumerate(idx):
        full, k = rows[i]
        end = len(full) - 1
        out[i] = (
          float(np.sum(lp[r, end - k : end], dtype=np.float64)),
          bool(np.all(greedy[r, end - k : end])),
        )
    return out

  def loglikelihood(self, requests, disable_tqdm: bool = False):
    del disable_tqdm
    args = [req.args for req in requests]
    res = self.score_tokens([self.encode_pair(c, x) for c, x in args])
    for (c, x), r in zip(args, res, strict=True):
      self.cache_hook.add_partial("loglikelihood", (c, x), r)
    return res

  def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
    """lm_eval's disjoint rolling windows of `text` (every token scored
    once, conditioned on the prefix token first)."""
    return [
      lm_utils.make_disjoint_window(w)
      for w in lm_utils.get_rolling_token_windows(
        token_list=self.tok.encode(text),
        prefix_token=self._prefix_token,
        max_seq_len=self._max_length,
        context_len=1,
      )
    ]

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
    del disable_tqdm
    texts = [req.args[0] for req in requests]
    owner, pairs = [], []
    for i, text in enumerate(texts):
      w = self.rolling_windows(text)
      owner += [i] * len(w)
      pairs += w
    sums = np.zeros(len(texts), np.float64)
    for i, (lp, _) in zip(owner, self.score_tokens(pairs), strict=True):
      sums[i] += lp
    res = [float(s) for s in sums]
    for text, r in zip(texts, res, strict=True):
      self.cache_hook.add_partial("loglikelihood_rolling", (text,), r)
    return res

  # ---------------------------------------------------------- generation

  def _gen_settings(self, gen_kwargs) -> tuple:
    kw = dict(gen_kwargs or {})
    until = kw.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    max_new = self._max_gen_toks
    for key in ("max_gen_toks", "max_new_tokens", "max_tokens"):
      if kw.get(key) is not None:
        max_new = int(kw[key])
        break
    temperature = 0.0
    if kw.get("do_sample"):
      t = kw.get("temperature")
      temperature = 1.0 if t is None else float(t)
    top_k = int(kw.get("top_k") or 0) if temperature > 0 else 0
    top_p = float(kw.get("top_p") or 1.0) if temperature > 0 else 1.0
    if max_new >= self._max_length:
      raise ValueError(
        f"max_gen_toks={max_new} leaves no room for a context in the "
        f"window of {self._max_length} tokens (model_args max_length=N)"
      )
    return tuple(until), max_new, temperature, top_k, top_p

  def generate_until(self, requests, disable_tqdm: bool = False):
    del disable_tqdm
    args = [req.args for req in requests]
    groups: dict[tuple, list[int]] = {}
    for i, (_, kw) in enumerate(args):
      groups.setdefault(self._gen_settings(kw), []).append(i)
    out: list[str] = [""] * len(args)
    for settings, members in groups.items():
      until, max_new, temperature, top_k, top_p = settings
      keep = self._max_length - max_new
      prompts = {}
      for i in members:
        ctx = args[i][0]
        prompts[i] = (self._bos_for(ctx) + self.tok.encode(ctx))[-keep:]
      members = sorted(members, key=lambda i: -len(prompts[i]))
      for s in range(0, len(members), self._batch):
        idx = members[s : s + self._batch]
        new = self.model.generate(
          [prompts[i] for i in idx],
          max_new,
          temperature=temperature,
          top_k=top_k,
          top_p=top_p,
          seed=self._seed + s,
        )
        for i, ids in zip(idx, new.tolist(), strict=True):
          text = self.tok.decode(jft_generate.truncate(ids, self.tok.eos_ids))
          for stop in until:
            if stop:
              text = text.split(stop)[0]
          out[i] = text
          self.cache_hook.add_partial("generate_until", args[i], text)
    return out


def _make_scorer(model):
  """jit: (params, inputs [B, L], targets [B, L]) -> (log p(targets[b, t]
  | inputs[b, :t+1]) [B, L] over the whole vocabulary (as the training loss
  and `Model.token_logprobs`), whether targets[b, t] is the argmax over the
  tokenizer's ids [B, L])."""
  apply = api.init_apply(model.config)
  vocab = model.tokenizer.vocab_size

  @jax.jit
  def score(params, inputs, targets):
    logits = transformer.logits_of(apply(params, inputs, None, None))
    logits = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, -1)
    lp = jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    greedy = jnp.argmax(logits[..., :vocab], -1) == targets
    return lp, greedy

  return score


if __name__ != "__main__":  # `python -m` runs a second copy: register once
  register_model(NAME)(JftLM)


def main(argv: Sequence[str] | None = None) -> int:
  """lm_eval's CLI with the `jft` model registered: the same arguments as
  `lm_eval` / `lm-eval run`."""
  import lm_eval.__main__ as lm_main

  import jft.interop.lm_eval  # noqa: F401 (registers the model)

  argv = sys.argv[1:] if argv is None else list(argv)
  saved = sys.argv
  sys.argv = ["lm-eval", *argv]
  try:
    lm_main.cli_evaluate()
  finally:
    sys.argv = saved
  return 0


if __name__ == "__main__":
  sys.exit(main())
