"""KTO (Ethayarajh et al. 2024) for thumbs-up / thumbs-down feedback.

Rows are `{"prompt", "completion", "label"}` as TRL's KTOTrainer reads them
(strings, or a message list for the prompt and a one-assistant-message list
for the completion; `label` true = desirable). Each example also carries a
*mismatched* completion, the previous row's, for the KL reference point
z0: as TRL, the batch's mean log-ratio of those pairs under policy and
reference, clamped at 0, without gradient (`jft.losses.kto_kl_estimate`).
The loss (`jft.losses.kto_loss`): desirable rows `w_d (1 - sigmoid(beta
(logratio - z0)))`, undesirable `w_u (1 - sigmoid(beta (z0 - logratio)))`
(or `apo_zero_unpaired`), averaged over rows. The reference is the frozen
starting model (LoRA: adapters off). Metrics use TRL's names:
`rewards/{chosen,rejected,margins}`, `logps/{chosen,rejected}`, `kl`.

Built-in data (no files): the DPO mining's pairs, unpaired (the true answer
desirable, the model's wrong one undesirable).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jft import losses
from jft.data import chat, pipeline
from jft.data.jsonl import DataError
from jft.errors import ConfigError
from jft.objectives import base, dpo, sft


def split_row(record, template) -> tuple[str, str, bool]:
  """(prompt text, completion text, desirable) of one KTO row."""
  where = getattr(record, "where", "?")
  label = record.get("label")
  if not isinstance(label, bool):
    raise DataError(f"{where}: field 'label' must be true or false")
  prompt, comp = record.get("prompt"), record.get("completion")
  if isinstance(comp, list):
    if isinstance(prompt, str):
      prompt = [{"role": "user", "content": prompt}]
    sft.check_messages(comp, where, "completion")
    if len(comp) != 1 or comp[0].get("role") != "assistant":
      raise DataError(f"{where}: field 'completion' must be one assistant turn")
    if isinstance(template, dict):
      pre = template["assistant"][0]
      text = dpo._messages_text(prompt or [], template, where, "prompt")
      prompt_text, comp_text = text + pre, comp[0]["content"]
    else:
      if prompt:
        sft.check_messages(prompt, where, "prompt")
      render = sft.render_fn(template)
      prompt_text, comp_text = chat.split_reply(render, prompt, comp[0], where)
  elif isinstance(comp, str) and isinstance(prompt, str):
    prompt_text, comp_text = prompt, comp
  else:
    raise DataError(
      f"{where}: KTO rows need 'prompt' and 'completion' (strings, or "
      "messages) and a boolean 'label'"
    )
  if not comp_text:
    raise DataError(f"{where}: field 'completion' is empty")
  return prompt_text, comp_text, label


class KTO(base.Objective):
  name = "kto"
  packing = False  # a row and its mismatched KL row stay together
  token_loss = False
  builtin_split = "kto"
  evaluators = ("task_accuracy",)
  summary_rows = (
    ("reward margin (chosen - rejected)", "eval/rewards/margins"),
  )

  def __init__(self, config, tokenizer):
    super().__init__(config, tokenizer)
    k = config.kto
    if k.loss_type not in losses.KTO_LOSS_TYPES:
      raise ConfigError(
        f"config.kto.loss_type: unknown {k.loss_type!r}; expected one of "
        f"{losses.KTO_LOSS_TYPES}"
      )
    if k.beta <= 0:
      raise ConfigError(f"config.kto.beta must be positive, got {k.beta}")
    self.template = sft.chat_format(config.sft, tokenizer)
    self.ref = base.Reference.for_run(config)

  # Host side -------------------------------------------------------------
  def make_examples(self, records, split="train"):
    tok, seq = self.tokenizer, self.config.seq_len
    rows, skipped = [], 0
    for r in records:
      p, c, label = split_row(r, self.template)
      templated = not isinstance(self.template, dict) and isinstance(
        r["completion"], list
      )
      prefix = [] if templated else tok.bos_prefix
      eos = [] if templated else [tok.eos_id]
      p_ids, c_ids = tok.encode_segments([p, c])
      p_ids, c_ids = prefix + p_ids, c_ids + eos
      if len(p_ids) + len(c_ids) > seq + 1:
        skipped += 1
        continue
      rows.append((p_ids, c_ids, label))
    if len(rows) < 2:
      raise DataError(
        f"kto {split}: {len(rows)} usable rows; KTO needs at least 2 (the "
        "KL reference point pairs each prompt with another row's completion)"
      )
    out = []
    for i, (p_ids, c_ids, label) in enumerate(rows):
      other = rows[i - 1][1]  # the previous row's completion, as TRL
      if len(p_ids) + len(other) > seq + 1:
        other = other[: seq + 1 - len(p_ids)]
      out.append(_example(p_ids, c_ids, other, label))
    stats = {"examples": len(out), "skipped": skipped}
    stats["desirable"] = sum(1 for *_, lb in rows if lb)
    for k, v in stats.items():
      self.data_stats[f"data/{split}_{k}"] = v
    if skipped:
      print(
        f"kto {split}: {skipped} of {len(records)} rows were longer than "
        f"seq_len + 1 = {seq + 1} tokens and skipped"
      )
    return out

  def reference_params(self, params, trainable):
    return self.ref.stored(params, trainable)

  # Pure side -------------------------------------------------------------
  def _logps(self, apply_fn, params, batch, rng, train):
    """Completion log-prob sums of the rows and of their KL rows."""
    two = lambda a, b: jnp.concatenate([a, b], axis=0)  # [2B, T]
    scores = apply_fn(
      params,
      two(batch["inputs"], batch["kl_inputs"]),
      two(batch["positions"], batch["positions"]),
      two(batch["segment_ids"], batch["kl_segment_ids"]),
      rng=rng,
      train=train,
      targets=two(batch["targets"], batch["kl_targets"]),
    )  # TokenScores [2B, T]: no [2B, T, V] logits with model.logits_chunk
    lp, _ = losses.row_logps(
      scores.logp, two(batch["weights"], batch["kl_weights"])
    )
    b = batch["inputs"].shape[0]
    return lp[:b], lp[b:]

  def loss(self, apply_fn, params, batch, rng, train, ref=None):
    k = self.config.kto
    pol, pol_kl = self._logps(apply_fn, params, batch, rng, train)
    ref_params = jax.lax.stop_gradient(self.ref.tree(params, ref))
    rf, rf_kl = self._logps(apply_fn, ref_params, batch, None, False)
    valid = (jnp.sum(batch["weights"], -1) > 0).astype(jnp.float32)  # [B]
    z0 = losses.kto_kl_estimate(pol_kl, rf_kl, weights=valid)
    labels = batch["label"][:, 0]  # [B]
    per_row, cr, rj = losses.kto_loss(
      pol,
      rf,
      labels,
      z0,
      beta=k.beta,
      desirable_weight=k.desirable_weight,
      undesirable_weight=k.undesirable_weight,
      loss_type=k.loss_type,
    )
    good = valid * (labels > 0.5)
    bad = valid * (labels <= 0.5)
    n_good, n_bad = jnp.sum(good), jnp.sum(bad)
    return (
      jnp.sum(per_row * valid),
      jnp.sum(valid),
      {
        "rewards/chosen": (jnp.sum(cr * good), n_good),
        "rewards/rejected": (jnp.sum(rj * bad), n_bad),
        "logps/chosen": (jnp.sum(pol * good), n_good),
        "logps/rejected": (jnp.sum(pol * bad), n_bad),
        "kl": (z0 * jnp.sum(valid), jnp.sum(valid)),
      },
    )


def _example(p_ids, c_ids, other_ids, label: bool) -> dict:
  """A row and its KL row (same prompt, another row's completion), padded
  to one length; `label` broadcast over it (1.0 = desirable)."""
  seqs = []
  for comp in (c_ids, other_ids):
    w = np.concatenate([np.zeros(len(p_ids)), np.ones(len(comp))])
    seqs.append(pipeline.causal_example(p_ids + comp, w.astype(np.float32)))
  length = max(len(s["inputs"]) for s in seqs)

  def pad(x):
    return np.pad(x, (0, length - len(x)))

  main, kl = seqs
  return {
    "inputs": pad(main["inputs"]),
    "targets": pad(main["targets"]),
    "weights": pad(main["weights"]),
    "kl_inputs": pad(kl["inputs"]),
    "kl_targets": pad(kl["targets"]),
    "kl_weights": pad(kl["weights"]),
    "kl_segment_ids": pad(np.ones(len(kl["inputs"]), np.int32)),
    "label": np.full(length, float(label), np.float32),
  }
