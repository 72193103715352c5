"""Direct preference optimisation and its variants (one pure loss table).

Inputs are per-sequence log-probabilities of the chosen and rejected
completions, summed over completion tokens only (prompt and padding carry
weight 0), under the policy and the reference. `config.dpo.loss_type`:

  sigmoid  DPO (Rafailov et al. 2023); `label_smoothing` > 0 = cDPO
  robust   rDPO (Chowdhury et al. 2024), unbiased under label noise
  ipo      IPO (Azar et al. 2023), on length-averaged log-probs (as TRL)
  hinge    SLiC-style hinge
  dpop     DPO-Positive (Pal et al. 2024, "Smaug"): sigmoid DPO with a
           penalty lambda * max(0, ref - policy log-prob of chosen) inside
           the sigmoid, so the chosen answer cannot lose likelihood. Made
           for pairs at a small edit distance, where plain DPO lowers both.
  simpo    reference-free, length-normalised, target margin `simpo_gamma`
  orpo     reference-free: NLL on chosen + beta * log-sigmoid(log odds ratio)

`beta` enters each loss exactly once (see tests/test_dpo.py, numpy refs).
Metrics use TRL's names: rewards/{chosen,rejected,accuracies,margins},
logps/{chosen,rejected}; plus logps/accuracies (policy prefers chosen).

The reference: with LoRA/QLoRA the frozen base with adapters off, through
the same forward (no second copy); with full fine-tuning a frozen copy in
the train state (no optimizer state) or, with `dpo.precompute_ref`, log-probs
computed once before training and stored with the examples.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jft.data import chat, pipeline
from jft.data.jsonl import DataError
from jft.errors import ConfigError
from jft.losses import (
  LENGTH_NORMALISED,  # noqa: F401  (re-exported: moved to jft.losses)
  LOSS_TYPES,
  REFERENCE_FREE,
  pair_segments,
  pair_sums,
  preference_loss,
  row_logps,
  sequence_logps,  # noqa: F401  (re-exported)
)
from jft.objectives import base, sft
from jft.objectives.sft import fit

# config.dpo.mask: which completion tokens carry the preference.
MASKS = ("full", "first_divergence")


def _messages_text(msgs, template, where, field):
  out = ""
  for i, m in enumerate(msgs):
    if not isinstance(m, dict) or not isinstance(m.get("content"), str):
      raise DataError(f"{where}: field '{field}[{i}]' needs a string content")
    if m.get("role") not in template:
      raise DataError(
        f"{where}: field '{field}[{i}].role' is {m.get('role')!r}; the chat "
        f"template knows {sorted(template)}"
      )
    pre, suf = template[m["role"]]
    out += pre + m["content"] + suf
  return out


def split_pair(record, template) -> tuple[str, str, str]:
  """(prompt text, chosen text, rejected text) of one preference row.

  Accepts `{"prompt","chosen","rejected"}` strings, the same with message
  lists, or chosen/rejected full conversations sharing a prompt prefix.
  `template` is `sft.chat_format`'s: with the role table the texts are the
  role-table pieces (eos is appended later); with a tokenizer, its chat
  template renders conversations, the prompt with the generation prompt and
  each completion up to and including the template's end-of-turn text.
  """
  where = getattr(record, "where", "?")
  for field in ("chosen", "rejected"):
    v = record.get(field)
    if v is None or (isinstance(v, str | list) and not v):
      raise DataError(f"{where}: field {field!r} is missing or empty")
    if not isinstance(v, str | list):
      raise DataError(f"{where}: field {field!r} must be a string or list")
  ch, rj = record["chosen"], record["rejected"]
  prompt = record.get("prompt")
  if isinstance(ch, list):
    if not isinstance(rj, list):
      raise DataError(f"{where}: 'chosen' and 'rejected' differ in type")
    if prompt is None:  # implicit prompt: the shared message prefix
      k = 0
      while k < min(len(ch), len(rj)) - 1 and ch[k] == rj[k]:
        k += 1
      prompt, ch, rj = ch[:k], ch[k:], rj[k:]
    if isinstance(prompt, str):
      prompt = [{"role": "user", "content": prompt}]
    for field, msgs in (("chosen", ch), ("rejected", rj)):
      sft.check_messages(msgs, where, field)
      if len(msgs) != 1 or msgs[0].get("role") != "assistant":
        raise DataError(
          f"{where}: field {field!r} must end in one assistant message"
        )
    if isinstance(template, dict):
      pre = template["assistant"][0]
      prompt_text = _messages_text(prompt, template, where, "prompt") + pre
      ch_text, rj_text = ch[0]["content"], rj[0]["content"]
    else:
      if prompt:  # an empty prompt is the template's to render, or refuse
        sft.check_messages(prompt, where, "prompt")
      render = sft.render_fn(template)
      prompt_text, ch_text = chat.split_reply(render, prompt, ch[0], where)
      _, rj_text = chat.split_reply(render, prompt, rj[0], where)
  else:
    if not isinstance(prompt, str):
      raise DataError(f"{where}: missing or non-string field 'prompt'")
    if not isinstance(rj, str):
      raise DataError(f"{where}: 'chosen' and 'rejected' differ in type")
    prompt_text, ch_text, rj_text = prompt, ch, rj
  if not ch_text or not rj_text:
    raise DataError(f"{where}: field 'chosen' or 'rejected' is empty")
  if ch_text == rj_text:
    raise DataError(f"{where}: fields 'chosen' and 'rejected' are identical")
  return prompt_text, ch_text, rj_text


def first_divergence(a, b) -> int:
  """Index of the first token where two completions differ."""
  k = 0
  while k < min(len(a), len(b)) and a[k] == b[k]:
    k += 1
  return k


def pair_ids(tok, prompt: str, chosen: str, rejected: str):
  """(prompt ids, chosen ids, rejected ids), the prompt ids shared by both.

  prompt+chosen and prompt+rejected are each tokenized once and split at
  the prompt by character offsets (`tok.encode_segments`). A tokenizer may
  merge across that boundary differently in the two, so their prompt ids
  can differ; the shared prompt is then their longest common prefix and the
  rest of each prompt part counts as completion. Both sequences stay exact
  tokenizations of their joined text and condition on identical ids, which
  the DPO log-ratio assumes; the few moved tokens carry loss like the
  completion (they differ between the two, so they are part of the choice).
  """
  p_c, c = tok.encode_segments([prompt, chosen])
  p_r, r = tok.encode_segments([prompt, rejected])
  k = first_divergence(p_c, p_r)
  return p_c[:k], p_c[k:] + c, p_r[k:] + r


def fit_pairs(
  records,
  tok,
  template,
  *,
  limit: int,
  limit_name: str,
  truncation: str,
  on_invalid: str,
  where: str,
  stats: dict,
  split: str,
  build,
  parse=lambda rec: None,
) -> list:
  """Tokenized preference pairs, shared by DPO and the reward model.

  Each record is split into (prompt, chosen, rejected) and `parse(rec)`
  reads any extra field (a DataError from either is skipped and counted
  with `on_invalid='skip'`, else raised). A pair whose prompt plus longer
  completion exceeds `limit` tokens loses prompt tokens from the left
  (`truncation='truncate_prompt'`) or is skipped; the counts go to
  `stats` as `data/{split}_*` and are printed, so nothing is lost
  silently. `build(rec, prompt_ids, chosen_ids, rejected_ids, extra)`
  makes the example.
  """
  out, counts = [], {"truncated": 0, "skipped": 0, "invalid": 0}
  for rec in records:
    try:
      p, c, j = split_pair(rec, template)
      extra = parse(rec)
    except DataError:
      if on_invalid != "skip":
        raise
      counts["invalid"] += 1
      continue
    # The tokenizer's template writes bos and end-of-turn itself.
    templated = not isinstance(template, dict) and isinstance(
      rec["chosen"], list
    )
    prefix = [] if templated else tok.bos_prefix
    eos = [] if templated else [tok.eos_id]
    p_ids, c_ids, j_ids = pair_ids(tok, p, c, j)
    p_ids = prefix + p_ids
    comps = [c_ids + eos, j_ids + eos]
    longest = max(comps, key=len)
    ids, _, status = fit(
      p_ids + longest,
      [0.0] * len(p_ids) + [1.0] * len(longest),
      limit,
      truncation,
      sft.kept_prefix(p_ids, tok),
    )
    if status == "skipped":
      counts["skipped"] += 1
      continue
    if status == "truncated":
      counts["truncated"] += 1
      p_ids = ids[: len(ids) - len(longest)]
    out.append(build(rec, p_ids, *comps, extra))
  for k, v in counts.items():
    stats[f"data/{split}_{k}"] = v
  stats[f"data/{split}_pairs"] = len(out)
  if any(counts.values()):
    print(
      f"{where}: of {len(records)} pairs, {counts['truncated']} had their "
      f"prompt truncated, {counts['skipped']} were skipped as longer than "
      f"{limit_name} = {limit} tokens, {counts['invalid']} were invalid and "
      "skipped"
    )
  if not out:
    raise DataError(f"{where}: no usable pairs")
  return out


def pair_example(prompt_ids, chosen_ids, rejected_ids, mask="full"):
  """One pair as a pipeline example; rejected in `rej_*` fields.

  Both sequences share the same prompt ids (the boundary is identical by
  construction) and are padded to one length; ref log-probs, when
  precomputed, go in `ref_c`/`ref_r` at index 0.

  `mask='first_divergence'` (Step-DPO style, Lai et al. 2024: compare the
  first wrong step, not what follows it): the shared completion prefix gets
  weight 0 in both, the rejected side keeps only its first differing token
  (the error), the chosen side its correct continuation from there. The
  rejected tokens after an early error are often right given that error
  (e.g. the rest of a copied string), and pushing them down teaches the
  model to stop doing the task.
  """
  c, r = _pair_sequences(prompt_ids, chosen_ids, rejected_ids, mask)
  length = max(len(c["inputs"]), len(r["inputs"]))

  def pad(x):
    return np.pad(x, (0, length - len(x)))

  return {
    "inputs": pad(c["inputs"]),
    "targets": pad(c["targets"]),
    "weights": pad(c["weights"]),
    "rej_inputs": pad(r["inputs"]),
    "rej_targets": pad(r["targets"]),
    "rej_weights": pad(r["weights"]),
    "ref_c": np.zeros(length, np.float32),
    "ref_r": np.zeros(length, np.float32),
  }


def packed_pair_example(prompt_ids, chosen_ids, rejected_ids, mask="full"):
  """One pair as one packable example (`dpo.pack_pairs`): the chosen
  sequence, then the rejected one, each `pair_example`'s.

  `side` (0 chosen, 1 rejected) splits the pair's packing segment in two,
  so neither attends to the other; `seq_pos` restarts at 0 for each (the
  model's positions); `ref` holds each side's precomputed reference
  log-prob at its first token. The packer keeps an example whole in one
  row, so many pairs share a row with no padding between them.
  """
  c, r = _pair_sequences(prompt_ids, chosen_ids, rejected_ids, mask)
  nc, nr = len(c["inputs"]), len(r["inputs"])
  out = {k: np.concatenate([c[k], r[k]]) for k in c}
  out["side"] = np.repeat(np.int32([0, 1]), [nc, nr])
  out["seq_pos"] = np.concatenate([np.arange(nc), np.arange(nr)]).astype(
    np.int32
  )
  out["ref"] = np.zeros(nc + nr, np.float32)
  return out


def _pair_sequences(prompt_ids, chosen_ids, rejected_ids, mask):
  """(chosen, rejected) causal examples of a pair, weighted per `mask`."""
  k = first_divergence(chosen_ids, rejected_ids)
  seqs = []
  for comp, rejected in ((chosen_ids, False), (rejected_ids, True)):
    ids = prompt_ids + comp
    w = np.ones(len(comp), np.float32)
    if mask == "first_divergence":
      w[:k] = 0.0
      if rejected:
        w[k + 1 :] = 0.0
    elif mask != "full":
      raise ConfigError(
        f"config.dpo.mask: unknown {mask!r}; expected one of {MASKS}"
      )
    full = np.concatenate([np.zeros(len(prompt_ids), np.float32), w])
    seqs.append(pipeline.causal_example(ids, full))
  return tuple(seqs)


class DPO(base.Objective):
  """Preference optimisation over `{"prompt","chosen","rejected"}` rows."""

  name = "dpo"
  fields = ()
  builtin_split = "pref"
  evaluators = ("task_accuracy",)
  packing = False  # one pair a row: chosen and rejected stay together
  token_loss = False

  def __init__(self, config, tokenizer):
    super().__init__(config, tokenizer)
    d = config.dpo
    if d.pack_pairs:  # many whole pairs a row, rows of both sequences' room
      self.packing, self.seq_len_factor = True, 2
    if d.loss_type not in LOSS_TYPES:
      raise ConfigError(
        f"config.dpo.loss_type: unknown {d.loss_type!r}; expected one of "
        f"{LOSS_TYPES}"
      )
    if d.loss_type == "robust" and not 0 <= d.label_smoothing < 0.5:
      raise ConfigError("config.dpo.label_smoothing must be in [0, 0.5)")
    self.template = sft.chat_format(config.sft, tokenizer)
    self.data_stats = {}
    if d.loss_type in REFERENCE_FREE:
      self.reference = "none"
    elif config.lora.rank > 0:
      self.reference = "adapters_off"
    elif d.precompute_ref:
      self.reference = "precomputed"
      self.precomputed_fields = ("ref",) if d.pack_pairs else ("ref_c", "ref_r")
    else:
      self.reference = "copy"

  # Host side -------------------------------------------------------------
  def make_examples(self, records, split="train"):
    d = self.config.dpo
    make = packed_pair_example if d.pack_pairs else pair_example
    return fit_pairs(
      records,
      self.tokenizer,
      self.template,
      limit=self.config.seq_len + 1,  # shifted: inputs and targets
      limit_name="seq_len + 1",
      truncation=d.truncation,
      on_invalid=d.on_invalid,
      where=f"dpo {split}",
      stats=self.data_stats,
      split=split,
      build=lambda rec, p, c, j, extra: make(p, c, j, mask=d.mask),
    )

  def reference_params(self, params, trainable):
    """A frozen copy ('copy'), or the starting values of any non-adapter
    leaf that trains next to LoRA adapters ('adapters_off'), else nothing."""
    if self.reference in ("copy", "adapters_off"):
      return base.Reference(self.reference).stored(params, trainable)
    return {}

  def precompute(self, examples, apply_fn, params, run_batches):
    """Stores reference log-probs with the examples ('precomputed' mode).

    `run_batches(fn, batches)` runs a jitted `fn(params, batch)` over host
    batches on the mesh and returns host results.
    """
    if self.reference != "precomputed":
      return examples

    def fn(p, batch):
      pc, pr, _, _ = self._policy_logps(apply_fn, p, batch, None, False)
      return pc, pr

    packed = self.config.dpo.pack_pairs
    bs = self.config.eval_batch_size
    batches = pipeline.make_eval_batches(
      examples,
      seq_len=self.config.seq_len * self.seq_len_factor,
      batch_size=bs,
      pad_id=self.tokenizer.pad_id,
      packing=False,  # a pair a row: its log-probs are its row's first
    )
    outs = run_batches(fn, params, batches)
    pc = np.concatenate([o[0] for o in outs])[: len(examples)]
    pr = np.concatenate([o[1] for o in outs])[: len(examples)]
    done = []
    for ex, c, r in zip(examples, pc, pr, strict=True):
      ex = dict(ex)
      if packed:  # [B, K] slots: the row's pair is slot 0
        ex["ref"] = ex["ref"].copy()
        ex["ref"][0], ex["ref"][np.sum(ex["side"] == 0)] = c[0], r[0]
      else:
        ex["ref_c"] = ex["ref_c"].copy()
        ex["ref_r"] = ex["ref_r"].copy()
        ex["ref_c"][0], ex["ref_r"][0] = c, r
      done.append(ex)
    return done

  summary_rows = (
    ("preference accuracy (policy log-probs)", "eval/logps/accuracies"),
    ("preference accuracy (implicit reward)", "eval/rewards/accuracies"),
    ("reward margin", "eval/rewards/margins"),
  )

  # Pure side -------------------------------------------------------------
  def _policy_logps(self, apply_fn, params, batch, rng, train):
    """Chosen and rejected through one batched forward: (policy log-prob
    chosen, rejected, weighted tokens chosen, rejected), per pair: [B], or
    [B, K] pair slots of packed rows (`packed_pair_example`; empty slots
    have 0 tokens)."""
    chex.assert_rank(batch["inputs"], 2)
    if "side" in batch:
      seg, side = batch["segment_ids"], batch["side"]
      scores = apply_fn(
        params,
        batch["inputs"],
        batch["seq_pos"],
        pair_segments(seg, side),
        rng=rng,
        train=train,
        targets=batch["targets"],
      )  # TokenScores [B, T]
      w = batch["weights"].astype(jnp.float32)
      lp = pair_sums(scores.logp.astype(jnp.float32) * w, seg, side)
      n = pair_sums(w, seg, side)
      return lp[..., 0], lp[..., 1], n[..., 0], n[..., 1]
    two = lambda a, b: jnp.concatenate([a, b], axis=0)  # [2B, T]
    scores = apply_fn(
      params,
      two(batch["inputs"], batch["rej_inputs"]),
      two(batch["positions"], batch["positions"]),
      two(batch["segment_ids"], batch["segment_ids"]),
      rng=rng,
      train=train,
      targets=two(batch["targets"], batch["rej_targets"]),
    )  # TokenScores [2B, T]: no [2B, T, V] logits with model.logits_chunk
    lp, n = row_logps(scores.logp, two(batch["weights"], batch["rej_weights"]))
    b = batch["inputs"].shape[0]
    return lp[:b], lp[b:], n[:b], n[b:]

  def loss(self, apply_fn, params, batch, rng, train, ref=None):
    d = self.config.dpo
    pc, pr, nc, nr = self._policy_logps(apply_fn, params, batch, rng, train)
    if self.reference == "none":
      rc = rr = jnp.zeros_like(pc)
    elif self.reference == "precomputed" and "side" in batch:
      ref = pair_sums(batch["ref"], batch["segment_ids"], batch["side"])
      rc, rr = ref[..., 0], ref[..., 1]
    elif self.reference == "precomputed":
      rc, rr = batch["ref_c"][:, 0], batch["ref_r"][:, 0]
    else:
      ref_params = base.Reference(self.reference).tree(params, ref)
      rc, rr, _, _ = self._policy_logps(
        apply_fn, jax.lax.stop_gradient(ref_params), batch, None, False
      )
    losses, cr, rj = preference_loss(
      pc,
      pr,
      rc,
      rr,
      nc,
      nr,
      loss_type=d.loss_type,
      beta=d.beta,
      label_smoothing=d.label_smoothing,
      simpo_gamma=d.simpo_gamma,
      rpo_alpha=d.rpo_alpha,
      dpop_lambda=d.dpop_lambda,
    )
    valid = (nc > 0).astype(jnp.float32)  # all-padding rows carry no pair
    n = jnp.sum(valid)

    def m(x):
      return (jnp.sum(x * valid), n)

    f32 = lambda x: x.astype(jnp.float32)
    return (
      jnp.sum(losses * valid),
      n,
      {
        "rewards/chosen": m(cr),
        "rewards/rejected": m(rj),
        "rewards/accuracies": m(f32(cr > rj)),
        "rewards/margins": m(cr - rj),
        "logps/chosen": m(pc),
        "logps/rejected": m(pr),
        "logps/accuracies": m(f32(pc > pr)),
      },
    )
