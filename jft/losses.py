"""Pure losses for preference and RL training: one table, no modules.

Every function is plain `jax.numpy` on arrays and Python scalars (no flax
modules, configs or I/O), so objectives compose them and
tests/test_losses.py checks each against a numpy reference written from the
paper or TRL. Conventions:

- Math in float32 whatever the input dtype (bfloat16 logits included).
- Masks are float arrays: 1 = the position counts, 0 = prompt or padding.
- Token losses come back as masked sums with their counts, or per-example
  values, so gradient accumulation and multi-device reduction normalise once
  over the global batch (jft/objectives/base.py: loss = loss_sum / weight),
  never as a mean of micro-batch means.
- Switches that pick a formula (`loss_type`, `kind`, `agg`, whether
  `beta == 0`, `label_smoothing > 0`, `rpo_alpha`) are static Python values;
  the arrays may be traced.
- Targets and behaviour-policy quantities (GAE outputs, old log-probs,
  advantages, KTO's KL) are constants: they pass through `stop_gradient`.

Shapes: B rows, T tokens, V vocabulary, P preference pairs, N sequences.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# --------------------------------------------------------------- DPO family

LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge", "dpop", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")
LENGTH_NORMALISED = ("ipo", "simpo", "orpo")
# Losses whose formula has no label-noise term: a smoothing rate would be
# silently ignored, so it is an error.
NO_LABEL_SMOOTHING = ("ipo", "hinge", "orpo")


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def _check_preference_options(loss_type, label_smoothing, rpo_alpha):
  """Loud errors for option combinations a loss would silently ignore."""
  if loss_type not in LOSS_TYPES:
    raise ValueError(
      f"config.dpo.loss_type: unknown {loss_type!r}; expected one of "
      f"{LOSS_TYPES}"
    )
  if label_smoothing and loss_type in NO_LABEL_SMOOTHING:
    raise ValueError(
      f"config.dpo.label_smoothing={label_smoothing}: loss_type "
      f"{loss_type!r} has no label smoothing (sigmoid, robust, dpop and "
      "simpo do); set it to 0"
    )
  if loss_type == "robust" and not 0 <= label_smoothing < 0.5:
    raise ValueError("config.dpo.label_smoothing must be in [0, 0.5)")
  if rpo_alpha and loss_type == "orpo":
    raise ValueError(
      f"config.dpo.rpo_alpha={rpo_alpha}: loss_type 'orpo' already adds the "
      "chosen NLL; RPO would add it a second time. Set config.dpo.rpo_alpha=0"
    )


def preference_loss(
  pc,
  pr,
  rc,
  rr,
  nc,
  nr,
  *,
  loss_type,
  beta,
  label_smoothing=0.0,
  simpo_gamma=0.5,
  rpo_alpha=0.0,
  dpop_lambda=50.0,
):
  """Per-pair DPO-family losses and implicit rewards.

  pc/pr: policy log-probs (sums over completion tokens) of chosen/rejected
  [P]; rc/rr: reference log-probs [P] (ignored by reference-free losses);
  nc/nr: completion token counts [P]. With h = (pc - rc) - (pr - rr):

    sigmoid  -(1-ls) log s(beta h) - ls log s(-beta h)  DPO (Rafailov et al.
             2023); ls > 0 is cDPO (TRL `label_smoothing`)
    robust   (-(1-ls) log s(beta h) + ls log s(-beta h)) / (1 - 2 ls)  rDPO
             (Chowdhury et al. 2024), unbiased under label noise ls
    ipo      (h - 1/(2 beta))^2 on per-token averages (Azar et al. 2023; TRL)
    hinge    max(0, 1 - beta h)  (SLiC, Zhao et al. 2023)
    dpop     sigmoid with h - lambda max(0, rc - pc)  (DPO-Positive, Pal et
             al. 2024): the chosen answer cannot lose likelihood
    simpo    sigmoid with h = pc/nc - pr/nr - gamma/beta, no reference
             (Meng et al. 2024)
    orpo     -pc/nc - beta log s(log odds(pc/nc) - log odds(pr/nr)),
             odds(p) = p / (1 - p) (Hong et al. 2024): NLL + odds ratio

  `beta` enters each loss exactly once. `rpo_alpha` adds alpha * chosen NLL
  per token (RPO, Pang et al. 2024; TRL `rpo_alpha`). Raises ValueError for
  label smoothing with ipo/hinge/orpo (no such term there) and for rpo_alpha
  with orpo (its NLL would count twice). Rewards: beta * (policy - ref)
  log-probs, or beta * per-token policy log-prob for reference-free losses.
  Returns (losses, chosen_rewards, rejected_rewards), each [P].
  """
  _check_preference_options(loss_type, label_smoothing, rpo_alpha)
  ls = label_smoothing
  pc, pr, rc, rr, nc, nr = map(_f32, (pc, pr, rc, rr, nc, nr))  # [P] each
  nll_chosen = -pc / jnp.maximum(nc, 1.0)  # before any normalisation below
  if loss_type in LENGTH_NORMALISED:
    nc1, nr1 = jnp.maximum(nc, 1.0), jnp.maximum(nr, 1.0)
    pc, pr = pc / nc1, pr / nr1
    if loss_type == "ipo":
      rc, rr = rc / nc1, rr / nr1
  if loss_type in REFERENCE_FREE:
    chosen_r, rejected_r = beta * pc, beta * pr
    logits = pc - pr  # [P]
  else:
    chosen_r, rejected_r = beta * (pc - rc), beta * (pr - rr)
    logits = (pc - pr) - (rc - rr)  # [P]

  def smoothed_sigmoid(z):  # cDPO: -(1-ls) log s(beta z) - ls log s(-beta z)
    return -jax.nn.log_sigmoid(beta * z) * (1 - ls) - (
      jax.nn.log_sigmoid(-beta * z) * ls
    )

  if loss_type == "sigmoid":
    losses = smoothed_sigmoid(logits)
  elif loss_type == "robust":
    losses = (
      -jax.nn.log_sigmoid(beta * logits) * (1 - ls)
      + jax.nn.log_sigmoid(-beta * logits) * ls
    ) / (1 - 2 * ls)
  elif loss_type == "ipo":
    losses = (logits - 1 / (2 * beta)) ** 2
  elif loss_type == "hinge":
    losses = jax.nn.relu(1 - beta * logits)
  elif loss_type == "dpop":
    losses = smoothed_sigmoid(logits - dpop_lambda * jax.nn.relu(rc - pc))
  elif loss_type == "simpo":
    losses = smoothed_sigmoid(logits - simpo_gamma / beta)
  else:  # orpo

    def log1m_exp(x):  # log(1 - e^x) for x < 0
      return jnp.log1p(-jnp.exp(jnp.minimum(x, -1e-6)))

    log_odds = (pc - pr) - (log1m_exp(pc) - log1m_exp(pr))  # [P]
    losses = -pc - beta * jax.nn.log_sigmoid(log_odds)  # NLL + odds term
  if rpo_alpha:
    losses = losses + rpo_alpha * nll_chosen
  return losses, chosen_r, rejected_r


# ---------------------------------------------------------- token log-probs


def tempered(logits, temperature: float):
  """The logits of the distribution rollouts sample from: logits / T. TRL
  divides by the sampling temperature in the rollout and in the update
  alike, so the PPO/GRPO ratio and the KL compare the distribution that was
  sampled; T = 0 (greedy) or 1 leaves them as they are."""
  if temperature in (0, 1):
    return logits
  return logits / temperature


def token_logps(logits, targets):
  """Log-probability of each target token, [B, T] float32.

  log_softmax(logits)[target] evaluated as logits[target] - logsumexp(logits)
  in float32 (TRL's `selective_log_softmax`): the same number without a
  second [B, T, V] array of log-probs.
  """
  logits = _f32(logits)  # [B, T, V]
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)  # [B, T]


def token_entropy(logits):
  """Entropy of each position's next-token distribution, [B, T] float32.

  H = -sum_v p_v log p_v with p = softmax(logits) (TRL's
  `entropy_from_logits`; PPO/GRPO `objective/entropy`).
  """
  logp = jax.nn.log_softmax(_f32(logits), axis=-1)  # [B, T, V]
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)  # [B, T]


def sequence_logps(logits, targets, weights):
  """Summed log-prob of the weighted targets of each row.

  Weights select completion tokens (prompt and padding carry 0). Returns
  (sums [N], token counts [N]), both float32.
  """
  return row_logps(token_logps(logits, targets), weights)


def row_logps(token_logp, weights):
  """`sequence_logps` from per-token log-probs [N, T] (e.g. the fused LM
  head's `TokenScores.logp`, which never builds [N, T, V] logits)."""
  w = _f32(weights)  # [N, T]
  return jnp.sum(_f32(token_logp) * w, axis=-1), jnp.sum(w, axis=-1)


def pair_segments(segment_ids, side):
  """Attention segments of packed preference pairs: the packer's segment
  (a pair) split by `side` (0 chosen, 1 rejected), so the two sequences of
  a pair never attend to each other; 0 stays padding. [B, T] -> [B, T]."""
  return jnp.where(segment_ids > 0, 2 * segment_ids - 1 + side, 0)


def pair_sums(values, segment_ids, side):
  """Sums of `values` [B, T] per (pair slot, side) of packed rows:
  [B, K, 2], slot k holding segment k + 1 (K = T // 2: a pair has at least
  a token a side); slots past a row's pairs are 0. Padding is left out."""
  b, t = values.shape
  k = t // 2
  slot = jnp.where(segment_ids > 0, 2 * (segment_ids - 1) + side, 0)
  index = slot + 2 * k * jnp.arange(b)[:, None]  # [B, T]
  kept = jnp.where(segment_ids > 0, _f32(values), 0.0)
  sums = jax.ops.segment_sum(
    kept.reshape(-1), index.reshape(-1), num_segments=b * 2 * k
  )
  return sums.reshape(b, k, 2)


# ------------------------------------------------------------- reward model


def bradley_terry(r_chosen, r_rejected, margin=None, center_coef=0.0):
  """Per-pair Bradley-Terry reward-model loss, [P].

  -log sigmoid(rc - rr - margin) + center_coef * (rc + rr)^2 (Ouyang et al.
  2022; TRL RewardTrainer: `margin` column, `center_rewards_coefficient`
  from Eisenstein et al. 2023). TRL adds the batch mean of the centering
  term to the mean loss; per pair it is the same term, so a mean of these
  losses is TRL's loss.
  """
  rc, rr = _f32(r_chosen), _f32(r_rejected)  # [P]
  z = rc - rr if margin is None else rc - rr - _f32(margin)  # [P]
  return -jax.nn.log_sigmoid(z) + center_coef * (rc + rr) ** 2


# -------------------------------------------------------------- RL building

KL_KINDS = ("k1", "k2", "k3")


def kl_estimate(logp, ref_logp, kind):
  """Per-token estimate of KL(policy || reference) from sampled tokens.

  Schulman, "Approximating KL divergence" (2020), with d = logp - ref_logp:
    k1 = d                      unbiased, high variance (PPO reward penalty)
    k2 = d^2 / 2                biased, low variance
    k3 = exp(-d) + d - 1 >= 0   unbiased, low variance (TRL GRPO)
  k3 uses expm1 for accuracy near d = 0. Shape follows the inputs.
  """
  d = _f32(logp) - _f32(ref_logp)  # [...]
  if kind == "k1":
    return d
  if kind == "k2":
    return 0.5 * d**2
  if kind == "k3":
    return jnp.expm1(-d) + d  # exp(ref - logp) - (ref - logp) - 1
  raise ValueError(f"kl kind: unknown {kind!r}; expected one of {KL_KINDS}")


def whiten(x, mask, shift_mean=True):
  """Masked whitening (TRL / OpenAI lm-human-preferences `masked_whiten`).

  mean and *unbiased* variance over the masked elements of the whole array,
  then (x - mean) * rsqrt(var + 1e-8); with `shift_mean=False` the mean is
  added back (rewards keep their sign). Every position is transformed, so
  padding positions hold meaningless values: callers mask them. Fewer than
  2 masked elements give var = 0 (TRL divides by zero) and an empty mask
  mean = 0, so padding never turns into NaN.
  """
  x, m = _f32(x), _f32(mask)  # [...]
  n = jnp.sum(m)
  mean = jnp.sum(x * m) / jnp.maximum(n, 1.0)
  var = jnp.sum((x - mean) ** 2 * m) / jnp.maximum(n - 1.0, 1.0)
  out = (x - mean) * jax.lax.rsqrt(var + 1e-8)
  return out if shift_mean else out + mean


def gae(rewards, values, mask, gamma, lam):
  """Generalized advantage estimation (Schulman et al. 2016), per row.

  Over each row's masked (response) positions t, right to left:
    delta_t = r_t + gamma * V_next - V_t
    A_t = delta_t + gamma * lam * A_next
  where "next" is the next *masked* position of the row. Padding: positions
  with mask 0 are skipped (their reward and value are ignored, A = 0 there)
  and the recursion carries over them, so right padding, left padding and
  gaps (e.g. tool output inside a response) all work; after a row's last
  response token V_next = A_next = 0 (the episode ends there). TRL's PPO
  instead runs over every position with padded values zeroed, which is the
  same for right padding. returns = advantages + values (at padding:
  values). Outputs are targets: stop_gradient. Returns
  (advantages [B, T], returns [B, T]), float32.
  """
  r, v, m = _f32(rewards), _f32(values), _f32(mask)  # [B, T]

  def step(carry, xs):
    next_v, next_a = carry  # [B], [B]
    r_t, v_t, m_t = xs  # [B] each
    a_t = r_t + gamma * next_v - v_t + gamma * lam * next_a  # [B]
    keep = m_t > 0
    carry = (jnp.where(keep, v_t, next_v), jnp.where(keep, a_t, next_a))
    return carry, jnp.where(keep, a_t, 0.0)

  zeros = jnp.zeros(r.shape[:1], jnp.float32)  # [B]
  _, adv = jax.lax.scan(step, (zeros, zeros), (r.T, v.T, m.T), reverse=True)
  adv = jax.lax.stop_gradient(adv.T)  # [B, T]
  return adv, jax.lax.stop_gradient(adv + v)


def ppo_policy_loss(logp, old_logp, advantages, mask, clip):
  """PPO clipped surrogate (Schulman et al. 2017; TRL PPOTrainer).

  Per token, r = exp(logp - old_logp):
    max(-A * r, -A * clip(r, 1 - clip, 1 + clip)).
  Returns (loss_sum, count, metrics): masked sum of that, number of masked
  tokens, and `clipfrac_sum` (tokens where the clipped term won, TRL's
  `(pg_losses2 > pg_losses)`) and `approxkl_sum` (0.5 (logp - old)^2),
  summed over masked tokens; divide each by the count
  (policy/{clipfrac_avg,approxkl_avg}). old_logp and advantages [B, T] are
  constants.
  """
  lp, m = _f32(logp), _f32(mask)  # [B, T]
  old = jax.lax.stop_gradient(_f32(old_logp))  # [B, T]
  a = jax.lax.stop_gradient(_f32(advantages))  # [B, T]
  log_ratio = lp - old  # [B, T]
  ratio = jnp.exp(log_ratio)
  pg1 = -a * ratio  # [B, T]
  pg2 = -a * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)  # [B, T]
  metrics = {
    "clipfrac_sum": jnp.sum((pg2 > pg1) * m),
    "approxkl_sum": jnp.sum(0.5 * log_ratio**2 * m),
  }
  return jnp.sum(jnp.maximum(pg1, pg2) * m), jnp.sum(m), metrics


def ppo_value_loss(values, old_values, returns, mask, clip):
  """PPO clipped value loss (TRL PPOTrainer, `cliprange_value`).

  Per token: 0.5 * max((v - R)^2, (clip(v, old - clip, old + clip) - R)^2).
  Returns (loss_sum, count, clipfrac_sum): masked sum, masked token count and
  the number of tokens where the clipped error was larger (val/clipfrac_avg
  = clipfrac_sum / count). old_values and returns [B, T] are constants.
  """
  v, m = _f32(values), _f32(mask)  # [B, T]
  old = jax.lax.stop_gradient(_f32(old_values))  # [B, T]
  ret = jax.lax.stop_gradient(_f32(returns))  # [B, T]
  vf1 = (v - ret) ** 2  # [B, T]
  vf2 = (jnp.clip(v, old - clip, old + clip) - ret) ** 2  # [B, T]
  loss_sum = 0.5 * jnp.sum(jnp.maximum(vf1, vf2) * m)
  return loss_sum, jnp.sum(m), jnp.sum((vf2 > vf1) * m)


def group_advantages(rewards, group_size, scale=True):
  """GRPO advantages: each reward against its prompt's group, [N] float32.

  Rows are consecutive groups of `group_size` samples of one prompt:
  A = r - group mean, divided by (group std + 1e-4) when `scale` (Shao et
  al. 2024; TRL `scale_rewards='group'`). The std is the *unbiased* one
  (Bessel, n - 1), as TRL's `nanstd` (and torch's default `std`); a group of
  one has std 0, as TRL. `scale=False` is Dr. GRPO's unscaled advantage.
  """
  r = _f32(rewards)  # [N]
  n = r.shape[0]
  if group_size < 1 or n % group_size:
    raise ValueError(
      f"group_advantages: {n} rewards do not split into groups of {group_size}"
    )
  g = r.reshape(n // group_size, group_size)  # [N/G, G]
  adv = g - jnp.mean(g, axis=-1, keepdims=True)  # [N/G, G]
  if scale:
    ss = jnp.sum(adv**2, axis=-1, keepdims=True)  # [N/G, 1]
    std = jnp.sqrt(ss / max(group_size - 1, 1))  # group of one: 0
    adv = adv / (std + 1e-4)
  return adv.reshape(n)


def leave_one_out(rewards, group_size):
  """Each reward minus the mean of the *other* samples of its prompt, [N].

  Rows are consecutive groups of `group_size` samples of one prompt (RLOO,
  Ahmadian et al. 2024): r_i - (sum_j r_j - r_i) / (G - 1). The baseline
  depends on the prompt and the other samples only, so subtracting it
  leaves the policy gradient unbiased and the optimum unchanged, while the
  critic no longer has to learn each prompt's level. G = 1 returns r.
  """
  r = _f32(rewards)  # [N]
  n = r.shape[0]
  if group_size < 1 or n % group_size:
    raise ValueError(
      f"leave_one_out: {n} rewards do not split into groups of {group_size}"
    )
  if group_size == 1:
    return r
  g = r.reshape(n // group_size, group_size)  # [N/G, G]
  others = (jnp.sum(g, axis=-1, keepdims=True) - g) / (group_size - 1)
  return (g - others).reshape(n)


GRPO_AGGS = ("grpo", "dr_grpo", "dapo")


def grpo_loss(
  logp,
  old_logp,
  ref_logp,
  advantages,
  mask,
  *,
  eps_low,
  eps_high,
  beta,
  agg,
  max_completion_length=None,
):
  """GRPO clipped loss with a k3 KL penalty (Shao et al. 2024; TRL).

  Per token, r = exp(logp - old_logp) and A the row's advantage:
    l = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) + beta * k3
  (DAPO's asymmetric clip when eps_high > eps_low; k3 = kl_estimate(logp,
  ref_logp, "k3"), not computed and ref_logp unused when beta == 0).
  `old_logp=None` means a single update per rollout: old = stop_gradient
  (logp), r = 1 with the policy gradient intact. Aggregation `agg`, as TRL's
  GRPOTrainer `loss_type`:
    grpo     mean over each sequence's tokens, then mean over sequences
    dr_grpo  sum over all tokens / (sequences * max_completion_length)
             (Liu et al. 2025; default max_completion_length: T)
    dapo     sum over all tokens / number of tokens (Yu et al. 2025)

  Returns (loss, metrics); metrics are `name -> (sum, count)` pairs
  (jft/objectives/base.py's MetricSums), token-weighted like TRL's
  `global_masked_mean`: `kl` (only when beta != 0),
  `clip_ratio/low_mean` (r < 1 - eps_low and A < 0), `clip_ratio/high_mean`
  (r > 1 + eps_high and A > 0), `clip_ratio/region_mean` (either).
  Micro-batches: metrics["loss"] = (loss_sum, weight) with loss = loss_sum /
  weight, and summing both over micro-batches gives the formula on the whole
  batch exactly: grpo: (sum of per-sequence means, sequences); dr_grpo:
  (token sum, sequences * max_completion_length); dapo: (token sum, tokens).
  A sequence is a row with at least one masked token (all-padding rows count
  for nothing; TRL has no such rows). logp, old_logp, ref_logp, mask:
  [B, T]; advantages: [B] (or [B, T]); eps/beta/agg static.
  """
  if agg not in GRPO_AGGS:
    raise ValueError(f"grpo agg: unknown {agg!r}; expected one of {GRPO_AGGS}")
  lp, m = _f32(logp), _f32(mask)  # [B, T]
  old = jax.lax.stop_gradient(lp if old_logp is None else _f32(old_logp))
  a = jax.lax.stop_gradient(_f32(advantages))
  if a.ndim == 1:
    a = a[:, None]  # [B, 1]: one advantage per sequence
  ratio = jnp.exp(lp - old)  # [B, T]
  clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)  # [B, T]
  per_tok = -jnp.minimum(ratio * a, clipped * a)  # [B, T]
  count = jnp.sum(m)
  metrics = {}
  if beta != 0:
    if ref_logp is None:
      raise ValueError("grpo_loss: beta != 0 needs ref_logp")
    kl = kl_estimate(lp, jax.lax.stop_gradient(_f32(ref_logp)), "k3")
    per_tok = per_tok + beta * kl  # [B, T]
    metrics["kl"] = (jnp.sum(kl * m), count)
  tok_sum = jnp.sum(per_tok * m, axis=-1)  # [B]
  n_tok = jnp.sum(m, axis=-1)  # [B]
  seqs = jnp.sum((n_tok > 0).astype(jnp.float32))
  if agg == "grpo":
    loss_sum, weight = jnp.sum(tok_sum / jnp.maximum(n_tok, 1.0)), seqs
  elif agg == "dr_grpo":
    length = max_completion_length or m.shape[-1]
    loss_sum, weight = jnp.sum(tok_sum), seqs * length
  else:  # dapo
    loss_sum, weight = jnp.sum(tok_sum), count
  low = ((ratio < 1.0 - eps_low) & (a < 0)).astype(jnp.float32)  # [B, T]
  high = ((ratio > 1.0 + eps_high) & (a > 0)).astype(jnp.float32)  # [B, T]
  metrics["clip_ratio/low_mean"] = (jnp.sum(low * m), count)
  metrics["clip_ratio/high_mean"] = (jnp.sum(high * m), count)
  metrics["clip_ratio/region_mean"] = (jnp.sum((low + high) * m), count)
  metrics["loss"] = (loss_sum, weight)
  return loss_sum / jnp.maximum(weight, 1e-12), metrics


# ----------------------------------------------------------------------- KTO

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def kto_kl_estimate(kl_policy_logps, kl_ref_logps, *, weights=None):
  """KTO's reference point z0: max(mean(policy - ref), 0), stop_gradient.

  Inputs are sequence log-probs [N] of *mismatched* (prompt, completion)
  pairs (TRL shifts the completions by one row within the batch), so the
  mean estimates KL(policy || reference) over the batch without favouring
  any answer (Ethayarajh et al. 2024). `weights` [N] (1 = real row) drop
  padding rows from the mean. TRL averages each process's mean and clamps;
  inside one jit over the global batch this is the global mean.
  """
  d = _f32(kl_policy_logps) - _f32(kl_ref_logps)  # [N]
  if weights is None:
    mean = jnp.mean(d)
  else:
    w = _f32(weights)  # [N]
    mean = jnp.sum(d * w) / jnp.maximum(jnp.sum(w), 1.0)
  return jax.lax.stop_gradient(jnp.maximum(mean, 0.0))


def kto_loss(
  policy_logps,
  ref_logps,
  labels,
  kl,
  *,
  beta,
  desirable_weight=1.0,
  undesirable_weight=1.0,
  loss_type="kto",
):
  """Per-row KTO losses (Ethayarajh et al. 2024, eq. 7; TRL KTOTrainer).

  With logratio = policy_logps - ref_logps [N] (completion sums) and
  labels [N] (1 desirable, 0 undesirable):
    kto                desirable: w_d * (1 - sigmoid(beta (logratio - kl)))
                       undesirable: w_u * (1 - sigmoid(beta (kl - logratio)))
    apo_zero_unpaired  desirable: w_d * (1 - sigmoid(beta logratio))
                       undesirable: w_u * sigmoid(beta logratio)
                       (D'Oosterlinck et al. 2024; `kl` unused)
  `kl` is the batch reference point from `kto_kl_estimate` (clamped at 0,
  no gradient). TRL's loss is the mean over rows: callers sum these with
  their padding weights. Returns (losses [N], chosen_rewards [N],
  rejected_rewards [N]); rewards = beta * logratio (no gradient) on
  desirable rows resp. undesirable rows, 0 elsewhere.
  """
  if loss_type not in KTO_LOSS_TYPES:
    raise ValueError(
      f"kto loss_type: unknown {loss_type!r}; expected one of {KTO_LOSS_TYPES}"
    )
  logratio = _f32(policy_logps) - _f32(ref_logps)  # [N]
  desirable = _f32(labels) > 0.5  # [N]
  if loss_type == "kto":
    z0 = jax.lax.stop_gradient(_f32(kl))
    chosen = 1.0 - jax.nn.sigmoid(beta * (logratio - z0))  # [N]
    rejected = 1.0 - jax.nn.sigmoid(beta * (z0 - logratio))  # [N]
  else:
    chosen = 1.0 - jax.nn.sigmoid(beta * logratio)
    rejected = jax.nn.sigmoid(beta * logratio)
  losses = jnp.where(
    desirable, desirable_weight * chosen, undesirable_weight * rejected
  )
  rewards = jax.lax.stop_gradient(beta * logratio)  # [N]
  return (
    losses,
    jnp.where(desirable, rewards, 0.0),
    jnp.where(desirable, 0.0, rewards),
  )
